"""Random small networks for the gradient fuzzer: the spec, its strategy, the model.

Shared by ``tests/test_fuzz.py`` (a few derandomized examples in CI) and
``benchmarks/fuzz.py`` (the long run), so it imports nothing from tests/.
A :class:`NetSpec` is plain data (its ``repr`` rebuilds it), :func:`net_specs`
is the hypothesis strategy that draws one, and :func:`build` turns it into a
model, an input and an upstream gradient; :mod:`._fuzz_check` runs it.

How a site is mapped back to its module. Which activations were approximated
is the partitioner's profitability decision, reported per joint-graph site
(``SiteDecision(site, rule, rewritten, reason)``), not per module. The
generator therefore draws every width from one permutation of 8..64, so
*every activation's input has a last dimension no other activation has*;
``site.shape[-1]`` names the :class:`Act` module a decision is about, with no
graph-to-module tracing. Stream widths change only through a Linear, so this
restricts nothing else about the topology.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

from approxbp_fx import ApproxBPConfig

from ._forms import ACT_FORMS, NORM_FORMS, hf_act



def _fixed(fn):
    return lambda: fn


# Every spelling of an activation the fuzzer uses: name -> (activation the
# backend must recognise, factory of a callable). The pass tests' forms, plus the
# functional ones and Hugging Face's classes.
FORMS = {
    **{name: (act, _fixed(fn)) for name, (act, fn) in ACT_FORMS.items()},
    "F.gelu": ("gelu", _fixed(F.gelu)),
    "F.silu": ("silu", _fixed(F.silu)),
    "nn.GELU(tanh)": ("gelu_tanh", lambda: nn.GELU(approximate="tanh")),
    "hf.gelu": ("gelu", hf_act("gelu")),
    "hf.gelu_new": ("gelu_tanh", hf_act("gelu_new")),
    "hf.gelu_fast": ("gelu_tanh", hf_act("gelu_fast")),
    "hf.gelu_pytorch_tanh": ("gelu_tanh", hf_act("gelu_pytorch_tanh")),
    "hf.quick_gelu": ("quick_gelu", hf_act("quick_gelu")),
    "hf.silu": ("silu", hf_act("silu")),
}

DTYPES = ("float32", "bfloat16", "float64", "autocast")


@dataclass(frozen=True)
class Block:
    """One block of the stream, of width ``d`` on entry.

    * ``dense``: ``[norm(d)] -> Linear(d, width) -> [norm(width)] -> [act] -> [dropout]``;
      the stream becomes ``width`` wide (``norm_at`` "pre" or "post").
    * ``mlp``:   ``y = fc2(dropout(act(fc1(norm(x)))))`` with hidden ``width``;
      ``x + y`` if ``residual``.
    * ``glu``:   ``y = down(dropout(act(gate(n)) * up(n)))``, ``n = norm(x)``, hidden ``width``.
    """

    kind: str
    width: int
    act: str | None = None
    norm: str | None = None
    norm_at: str = "pre"
    residual: bool = False
    dropout: float = 0.0
    frozen: tuple[bool, ...] = ()  # requires_grad=False per Linear, in construction order
    norm_frozen: bool = False
    bias: bool = True


@dataclass(frozen=True)
class NetSpec:
    d_in: int
    blocks: tuple[Block, ...]
    tokens: tuple[int, int]  # (batch, sequence); their product is > 64, so no saved view looks like a weight
    dtype: str  # one of DTYPES; "autocast" is float32 weights under CPU bf16 autocast
    input_grad: bool
    bits: int = 2
    recompute: str = "auto"  # ApproxBPConfig.recompute; the peer recomputes iff "allowed"
    norm_share_dtype: str = "consumer"
    seed: int = 0

    def config(self) -> ApproxBPConfig:
        return ApproxBPConfig(
            bits=self.bits, recompute=self.recompute, norm_share_dtype=self.norm_share_dtype
        )

    @property
    def has_dropout(self) -> bool:
        return any(b.dropout > 0 for b in self.blocks)


# --------------------------------------------------------------------------- the strategy

_LINEARS = {"dense": 1, "mlp": 2, "glu": 3}


@st.composite
def net_specs(draw, max_blocks: int = 4, dtypes=DTYPES) -> NetSpec:
    """A random :class:`NetSpec`; every width is distinct (see the module docstring)."""
    widths = iter(draw(st.permutations(range(8, 65))))
    d_in = next(widths)
    blocks = []
    for _ in range(draw(st.integers(1, max_blocks))):
        kind = draw(st.sampled_from(("dense", "mlp", "glu")))
        act = draw(st.sampled_from(sorted(FORMS)))
        if kind == "dense":
            act = draw(st.one_of(st.none(), st.just(act)))
        blocks.append(
            Block(
                kind=kind,
                width=next(widths),
                act=act,
                norm=draw(st.one_of(st.none(), st.sampled_from(sorted(NORM_FORMS)))),
                norm_at=draw(st.sampled_from(("pre", "post"))) if kind == "dense" else "pre",
                residual=kind != "dense" and draw(st.booleans()),
                dropout=draw(st.sampled_from((0.0, 0.0, 0.25))),
                frozen=tuple(draw(st.lists(st.booleans(), min_size=_LINEARS[kind], max_size=_LINEARS[kind]))),
                norm_frozen=draw(st.booleans()),
                bias=draw(st.booleans()),
            )
        )
    return NetSpec(
        d_in=d_in,
        blocks=tuple(blocks),
        tokens=(draw(st.integers(2, 3)), draw(st.integers(33, 47))),
        dtype=draw(st.sampled_from(dtypes)),
        input_grad=draw(st.booleans()),
        bits=draw(st.integers(1, 4)),
        recompute=draw(st.sampled_from(("auto", "banned", "allowed"))),
        norm_share_dtype=draw(st.sampled_from(("consumer", "input"))),
        seed=draw(st.integers(0, 2**16)),
    )


# --------------------------------------------------------------------------- building the model


class Act(nn.Module):
    """One activation site, in one spelling (a :data:`FORMS` key)."""

    def __init__(self, form: str, width: int):
        super().__init__()
        self.form, self.width = form, width
        self.activation, make = FORMS[form]
        self.fn = make()

    def forward(self, x):
        return self.fn(x)


class _Block(nn.Module):
    def __init__(self, b: Block, d: int):
        super().__init__()
        self.spec = b
        lin = lambda i, o: nn.Linear(i, o, bias=b.bias)
        norm_width = b.width if b.kind == "dense" and b.norm_at == "post" else d
        self.norm = NORM_FORMS[b.norm][1](norm_width) if b.norm else nn.Identity()
        self.act = Act(b.act, b.width) if b.act else nn.Identity()
        self.drop = nn.Dropout(b.dropout)
        if b.kind == "dense":
            self.linears = nn.ModuleList([lin(d, b.width)])
        elif b.kind == "mlp":
            self.linears = nn.ModuleList([lin(d, b.width), lin(b.width, d)])
        else:
            self.linears = nn.ModuleList([lin(d, b.width), lin(d, b.width), lin(b.width, d)])
        for layer, frozen in zip(self.linears, b.frozen):
            layer.requires_grad_(not frozen)
        self.norm.requires_grad_(not b.norm_frozen)

    def forward(self, x):
        b, L = self.spec, self.linears
        if b.kind == "dense":
            h = L[0](self.norm(x)) if b.norm_at == "pre" else self.norm(L[0](x))
            return self.drop(self.act(h))
        n = self.norm(x)
        if b.kind == "mlp":
            y = L[1](self.drop(self.act(L[0](n))))
        else:
            y = L[2](self.drop(self.act(L[0](n)) * L[1](n)))
        return x + y if b.residual else y


class FuzzNet(nn.Module):
    def __init__(self, spec: NetSpec):
        super().__init__()
        layers, d = [], spec.d_in
        for b in spec.blocks:
            layers.append(_Block(b, d))
            d = b.width if b.kind == "dense" else d
        self.blocks = nn.Sequential(*layers)
        self.d_out = d

    def forward(self, x):
        return self.blocks(x)


def build(spec: NetSpec) -> tuple[FuzzNet, torch.Tensor, torch.Tensor]:
    """``(model, x, g)``: the model in train mode, its input, and the upstream gradient."""
    torch.manual_seed(spec.seed)
    model = FuzzNet(spec)
    with torch.no_grad():
        # Norm weights away from 1 (and Gemma's away from 0), biases away from 0:
        # the default init makes the affine maps trivial.
        for m in model.modules():
            if isinstance(m, _Block) and m.spec.norm:
                for name, p in m.norm.named_parameters():
                    p.copy_(torch.randn_like(p) * 0.5 + (1.0 if name == "weight" and "Gemma" not in m.spec.norm else 0.0))
    weights = torch.float32 if spec.dtype == "autocast" else getattr(torch, spec.dtype)
    model = model.to(weights).train()
    if not any(p.requires_grad for p in model.parameters()):
        spec = dataclasses.replace(spec, input_grad=True)
    x = (torch.randn(*spec.tokens, spec.d_in) * 1.5).to(weights).requires_grad_(spec.input_grad)
    out_dtype = torch.bfloat16 if spec.dtype == "autocast" else weights
    g = torch.randn(*spec.tokens, model.d_out).to(out_dtype)
    return model, x, g


# --------------------------------------------------------------------------- the check
