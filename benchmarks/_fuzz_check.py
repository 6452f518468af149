"""The one check every gradient-fuzz example must pass (:func:`check`).

It runs a :class:`~._fuzz_nets.NetSpec` three ways and asserts:

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
from torch import nn

import approxbp_fx
from approxbp_fx import ApproxBPConfig
from approxbp_fx.coefficients import table
from approxbp_fx.eager import ApproxActivation
from approxbp_fx.measure import count_saved_bytes

from ._fuzz_nets import Act, FuzzNet, NetSpec, build


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
    peer of ``recompute="allowed"``, recompute allowed as our partitioner has it."""
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
    model, x, g = build(spec)
    reports: list = []
    peer, mine = _backends(spec, tier, reports)
    with compile_env(spec, recompute=spec.recompute == "allowed" and tier == "inductor"):
        theirs = _run(torch.compile(model, backend=peer), model, x, g, spec)
    with compile_env(spec):
        ours = _run(torch.compile(model, backend=mine), model, x, g, spec)
    torch._dynamo.reset()

    # 1. forward
    torch.testing.assert_close(
        ours.out, theirs.out, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"forward vs inductor: {m}"
    )
    report = _check_bytes(ours, theirs, reports)  # 3.
    decisions = _check_sites(model, reports, spec)  # 4.
    approximated = {p: d.site.op for p, d in decisions.items() if d.rewritten}
    errors = _check_gradients(model, approximated, ours, x, g, spec)  # 2.
    return {
        "saved_peer": theirs.saved,
        "saved_approxbp": ours.saved,
        "act_sites": len(decisions),
        "act_rewritten": len(approximated),
        "norm_sites": sum(d.rule == "share_norm_input" for d in report.sites),
        "norm_rewritten": sum(d.rule == "share_norm_input" and d.rewritten for d in report.sites),
        "max_grad_error": max(errors.values(), default=0.0),
    }


def _backends(spec: NetSpec, tier: str, reports: list):
    """(the peer backend, approxbp's) for ``tier``; approxbp's reports go to ``reports``."""
    cfg = spec.config()
    if tier == "inductor":
        return "inductor", approxbp_fx.backend(cfg, on_report=reports.append)
    if tier == "aot_eager":
        no_rules = dataclasses.replace(_NO_RULES, recompute=spec.recompute)
        peer = approxbp_fx.backend(no_rules, compiler="aot_eager")
        return peer, approxbp_fx.backend(cfg, compiler="aot_eager", on_report=reports.append)
    raise ValueError(tier)


def _check_bytes(ours, theirs, reports):
    """3. Saved bytes, and the report's own account of them; returns the one report."""
    assert ours.saved <= theirs.saved, f"approxbp saves {ours.saved} B > inductor {theirs.saved} B"
    assert len(reports) == 1, f"{len(reports)} joint graphs for one model"
    report = reports[0]
    assert report.final_bytes <= report.baseline_bytes, (report.final_bytes, report.baseline_bytes)
    return report


def _check_sites(model, reports, spec: NetSpec) -> dict:
    """4. Every activation found once, as what it is; float64 stays exact. Returns path -> decision."""
    decisions = act_decisions(model, reports)
    for path, d in decisions.items():
        act = model.get_submodule(path)
        assert d.site.op == act.activation, f"{path} ({act.form}) recognised as {d.site.op}"
    if spec.dtype == "float64":
        assert not any(d.rewritten for r in reports for d in r.sites), "a float64 site was rewritten"
    return decisions


def _check_gradients(model, approximated: dict, ours, x, g, spec: NetSpec) -> dict[str, float]:
    """2. Gradients against the eager reference with exactly the approximated activations swapped."""
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
    return errors
