"""``approxbp_fx.explain(model, *args)``: what the backend did to a model, and what it saved.

Runs ``model`` four ways (eager, ``backend="inductor"``, inductor with
pointwise recompute allowed, ``approxbp``), one forward+backward each, and
reports every site the rules found: op, shape, dtype, rewritten or kept exact and why, the site's saved
bytes before and after, and the total saved activation bytes of each backend.
Gradients already on the parameters are restored afterwards.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from .activations import ACTIVATIONS
from .backend import backend, inductor_with_recompute
from .config import ApproxBPConfig
from .measure import default_loss, saved_activation_bytes
from .report import GraphReport

__all__ = ["explain", "Explanation", "SiteRow"]


@dataclass(frozen=True)
class SiteRow:
    op: str
    shape: tuple
    dtype: torch.dtype
    rewritten: bool
    reason: str
    bytes_before: int
    bytes_after: int


@dataclass
class Explanation:
    sites: list[SiteRow] = field(default_factory=list)
    eager_bytes: int = 0
    inductor_bytes: int = 0
    # inductor with pointwise recompute allowed (ban_recompute_materialized_backward=False)
    inductor_recompute_bytes: int = 0
    approxbp_bytes: int = 0
    # per joint graph, the recompute approxbp partitioned it with (ApproxBPConfig.recompute)
    recompute: list[str] = field(default_factory=list)
    # The rewritten activations' step derivative: ApproxBPConfig.bits and .table.
    bits: int = 0
    table: str = ""

    @property
    def ratio(self) -> float:
        """approxbp's saved activation bytes over inductor's."""
        return self.approxbp_bytes / self.inductor_bytes if self.inductor_bytes else 1.0

    def __str__(self) -> str:
        lines = [f"{'op':<11} {'shape':<18} {'dtype':<9} {'action':<10} {'before B':>10} {'after B':>10}  reason"]
        for s in self.sites:
            action = "rewritten" if s.rewritten else "exact"
            dt = str(s.dtype).replace("torch.", "")
            shape = "x".join(str(d) for d in s.shape)
            reason = "" if s.rewritten else s.reason
            row = f"{s.op:<11} {shape:<18} {dt:<9} {action:<10} {s.bytes_before:>10} {s.bytes_after:>10}  {reason}"
            lines.append(row.rstrip())
        if not self.sites:
            lines.append("(no activation sites found)")
        elif any(s.rewritten and s.op in ACTIVATIONS for s in self.sites):
            lines.append(f"activation backward: {self.bits}-bit step derivative, {self.table!r} tables")
        if self.recompute:
            lines.append(f"partitioned with pointwise recompute: {', '.join(self.recompute)}")
        lines.append(
            f"saved activation bytes: eager {self.eager_bytes}, inductor {self.inductor_bytes}, "
            f"inductor with recompute {self.inductor_recompute_bytes}, "
            f"approxbp {self.approxbp_bytes} ({self.ratio:.3f}x inductor)"
        )
        return "\n".join(lines)


@contextlib.contextmanager
def _fresh_compiles():
    # A cache hit would skip the partitioner, and with it the report.
    from torch._functorch import config as functorch_config
    from torch._inductor import config as inductor_config

    with inductor_config.patch(fx_graph_cache=False), functorch_config.patch(enable_autograd_cache=False):
        yield


@contextlib.contextmanager
def _grads_restored(model: nn.Module):
    before = {p: p.grad for p in model.parameters()}
    try:
        yield
    finally:
        for p, g in before.items():
            p.grad = g


def _original(model: nn.Module) -> nn.Module:
    """The module inside ``torch.compile``'s wrapper (OptimizedModule), if any."""
    from torch._dynamo.eval_frame import OptimizedModule

    # explain() compiles the model itself; through the wrapper, its "eager"
    # run would be the compiled graph, and eager would report approxbp's bytes.
    while isinstance(model, OptimizedModule):
        model = model._orig_mod
    return model


_USAGE = "explain(model, x) or explain(model, **batch), with config=... and loss_fn=... as keywords"


def _signature(model: nn.Module) -> inspect.Signature | None:
    try:
        return inspect.signature(model.forward)
    except (TypeError, ValueError):  # a builtin or C forward: we cannot tell what it takes
        return None


def _bind_error(sig: inspect.Signature, args: tuple, kwargs: dict) -> str | None:
    """Why a forward of this signature cannot take ``(*args, **kwargs)``; None if it can."""
    try:
        sig.bind(*args, **kwargs)
    except TypeError as err:
        return str(err)
    return None


def _names(sig: inspect.Signature) -> str:
    """The parameter list without annotations or defaults (Hugging Face's run to a page)."""
    stars = {inspect.Parameter.VAR_POSITIONAL: "*", inspect.Parameter.VAR_KEYWORD: "**"}
    return ", ".join(stars.get(p.kind, "") + p.name for p in sig.parameters.values())


def _is_function(a: Any) -> bool:
    return isinstance(a, (types.FunctionType, types.BuiltinFunctionType, types.MethodType, functools.partial))


def _check_inputs(model: nn.Module, args: tuple, kwargs: dict) -> None:
    """Refuse misplaced arguments here, where we can say what to pass, before the model fails on them."""
    if not args and not kwargs:
        raise TypeError(f"explain() needs the model's example inputs: {_USAGE}")
    if any(isinstance(a, ApproxBPConfig) for a in args):
        raise TypeError(f"explain(): the config is keyword-only; pass config=ApproxBPConfig(...): {_USAGE}")
    sig = _signature(model)
    if sig is None:
        return
    name = f"{type(model).__name__}.forward"
    for i, a in enumerate(args):
        # A batch dict (Hugging Face style) meant as keyword arguments: the
        # forward takes its keys as parameters. A forward that takes a dict as
        # such (forward(self, batch)) does not bind the keys, and passes.
        if isinstance(a, Mapping) and a and all(isinstance(k, str) for k in a):
            if _bind_error(sig, args[:i] + args[i + 1 :], {**kwargs, **a}) is None:
                raise TypeError(
                    f"explain(): argument {i + 1} after the model is a dict of inputs ({', '.join(a)}), "
                    f"which {name} takes as keyword arguments; unpack it: explain(model, **batch)"
                )
    why = _bind_error(sig, args, kwargs)
    if why is not None:
        hint = "; a function among them? pass it as loss_fn=" if any(_is_function(a) for a in args) else ""
        raise TypeError(f"explain(): {name}({_names(sig)}) does not take these inputs ({why}){hint}. Call {_USAGE}")


def explain(
    model: nn.Module,
    *example_args: Any,
    config: ApproxBPConfig | None = None,
    loss_fn: Callable[[Any], torch.Tensor] = default_loss,
    **example_kwargs: Any,
) -> Explanation:
    """Report what ``torch.compile(model, backend="approxbp")`` does on these inputs.

    Args:
        model: the module, as is or already wrapped by ``torch.compile``: the
            module inside the wrapper is used, and compiled anew each way (the
            wrapper's backend and options play no part; pass ``config=``).
        example_args, example_kwargs: the inputs of one forward, as the model
            takes them: ``explain(model, x)``, ``explain(model, **batch)``.
        config: the approxbp configuration to explain (keyword only).
        loss_fn: turns the output into a scalar for backward (keyword only).

    Example::

        >>> print(approxbp_fx.explain(mlp, torch.randn(512, 256)))
    """
    model = _original(model)
    _check_inputs(model, example_args, example_kwargs)
    reports: list[GraphReport] = []
    config = config or ApproxBPConfig()
    exp = Explanation(bits=config.bits, table=config.table)
    with _grads_restored(model), _fresh_compiles():
        run = lambda f: saved_activation_bytes(f, *example_args, params=model, loss_fn=loss_fn, **example_kwargs)
        exp.eager_bytes = run(model)
        exp.inductor_bytes = run(torch.compile(model, backend="inductor"))
        exp.inductor_recompute_bytes = run(torch.compile(model, backend=inductor_with_recompute))
        exp.approxbp_bytes = run(torch.compile(model, backend=backend(config, on_report=reports.append)))
    exp.recompute = [r.recompute for r in reports]
    for r in reports:
        for d in r.sites:
            s = d.site
            exp.sites.append(SiteRow(s.op, s.shape, s.dtype, d.rewritten, d.reason, d.bytes_before, d.bytes_after))
    return exp
