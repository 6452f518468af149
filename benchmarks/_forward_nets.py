"""Random pointwise chains around activations and norms: the forward fuzzer's models.

Shared by tests/test_forward_fuzz.py and benchmarks/forward_fuzz.py, so it
imports nothing from tests/. docs/fuzz.md explains the check.

The property, checked by benchmarks/_forward_check.py: ``torch.compile(model,
backend=approxbp)``'s forward is **bit for bit** ``backend="inductor"``'s, and both compile.

The model: ``fc2(chain(fc1(x)))`` [``+`` or ``*`` ``branch(fc1(x))``]; ``fc1`` optional
(specials then land on the activation's input unsmeared), ``fc2`` trainable, frozen or
absent (absent: an inf fc2 would turn into NaN stays visible). A chain is a tuple of
plain-tuple ops, so ``repr(spec)`` rebuilds it: ``("act", form)`` (:data:`ACTS`),
``("norm", form)`` (:data:`NORMS`), a :data:`WRAPPERS` entry, or ``("where", c, inner,
other)`` = ``torch.where(t > c, inner(t), other)``, ``other`` a constant or a chain
(``()``: ``t`` itself). Dropout draws the same masks in both backends:
``fallback_random=True`` and one seed before every forward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

from approxbp_fx import ApproxBPConfig

from ._forms import FunctionalRMSNorm, hf_act, hf_norm


def _gpt2_gelu(x):
    # GPT-2's formula as the brief spells it (x**3, not torch.pow).
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


# Every spelling of an activation: name -> factory of a callable.
ACTS = {
    "nn.GELU": nn.GELU,
    "F.gelu": lambda: F.gelu,
    "nn.GELU(tanh)": lambda: nn.GELU(approximate="tanh"),
    "F.gelu(tanh)": lambda: lambda x: F.gelu(x, approximate="tanh"),
    "gpt2": lambda: _gpt2_gelu,
    "hf.gelu": hf_act("gelu"),
    "hf.gelu_new": hf_act("gelu_new"),
    "hf.gelu_fast": hf_act("gelu_fast"),  # FastGELUActivation: 0.7978845608 for sqrt(2/pi)
    "hf.gelu_10": hf_act("gelu_10"),  # ClippedGELUActivation: clip(gelu(x), -10, 10)
    "hf.quick_gelu": hf_act("quick_gelu"),
    "QuickGELU": lambda: lambda x: x * torch.sigmoid(1.702 * x),
    "nn.SiLU": nn.SiLU,
    "F.silu": lambda: F.silu,
    "hf.silu": hf_act("silu"),
    "x*sigmoid(x)": lambda: lambda x: x * torch.sigmoid(x),
}


# Every spelling of a norm: name -> factory(width).
NORMS = {
    "nn.LayerNorm": nn.LayerNorm,
    "nn.RMSNorm": nn.RMSNorm,
    "F.rms_norm": FunctionalRMSNorm,
    "LlamaRMSNorm": hf_norm("llama.modeling_llama", "LlamaRMSNorm"),
}

# Unary wrappers of ``t`` (``s`` is the chain's input): name -> fn(t, s, *args).
WRAPPERS = {
    "clamp": lambda t, s, lo, hi: t.clamp(lo, hi),
    "clamp_min": lambda t, s, lo: t.clamp(min=lo),
    "clamp_max": lambda t, s, hi: t.clamp(max=hi),
    "clip": lambda t, s, lo, hi: torch.clip(t, lo, hi),
    "clip_min": lambda t, s, lo: torch.clip(t, min=lo),
    "clip_max": lambda t, s, hi: torch.clip(t, max=hi),
    "minimum": lambda t, s, c: torch.minimum(t, torch.tensor(c, dtype=t.dtype)),
    "maximum": lambda t, s, c: torch.maximum(t, torch.tensor(c, dtype=t.dtype)),
    "minimum_s": lambda t, s: torch.minimum(t, s),
    "maximum_s": lambda t, s: torch.maximum(t, s),
    "abs": lambda t, s: t.abs(),
    "scale": lambda t, s, c: t * c,
    "shift": lambda t, s, c: t + c,
    "cast": lambda t, s, dtype: t.to(getattr(torch, dtype)),
    "dropout": lambda t, s, p: F.dropout(t, p, training=True),
}

DTYPES = ("float32", "bfloat16", "float16", "autocast")
# Values written into x at random positions; 1e30 is inf in float16, so it is left out there.
SPECIALS = (1e4, -1e4, 1e30, -1e30, math.inf, -math.inf, math.nan)


@dataclass(frozen=True)
class ForwardSpec:
    chain: tuple  # ops applied to h = fc1(x) (or x)
    branch: tuple | None = None  # a second chain of the same h, combined with the first
    combine: str = "add"  # "add" or "mul"
    fc1: bool = True
    fc2: str = "trainable"  # or "frozen", or "none" (no output layer)
    dtype: str = "float32"  # one of DTYPES; "autocast" is float32 weights under CPU bf16 autocast
    width: int = 24  # fc1's output, the chain's width
    tokens: tuple[int, int] = (2, 33)
    x_scale: float = 4.0
    specials: tuple = ()  # ((flat index into x, value), ...)
    bits: int = 2
    recompute: str = "auto"  # ApproxBPConfig.recompute; the peer recomputes iff "allowed"
    seed: int = 0

    def config(self) -> ApproxBPConfig:
        return ApproxBPConfig(bits=self.bits, recompute=self.recompute)

    @property
    def d_in(self) -> int:
        return 16 if self.fc1 else self.width

    @property
    def has_dropout(self) -> bool:
        return "'dropout'" in repr((self.chain, self.branch))

    @property
    def autocast(self) -> bool:
        return self.dtype == "autocast"

    def build(self) -> tuple[nn.Module, torch.Tensor]:
        """:func:`build`; the check (benchmarks/_forward_check.py) reaches the model through this."""
        return build(self)


def spec_from_repr(text: str) -> ForwardSpec:
    """The inverse of ``repr(spec)`` (``inf``/``nan`` are not Python literals)."""
    return eval(text, {"ForwardSpec": ForwardSpec, "inf": math.inf, "nan": math.nan})


# --------------------------------------------------------------------------- the strategy

_ACT_FORMS = st.sampled_from(sorted(ACTS))
_CONSTS = st.sampled_from((-20.0, -10.0, -3.0, -1.0, -0.5, 0.0, 0.5, 1.0, 3.0, 9.0, 10.0, 20.0))
# Clamp bounds as models use them: mostly large (ClippedGELU's ±10, overflow guards at ±1e4),
# where only large or non-finite inputs reach them.
_BOUNDS = st.sampled_from((-10.0, 10.0, -20.0, 20.0, 9.0, -1e4, 1e4, -3.0, 0.0, 1.0))


@st.composite
def wrappers(draw) -> tuple:
    name = draw(st.sampled_from(sorted(WRAPPERS)))
    if name in ("clamp", "clip"):
        lo, hi = sorted(draw(st.lists(_BOUNDS, min_size=2, max_size=2, unique=True)))
        return (name, lo, hi)
    if name in ("clamp_min", "clamp_max", "clip_min", "clip_max", "minimum", "maximum"):
        return (name, draw(_BOUNDS))
    if name == "shift":
        return (name, draw(_CONSTS))
    if name == "scale":
        return (name, draw(st.sampled_from((-2.0, 0.5, 3.0, 1e3))))
    if name == "cast":
        return (name, draw(st.sampled_from(("float32", "bfloat16"))))
    if name == "dropout":
        return (name, draw(st.sampled_from((0.1, 0.5))))
    return (name,)


@st.composite
def chains(draw, depth: int = 2, max_len: int = 3) -> tuple:
    """A tuple of 1..max_len ops; ``where`` nests chains up to ``depth``."""
    ops = []
    for _ in range(draw(st.integers(1, max_len))):
        kind = draw(st.sampled_from(("act", "act", "act", "wrap", "wrap", "wrap", "norm", "where")))
        if kind == "where" and depth == 0:
            kind = "wrap"
        if kind == "act":
            ops.append(("act", draw(_ACT_FORMS)))
        elif kind == "norm":
            ops.append(("norm", draw(st.sampled_from(sorted(NORMS)))))
        elif kind == "wrap":
            ops.append(draw(wrappers()))
        else:
            inner = draw(chains(depth - 1, 2))
            other = draw(st.one_of(_CONSTS, st.just(()), chains(depth - 1, 2)))
            ops.append(("where", draw(_CONSTS), inner, other))
    return tuple(ops)


@st.composite
def act_sites(draw) -> tuple:
    """One activation with wrappers before and after it, e.g. ``gelu(h.clamp(-10, 10))``,
    ``clip(gelu(h), -10, 10)``; its core may be ``where(h > c, act(h), other)`` or two
    overlapping activations, ``act2(wrap(act1(h)))``."""
    act = ("act", draw(_ACT_FORMS))
    shape = draw(st.sampled_from(("plain", "plain", "where", "two")))
    if shape == "where":
        core = (("where", draw(_CONSTS), (act,), draw(st.one_of(_CONSTS, st.just(()), chains(0, 1)))),)
    elif shape == "two":
        core = (act, draw(wrappers()), ("act", draw(_ACT_FORMS)))
    else:
        core = (act,)
    return tuple(draw(st.lists(wrappers(), max_size=2))) + core + tuple(draw(st.lists(wrappers(), max_size=2)))


@st.composite
def forward_specs(draw, dtypes=DTYPES) -> ForwardSpec:
    """A random :class:`ForwardSpec` with at least one activation."""
    dtype = draw(st.sampled_from(dtypes))
    # Mostly one activation site in wrappers, the shape a rewrite must get right;
    # sometimes a free chain (norms, nesting, several activations).
    chain = draw(st.one_of(act_sites(), act_sites(), chains()))
    if "'act'" not in repr(chain):
        at = draw(st.integers(0, len(chain)))
        chain = chain[:at] + (("act", draw(_ACT_FORMS)),) + chain[at:]
    # A branch makes its input's gradient a sum, which the rewrite does not match: 1 in 4.
    branch = draw(st.one_of(st.none(), st.none(), st.none(), chains(depth=1, max_len=2)))
    tokens = (draw(st.integers(1, 3)), draw(st.integers(5, 40)))
    # Mostly with fc1: an activation of a model input saves nothing worth rewriting
    # (inputs are kept anyway), and a site that is not rewritten proves little.
    fc1, width = draw(st.sampled_from((True, True, True, True, True, False))), draw(st.sampled_from((7, 24, 64)))
    numel = tokens[0] * tokens[1] * (16 if fc1 else width)
    values = [v for v in SPECIALS if not (dtype == "float16" and abs(v) == 1e30)]
    specials = draw(st.lists(st.tuples(st.integers(0, numel - 1), st.sampled_from(values)), max_size=4))
    return ForwardSpec(
        chain=chain,
        branch=branch,
        combine=draw(st.sampled_from(("add", "mul"))),
        fc1=fc1,
        # Weighted away from "trainable": a trainable fc2 saves the activation's output,
        # which often leaves the rewrite nothing to gain, and an unrewritten site proves little.
        fc2=draw(st.sampled_from(("none", "frozen", "none", "frozen", "trainable"))),
        dtype=dtype,
        width=width,
        tokens=tokens,
        # Mostly large: activation inputs of |h| ~ 20-60 pass every clamp bound the chains draw.
        x_scale=draw(st.sampled_from((30.0, 4.0, 100.0, 1.0))),
        specials=tuple(specials),
        bits=draw(st.integers(1, 4)),
        recompute=draw(st.sampled_from(("auto", "banned", "allowed"))),
        seed=draw(st.integers(0, 2**16)),
    )


# --------------------------------------------------------------------------- building the model


class Chain(nn.Module):
    """Applies a chain of ops (see the module docstring) to ``t``; ``s`` is the chain's input."""

    def __init__(self, ops: tuple, width: int):
        super().__init__()
        self.ops = ops
        self.mods = nn.ModuleList(_op_module(op, width) for op in ops)

    def forward(self, t, s):
        for op, mod in zip(self.ops, self.mods):
            t = WRAPPERS[op[0]](t, s, *op[1:]) if op[0] in WRAPPERS else mod(t, s)
        return t


class _Act(nn.Module):
    def __init__(self, form: str):
        super().__init__()
        self.fn = ACTS[form]()

    def forward(self, t, s):
        return self.fn(t)


class _Norm(nn.Module):
    def __init__(self, form: str, width: int):
        super().__init__()
        self.norm = NORMS[form](width)

    def forward(self, t, s):
        dtype = self.norm.weight.dtype
        if t.dtype == dtype:
            return self.norm(t)
        return self.norm(t.to(dtype)).to(t.dtype)


class _Where(nn.Module):
    def __init__(self, op: tuple, width: int):
        super().__init__()
        _, self.c, inner, other = op
        self.inner = Chain(inner, width)
        self.other = Chain(other, width) if isinstance(other, tuple) else None
        self.value = other

    def forward(self, t, s):
        other = self.other(t, s) if self.other is not None else self.value
        return torch.where(t > self.c, self.inner(t, s), other)


def _op_module(op: tuple, width: int) -> nn.Module:
    if op[0] == "act":
        return _Act(op[1])
    if op[0] == "norm":
        return _Norm(op[1], width)
    if op[0] == "where":
        return _Where(op, width)
    return nn.Identity()  # a wrapper: plain function, no state


class ForwardNet(nn.Module):
    def __init__(self, spec: ForwardSpec):
        super().__init__()
        self.spec = spec
        self.fc1 = nn.Linear(spec.d_in, spec.width) if spec.fc1 else nn.Identity()
        self.chain = Chain(spec.chain, spec.width)
        self.branch = Chain(spec.branch, spec.width) if spec.branch is not None else None
        self.fc2 = nn.Linear(spec.width, 8) if spec.fc2 != "none" else nn.Identity()
        self.fc2.requires_grad_(spec.fc2 == "trainable")

    def forward(self, x):
        h = self.fc1(x)
        y = self.chain(h, h).to(h.dtype)
        if self.branch is not None:
            b = self.branch(h, h).to(h.dtype)
            y = y + b if self.spec.combine == "add" else y * b
        return self.fc2(y)


def build(spec: ForwardSpec) -> tuple[ForwardNet, torch.Tensor]:
    """``(model, x)``: the model in train mode and its input, specials written in."""
    torch.manual_seed(spec.seed)
    model = ForwardNet(spec)
    with torch.no_grad():
        # Norm weights away from 1: the default init makes the affine maps trivial.
        for m in model.modules():
            if isinstance(m, _Norm):
                for p in m.norm.parameters():
                    p.copy_(torch.randn_like(p) * 0.5 + 1.0)
    weights = torch.float32 if spec.dtype == "autocast" else getattr(torch, spec.dtype)
    model = model.to(weights).train()
    x = torch.randn(*spec.tokens, spec.d_in) * spec.x_scale
    flat = x.view(-1)
    for index, value in spec.specials:
        flat[index] = value
    # x always requires grad, so backward runs even when fc1 is absent and fc2 frozen.
    return model, x.to(weights).requires_grad_(True)
