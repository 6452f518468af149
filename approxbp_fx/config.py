"""The one configuration object of approxbp-fx."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from .activations import ACTIVATIONS
from .coefficients import BITS, DEFAULT_TABLE, TABLES

__all__ = ["ApproxBPConfig"]

_REWRITABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_NORM_SHARE_DTYPES = ("consumer", "input")
_ACT_LOWERINGS = ("inductor", "kernels")
_RECOMPUTE = ("auto", "banned", "allowed")


@dataclass(frozen=True)
class ApproxBPConfig:
    """What the ``approxbp`` backend rewrites, and how.

    Example::

        cfg = ApproxBPConfig(bits=3, activations=frozenset({"gelu"}))
        model = torch.compile(model, backend=approxbp_fx.backend(cfg))
    """

    # Bits per derivative code. 2 is the paper's setting (4 codes per
    # byte); coefficients.BITS (1..4) are shipped. Codes are packed 8 // bits to a byte, so 3 bits
    # cost a nibble of storage.
    bits: int = 2

    # Which step tables give the codes' thresholds and levels (coefficients.TABLES).
    # "fitted": fitted to the derivative under N(0, 1), the default: at 2 bits
    # its per-element cosine with GELU' is 0.99 against the paper's 0.95.
    # "paper": the paper's ReGELU2/ReSiLU2 (h~ fitted to h over the whole line).
    # Same bits, same codes, same bytes; docs/fidelity.md measures both.
    table: str = DEFAULT_TABLE

    # Approx-BP for GELU/SiLU-family activations (passes/save_act_codes.py).
    save_act_codes: bool = True

    # Keep CUDA attention on a fused kernel (passes/fused_attention.py): an SDPA
    # mask that is provably all True is dropped, and one whose last dim is
    # strided is made contiguous, so CUDA does not fall to the math path and
    # save fp32 attention probabilities. Exact; CPU graphs are left alone.
    fused_attention: bool = True

    # MS-BP for LayerNorm/RMSNorm (passes/share_norm_input.py): the norm's
    # backward reads the normalised tensor its consumers save, not its input.
    share_norm_input: bool = True

    # Bool masks that backward reads (dropout's) saved 8 to a byte
    # (passes/pack_bool_masks.py). Exact.
    pack_bool_masks: bool = True

    # The dtype of that shared tensor. "consumer": the one the following
    # layers read (bf16 under autocast), which shares one tensor and rounds x̂
    # to bf16 for the norm's backward; "input": the norm input's dtype, exact
    # under autocast at twice the bytes. docs/saved_bytes.md has both measured.
    norm_share_dtype: str = "consumer"

    # Inductor's pointwise recompute in the partitions the rewrite is measured
    # with (torch._functorch.config.ban_recompute_materialized_backward).
    # "allowed": the partitioner may save a GELU's input h and recompute
    # gelu(h) for the next Linear's weight gradient (2 B/elt in bf16), which
    # beats saving gelu(h) plus a code (2.25 B/elt); it moves pointwise work
    # into backward. "banned": inductor's default. "auto": partition both
    # ways, rewrite in the one the rules predict to save most, and keep
    # whichever of that and the two plain partitions saves fewest bytes (ties:
    # banned, which recomputes less); so approxbp never saves more than
    # inductor with either setting. explain() says which was taken;
    # docs/performance.md has the bytes and the compile time.
    recompute: str = "auto"

    # How the code-saving activations run once the graph is partitioned.
    # "inductor": the pack and the code-driven gradient become aten ops that
    # inductor generates and fuses with their neighbours (approxbp_fx/lowering.py).
    # "kernels": they stay calls of our custom ops (hand-written Triton on CUDA,
    # torch on CPU), opaque to inductor. docs/kernels.md measures both.
    act_lowering: str = "inductor"

    # Which activations may be approximated; the others stay exact.
    activations: frozenset[str] = field(default_factory=lambda: frozenset(ACTIVATIONS))

    # Inputs of these dtypes may be rewritten, activations and norms alike.
    # float64 never is: whoever trains in float64 asked for exactness.
    dtypes: frozenset[torch.dtype] = field(default_factory=lambda: frozenset(_REWRITABLE_DTYPES))

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or self.bits not in BITS:
            raise ValueError(f"ApproxBPConfig.bits must be an int in {BITS[0]}..{BITS[-1]}, got {self.bits!r}")
        if self.table not in TABLES:
            raise ValueError(f"ApproxBPConfig.table must be one of {TABLES}, got {self.table!r}")
        for flag in ("save_act_codes", "share_norm_input", "fused_attention", "pack_bool_masks"):
            if not isinstance(getattr(self, flag), bool):
                raise TypeError(f"ApproxBPConfig.{flag} must be a bool, got {getattr(self, flag)!r}")
        if self.norm_share_dtype not in _NORM_SHARE_DTYPES:
            raise ValueError(
                f"ApproxBPConfig.norm_share_dtype must be one of {_NORM_SHARE_DTYPES}, got {self.norm_share_dtype!r}"
            )
        if self.recompute not in _RECOMPUTE:
            raise ValueError(f"ApproxBPConfig.recompute must be one of {_RECOMPUTE}, got {self.recompute!r}")
        if self.act_lowering not in _ACT_LOWERINGS:
            raise ValueError(
                f"ApproxBPConfig.act_lowering must be one of {_ACT_LOWERINGS}, got {self.act_lowering!r}"
            )
        # Accept any iterable of names but store a frozenset so the config stays hashable.
        if isinstance(self.activations, str):
            raise TypeError("ApproxBPConfig.activations must be a collection of names, not a single string")
        acts = frozenset(self.activations)
        unknown = sorted(acts - set(ACTIVATIONS))
        if unknown:
            raise ValueError(f"ApproxBPConfig.activations: unknown {unknown}; expected a subset of {ACTIVATIONS}")
        object.__setattr__(self, "activations", acts)
        dts = frozenset(self.dtypes)
        bad = [d for d in dts if d not in _REWRITABLE_DTYPES]
        if bad:
            raise ValueError(
                f"ApproxBPConfig.dtypes: {bad} cannot be approximated; expected a subset of {list(_REWRITABLE_DTYPES)}"
            )
        object.__setattr__(self, "dtypes", dts)

    @classmethod
    def from_options(cls, options: dict | None) -> "ApproxBPConfig":
        """Build from ``torch.compile(..., options={...})``; unknown keys are an error."""
        options = dict(options or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise ValueError(f"unknown approxbp option(s) {unknown}; valid options are {sorted(names)}")
        return cls(**options)

    def key(self) -> tuple:
        """A stable, order-independent description for compile-cache keys: every field, by name."""
        return tuple((name, _stable(value, str)) for name, value in self._items())

    def _items(self) -> list[tuple[str, object]]:
        return [(f.name, getattr(self, f.name)) for f in dataclasses.fields(self)]

    def __reduce__(self):
        # Pickled with its sets sorted: a frozenset pickles in hash order,
        # which for strings changes from process to process, and inductor's
        # cache keys hash the pickled partitioner that holds this config.
        return (_from_items, (tuple((name, _stable(value, None)) for name, value in self._items()),))


def _stable(value, convert):
    """A frozenset as a sorted tuple (of ``convert``-ed items, when given); anything else as it is."""
    if isinstance(value, frozenset):
        items = sorted(value, key=str)
        return tuple(map(convert, items)) if convert else tuple(items)
    return value


def _from_items(items: tuple) -> ApproxBPConfig:
    return ApproxBPConfig(**dict(items))
