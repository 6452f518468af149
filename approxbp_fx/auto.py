"""Auto-apply: plain ``torch.compile(model)`` gets the rewrite, with no edit to the script.

:func:`enable` installs :class:`~approxbp_fx.partition.ApproxBPPartitioner`
as inductor's ``custom_partitioner_fn`` (the hook that receives the joint
forward+backward graph and returns the forward and backward graphs) and
:class:`~approxbp_fx.partition.ApproxBPGraphPasses` as its
``pre_grad_custom_pass``, wrapping whatever was installed before: that still
runs, and the rewrite is measured against that partitioner. :func:`disable`
puts the previous values back. Both act on compiles that start afterwards; graphs already compiled keep
what they were compiled with.

Without touching the script::

    APPROXBP_FX_AUTO=1 python train.py            # defaults
    APPROXBP_FX_AUTO="bits=3,share_norm_input=0" python train.py   # ApproxBPConfig fields
    APPROXBP_FX_AUTO="activations=gelu+silu" python train.py        # sets: "+"-separated

The variable is read when ``import torch`` runs: approxbp-fx registers a
``torch.backends`` entry point (the top-level module ``approxbp_fx_autoload``),
which torch calls at the end of its import unless
``TORCH_DEVICE_BACKEND_AUTOLOAD=0``. With the variable unset or ``0`` that call
imports nothing. A bad value fails ``import torch`` with the reason and the
accepted values as its last line (:class:`approxbp_fx_autoload.AutoloadError`):
a typo must not train silently without the rewrite.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch
from approxbp_fx_autoload import ENV_VAR, OFF, ON

from .config import ApproxBPConfig

__all__ = ["enable", "disable", "is_enabled", "enable_from_env", "config_from_env", "accepted_values", "ENV_VAR"]

def enable(config: ApproxBPConfig | None = None) -> None:
    """Make every later inductor compile (``torch.compile(model)``) run the rewrite.

    The partitioner and pre-grad pass installed before (None: inductor's own)
    become the inner ones, which still run; the rewrite is measured against
    that partitioner. Calling it again replaces the config and keeps those
    inner hooks. The only state is inductor's config itself: nothing is
    remembered here.
    """
    from torch._inductor import config as inductor_config

    from .partition import inductor_hooks

    cfg = config if config is not None else ApproxBPConfig()
    if not isinstance(cfg, ApproxBPConfig):
        raise TypeError(f"enable(config=...) expects an ApproxBPConfig, got {type(cfg).__name__}")
    for name, value in inductor_hooks(cfg).items():
        setattr(inductor_config, name, value)


def disable() -> None:
    """Undo :func:`enable`: inductor's hooks are what they were before.

    A no-op when nothing is installed. If the installed partitioner is someone
    else's (installed after enable()), it is kept, and this raises.
    """
    from torch._inductor import config as inductor_config

    from .partition import ApproxBPGraphPasses, ApproxBPPartitioner

    current = inductor_config.custom_partitioner_fn
    if current is None:
        return
    if not isinstance(current, ApproxBPPartitioner):
        # Someone installed their own partitioner on top of ours since: keep
        # theirs rather than clobber it, and say so.
        raise RuntimeError(
            "approxbp_fx.disable(): inductor's custom_partitioner_fn is not approxbp's: it was replaced "
            f"after enable() (now {current!r}); restore it yourself, or call disable() before installing it"
        )
    inductor_config.custom_partitioner_fn = current.inner
    pre_grad = inductor_config.pre_grad_custom_pass
    if isinstance(pre_grad, ApproxBPGraphPasses):
        inductor_config.pre_grad_custom_pass = pre_grad.inner


def is_enabled() -> bool:
    from torch._inductor import config as inductor_config

    from .partition import ApproxBPPartitioner

    return isinstance(inductor_config.custom_partitioner_fn, ApproxBPPartitioner)


def accepted_values() -> str:
    """What ``APPROXBP_FX_AUTO`` may be set to, in one line, for error messages."""
    keys = ", ".join(f.name for f in dataclasses.fields(ApproxBPConfig))
    off = ", ".join(v or '""' for v in OFF)
    return (
        f"{ENV_VAR} takes: off: {off}; on with the defaults: {', '.join(ON)}; or key=value pairs "
        f'separated by commas (e.g. "bits=3,share_norm_input=0", sets "+"-separated: '
        f'"activations=gelu+silu") with keys {keys}'
    )


def config_from_env(value: str) -> ApproxBPConfig | None:
    """The config that ``APPROXBP_FX_AUTO=value`` asks for; None for off.

    ``""``/``0``/``false``/``off``/``no``: off. ``1``/``true``/``on``/``yes``: defaults.
    Otherwise ``key=value`` pairs separated by commas, e.g. ``bits=3,share_norm_input=0``.
    Anything else is a ValueError that names the value, the reason and :func:`accepted_values`.
    """
    try:
        return _config(value)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{ENV_VAR}={value!r}: {err}. {accepted_values()}") from err


def _config(value: str) -> ApproxBPConfig | None:
    v = value.strip()
    if v.lower() in OFF:
        return None
    if v.lower() in ON:
        return ApproxBPConfig()
    options: dict[str, Any] = {}
    for item in v.split(","):
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{item.strip()!r} is not a key=value pair")
        options[key.strip()] = _parse(key.strip(), raw.strip())
    return ApproxBPConfig.from_options(options)


def _parse(key: str, raw: str) -> Any:
    """An option's value from its text, by the type of the field's default."""
    if key not in {f.name for f in dataclasses.fields(ApproxBPConfig)}:
        return raw  # from_options names the valid keys
    default = getattr(ApproxBPConfig(), key)
    if isinstance(default, bool):
        if raw.lower() not in ("0", "1", "true", "false"):
            raise ValueError(f"{key} takes 0/1/true/false, got {raw!r}")
        return raw.lower() in ("1", "true")
    if isinstance(default, int):
        return int(raw)
    if isinstance(default, frozenset):  # activations: gelu+silu
        names = [n for n in raw.split("+") if n]
        if key != "dtypes":
            return frozenset(names)
        bad = [n for n in names if not isinstance(getattr(torch, n, None), torch.dtype)]
        if bad:
            raise ValueError(f"dtypes: {bad} are not torch dtypes (e.g. dtypes=bfloat16+float16)")
        return frozenset(getattr(torch, n) for n in names)
    return raw


def enable_from_env() -> bool:
    """:func:`enable` as ``APPROXBP_FX_AUTO`` asks; True if it did."""
    cfg = config_from_env(os.environ.get(ENV_VAR, ""))
    if cfg is not None:
        enable(cfg)
    return cfg is not None
