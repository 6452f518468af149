"""Random small networks, and the one check every fuzz example must pass.

Shared by ``tests/test_fuzz.py`` (a few derandomized examples in CI) and
``benchmarks/fuzz.py`` (the long run), so it imports nothing from tests/.
A :class:`NetSpec` is plain data
(its ``repr`` rebuilds it), :func:`net_specs` is the hypothesis strategy that
draws one, :func:`build` turns it into a model, an input and an upstream
gradient, and :func:`check` runs it three ways and asserts:

1. **Forward.** ``backend=approxbp`` returns what ``backend="inductor"`` returns,
   bit for bit (no rule replaces a forward node that computes a value).
2. **Gradients.** approxbp's input and parameter gradients equal those of an
   *eager reference*: the same model, in which exactly the activations the
   backend approximated are replaced by
   :class:`~approxbp_fx.eager.ApproxActivation` (step derivative from
   codes, :func:`~approxbp_fx.codes.step_derivative`), and everything else,
   norms included, is plain exact autograd. MS-BP changes only where the
   norm's backward reads x̂ from, so its gradient is the exact one up to
   rounding (bf16 and autocast: x̂ rounded to bf16).
3. **Saved bytes.** approxbp saves at most what inductor saves, measured by
   :class:`~approxbp_fx.measure.count_saved_bytes` on the very runs of 1 and 2.
4. **Report.** every activation module has exactly one site in the
   :class:`~approxbp_fx.report.GraphReport`, recognised as the activation
   its spelling computes; float64 sites are never rewritten.

How a site is mapped back to its module. Which activations were approximated
is the partitioner's profitability decision, reported per joint-graph site
(``SiteDecision(site, rewritten, reason, rule)``), not per module. The
generator therefore draws every width from one permutation of 8..64, so
*every activation's input has a last dimension no other activation has*;
``site.shape[-1]`` names the :class:`Act` module a decision is about, with no
graph-to-module tracing. Stream widths change only through a Linear, so this
restricts nothing else about the topology.

Code flips. A rewritten site's gradient depends on which side of a threshold
each input element falls. Compiled and eager inputs differ by rounding, so an
element within rounding of a threshold can take different codes and move its
gradient by a whole level step. When a gradient comparison fails and some
approximated input (captured in the eager reference) has an element that close
to a threshold, :func:`check` raises :class:`Ambiguous` rather than a failure;
the test discards such an example (``assume``), the long run counts it.

Dropout. ``p > 0`` in train mode is checked with
``torch._inductor.config.fallback_random=True`` (compiled random ops call
aten's, in eager's order) and the same seed before every forward, so eager
and both compiles draw the same masks; without it masks differ and nothing
could be compared.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

import approxbp_fx
from approxbp_fx import ApproxBPConfig
from approxbp_fx.coefficients import table
from approxbp_fx.eager import ApproxActivation
from approxbp_fx.measure import count_saved_bytes

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
    pointwise_recompute: bool = False
    norm_share_dtype: str = "consumer"
    seed: int = 0

    def config(self) -> ApproxBPConfig:
        return ApproxBPConfig(
            bits=self.bits, pointwise_recompute=self.pointwise_recompute, norm_share_dtype=self.norm_share_dtype
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
        pointwise_recompute=draw(st.booleans()),
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


class Ambiguous(Exception):
    """A gradient mismatch explained by an input element within rounding of a code threshold."""


@dataclass
class Run:
    out: torch.Tensor
    grads: dict[str, torch.Tensor]
    saved: int


def _run(fn, model: nn.Module, x: torch.Tensor, g: torch.Tensor, spec: NetSpec) -> Run:
    """One forward (seeded: dropout masks agree across runs) and one backward."""
    params = dict(model.named_parameters())
    for p in params.values():
        p.grad = None
    xin = x.detach().requires_grad_(x.requires_grad)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if spec.dtype == "autocast" else contextlib.nullcontext()
    torch.manual_seed(spec.seed + 1)
    with count_saved_bytes(model) as counter, autocast:
        out = fn(xin)
    (out.float() * g.float()).sum().backward()
    grads = {n: p.grad.clone() for n, p in params.items() if p.grad is not None}
    if xin.grad is not None:
        grads["<input>"] = xin.grad.clone()
    return Run(out.detach(), grads, counter.total)


@contextlib.contextmanager
def compile_env(spec: NetSpec, recompute: bool = False):
    """Every compile runs the partitioner (no AOTAutograd cache: it would skip the
    report), with eager-order RNG where dropout is live, and, for the inductor
    peer of ``pointwise_recompute=True``, recompute allowed as our partitioner has it."""
    from torch._functorch import config as functorch_config
    from torch._inductor import config as inductor_config

    with contextlib.ExitStack() as stack:
        stack.enter_context(functorch_config.patch(enable_autograd_cache=False))
        if spec.has_dropout:
            stack.enter_context(inductor_config.patch(fallback_random=True))
        if recompute:
            stack.enter_context(functorch_config.patch(ban_recompute_materialized_backward=False))
        yield


# Gradient tolerance vs the eager reference (forwards must agree bit for bit).
# Gradients, float32/64: max |a - b| over max |b|, per tensor (sums of many
# products cancel, so elementwise relative error is meaningless). bf16 and
# autocast: relative Frobenius error; eager rounds every op to bf16, inductor
# once per fused chain, so even inductor against eager differs by ~1e-2.
GRAD_TOL = {"float32": 1e-5, "float64": 1e-10, "bfloat16": 5e-2, "autocast": 5e-2}


def grad_error(a: torch.Tensor, b: torch.Tensor, dtype: str) -> float:
    a, b = a.double(), b.double()
    if dtype in ("float32", "float64"):
        return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def act_decisions(model: FuzzNet, reports) -> dict[str, object]:
    """Module path of each :class:`Act` -> its one ``SiteDecision``; asserts the mapping is total and unique."""
    by_width = {m.width: name for name, m in model.named_modules() if isinstance(m, Act)}
    found: dict[str, object] = {}
    for d in (d for r in reports for d in r.sites if d.rule == "save_act_codes"):
        width = d.site.shape[-1]
        assert width in by_width, f"a {d.site.op} site of shape {d.site.shape} matches no activation module"
        name = by_width[width]
        assert name not in found, f"two sites for {name}: {found[name].site} and {d.site}"
        found[name] = d
    missing = sorted(set(by_width.values()) - set(found))
    assert not missing, f"activations with no site in the report: {missing}"
    return found


def reference(model: FuzzNet, approximated: dict[str, str], bits: int) -> FuzzNet:
    """A copy of ``model`` whose activations at ``approximated`` (path -> activation) are ApproxActivation."""
    ref = copy.deepcopy(model)
    for path, activation in approximated.items():
        parent, _, leaf = path.rpartition(".")
        setattr(ref.get_submodule(parent), leaf, ApproxActivation(activation, bits))
    return ref


def _near_threshold(h: torch.Tensor, thresholds) -> bool:
    """Whether any float32 element of ``h`` lies within compiled-vs-eager rounding
    (a few ulps after a few layers) of a threshold."""
    h = h.detach()
    return any(bool(((h - c).abs() <= 1e-5 * (1 + h.abs())).any()) for c in thresholds)


def _jittered(model: FuzzNet, paths) -> FuzzNet:
    """A copy of ``model`` whose inputs at ``paths`` move by -1, 0 or +1 ulp-sized steps (2^-8 relative)."""
    out = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(0)

    def jitter(module, args):
        h = args[0]
        step = torch.randint(-1, 2, h.shape, generator=gen).to(h.dtype)
        return (h + h.abs() * step * 2**-8,)

    for p in paths:
        out.get_submodule(p).register_forward_pre_hook(jitter)
    return out


# Hugging Face norms compute in float32 whatever the input dtype, so a float64
# model holding one is float32-accurate, compiled or not.
_FLOAT32_INSIDE = {"LlamaRMSNorm", "T5LayerNorm", "GemmaRMSNorm"}


def grad_tolerance(spec: NetSpec) -> float:
    if spec.dtype == "float64" and any(b.norm in _FLOAT32_INSIDE for b in spec.blocks):
        return GRAD_TOL["float32"]
    return GRAD_TOL[spec.dtype]


# The rules off: the same decompositions and min-cut partitioner as the
# approxbp aot_eager tier, so its saved set is that tier's baseline.
_NO_RULES = ApproxBPConfig(save_act_codes=False, share_norm_input=False)


def check(spec: NetSpec, tier: str = "inductor") -> dict:
    """Run ``spec`` through a peer, approxbp and the eager reference; assert the
    module docstring's four properties. Returns a summary (bytes, sites, errors).

    ``tier="inductor"``: approxbp is the product backend, its peer ``backend="inductor"``.
    ``tier="aot_eager"``: both run op by op (``approxbp_fx.backend(compiler="aot_eager")``,
    the peer with every rule off): the rewrite without inductor's code
    generation, a tenth of the compile time.
    """
    torch._dynamo.reset()
    cfg = spec.config()
    model, x, g = build(spec)
    reports = []
    if tier == "inductor":
        peer, mine = "inductor", approxbp_fx.backend(cfg, on_report=reports.append)
    elif tier == "aot_eager":
        no_rules = dataclasses.replace(_NO_RULES, pointwise_recompute=spec.pointwise_recompute)
        peer = approxbp_fx.backend(no_rules, compiler="aot_eager")
        mine = approxbp_fx.backend(cfg, compiler="aot_eager", on_report=reports.append)
    else:
        raise ValueError(tier)

    with compile_env(spec, recompute=spec.pointwise_recompute and tier == "inductor"):
        theirs = _run(torch.compile(model, backend=peer), model, x, g, spec)
    with compile_env(spec):
        ours = _run(torch.compile(model, backend=mine), model, x, g, spec)
    torch._dynamo.reset()

    # 1. forward
    torch.testing.assert_close(
        ours.out, theirs.out, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"forward vs inductor: {m}"
    )

    # 3. saved bytes, and the report's own account of them
    assert ours.saved <= theirs.saved, f"approxbp saves {ours.saved} B > inductor {theirs.saved} B"
    assert len(reports) == 1, f"{len(reports)} joint graphs for one model"
    report = reports[0]
    assert report.final_bytes <= report.baseline_bytes, (report.final_bytes, report.baseline_bytes)

    # 4. every activation found once, as what it is; float64 stays exact
    decisions = act_decisions(model, reports)
    for path, d in decisions.items():
        act = model.get_submodule(path)
        assert d.site.op == act.activation, f"{path} ({act.form}) recognised as {d.site.op}"
    if spec.dtype == "float64":
        assert not any(d.rewritten for r in reports for d in r.sites), "a float64 site was rewritten"

    # 2. gradients against the eager reference with exactly the approximated activations swapped
    approximated = {p: d.site.op for p, d in decisions.items() if d.rewritten}
    ref_model = reference(model, approximated, spec.bits)
    inputs: dict[str, torch.Tensor] = {}
    for path in approximated:
        ref_model.get_submodule(path).register_forward_pre_hook(lambda m, a, p=path: inputs.__setitem__(p, a[0]))
    ref = _run(ref_model, ref_model, x, g, spec)
    assert ours.grads.keys() == ref.grads.keys(), (sorted(ours.grads), sorted(ref.grads))
    errors = {n: grad_error(ours.grads[n], ref.grads[n], spec.dtype) for n in ref.grads}
    bad = {n: e for n, e in errors.items() if not e <= grad_tolerance(spec)}
    # Only float32 gets the benefit of the doubt: in bf16 a rounding-sized
    # neighbourhood of some threshold always holds an element, and the
    # Frobenius tolerance already absorbs the few flips that occur there.
    if bad and approximated and spec.dtype in ("bfloat16", "autocast"):
        # In bf16 a 1-ulp change of an approximated input flips codes, and in a
        # chain of approximated activations that moves the gradient by ~10%
        # (measured: 0.11 relative for three sites at 1 bit, against 0.02 for
        # exact ones). Compiled and eager inputs differ by that much, so the
        # bound is the reference's own spread under such a perturbation.
        jittered = _jittered(ref_model, approximated)
        noise = _run(jittered, jittered, x, g, spec)
        bad = {n: e for n, e in bad.items() if e > 2 * grad_error(noise.grads[n], ref.grads[n], spec.dtype)}
    if bad:
        near = [p for p, h in inputs.items() if _near_threshold(h, table(approximated[p], spec.bits).thresholds)]
        if near and spec.dtype == "float32":
            raise Ambiguous(f"gradients {sorted(bad)} off; {near} have inputs at a code threshold")
        raise AssertionError(
            f"gradients differ from the eager reference (approximated: {sorted(approximated)}): "
            + ", ".join(f"{n} {e:.2e}" for n, e in sorted(bad.items()))
        )
    return {
        "saved_peer": theirs.saved,
        "saved_approxbp": ours.saved,
        "act_sites": len(decisions),
        "act_rewritten": len(approximated),
        "norm_sites": sum(d.rule == "share_norm_input" for d in report.sites),
        "norm_rewritten": sum(d.rule == "share_norm_input" and d.rewritten for d in report.sites),
        "max_grad_error": max(errors.values(), default=0.0),
    }
