"""Robustness of the approxbp backend: overflow, double backward, paths it must
leave alone, unusual tensors, and the torch version check at import.

Inductor compiles cost seconds each on CPU, so every model here is tiny and
one compiled model serves every input that does not change its graph.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters
import torch.nn.functional as F
from torch import nn

import approxbp_fx
from approxbp_fx import table
from approxbp_fx._compat import SUPPORTED_TORCH, check_torch_version
from approxbp_fx.activations import exact_derivative
from approxbp_fx.eager import swap_modules
from tests.conftest import MLP, NormBlock, compiled, kept_exact, rewrites

ROOT = Path(__file__).resolve().parents[1]
INF, NAN = float("inf"), float("nan")


def nonfinite_grads(model: nn.Module) -> list[str]:
    """The parameters whose gradient has an inf or NaN: what GradScaler's skip looks at."""
    return [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]


def step_skipped(fn, model: nn.Module, *args) -> bool:
    """One GradScaler step on ``fn(*args)``; True when the scaler found inf/NaN and skipped it.

    lr=0 keeps the parameters as they were, so one compiled model serves many
    steps; the skip shows as the scale backing off (16 -> 8).
    """
    model.zero_grad(set_to_none=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=16.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    scaler.scale(fn(*args)).backward()
    scaler.step(opt)
    scaler.update()
    skipped = scaler.get_scale() < 16.0
    # GradScaler and the plain "any grad non-finite" check must agree.
    assert skipped == bool(nonfinite_grads(model)), nonfinite_grads(model)
    return skipped


# --------------------------------------------------------------------------- 1. NaN and Inf


class TwoBlocks(nn.Module):
    """LayerNorm -> GELU MLP, then RMSNorm -> SiLU MLP, residual, mean-square
    loss: all four rewritten site kinds (gelu, silu, layer_norm, rms_norm) in
    one graph. The first block runs in ``dtypes[0]``, the second in
    ``dtypes[1]``, so one compile covers fp32 and bf16 sites."""

    def __init__(self, dtypes, d=16, hidden=32):
        super().__init__()
        self.dtypes = dtypes
        first = (nn.LayerNorm(d), nn.Linear(d, hidden), nn.Linear(hidden, d))
        second = (nn.RMSNorm(d), nn.Linear(d, hidden), nn.Linear(hidden, d))
        self.n1, self.fc1, self.fc2 = (m.to(dtypes[0]) for m in first)
        self.n2, self.fc3, self.fc4 = (m.to(dtypes[1]) for m in second)

    def forward(self, x):
        h = x.to(self.dtypes[0])
        h = h + self.fc2(F.gelu(self.fc1(self.n1(h))))
        h = h.to(self.dtypes[1])
        h = h + self.fc4(F.silu(self.fc3(self.n2(h))))
        # A NaN/inf output reaches the gradient (2 * out / n), as with any real loss.
        return h.float().pow(2).mean()


def _bad_batches():
    """name -> (x, (module, value) weight fill or None): each but "clean" overflows the forward."""
    gen = torch.Generator().manual_seed(0)
    clean = torch.randn(2, 5, 16, generator=gen)

    def edit(fn):
        x = clean.clone()
        fn(x)
        return x

    return {
        "clean": (clean, None),
        "inf input": (edit(lambda x: x[0, 3, 5].fill_(INF)), None),
        "nan input": (edit(lambda x: x[1, 2, 1].fill_(NAN)), None),
        # Finite, but the norm statistics overflow (a square > float max).
        "huge input": (edit(lambda x: x[0, 1].fill_(3e38)), None),
        # Finite input, finite weights: the products overflow, so GELU (fc1) or
        # SiLU (fc3) sees +inf, and its output feeds the next Linear.
        "overflowing gelu input": (clean, ("fc1", 1e38)),
        "overflowing silu input": (clean, ("fc3", 1e38)),
    }


@pytest.mark.parametrize(
    "dtypes",
    [
        (torch.float32, torch.bfloat16),
        # The same sites in the other dtypes: another pair of inductor compiles.
        pytest.param((torch.bfloat16, torch.float32), marks=pytest.mark.slow),
    ],
    ids=lambda d: "-".join(str(t).removeprefix("torch.") for t in d),
)
def test_overflowing_step_is_skipped_wherever_inductor_skips_it(dtypes):
    """Whatever inductor's step skips, ours skips: per parameter, every grad
    inductor leaves non-finite is non-finite in ours too.

    Here the loss carries the overflow back (2 * out / n is NaN where out is),
    and a non-finite incoming gradient stays non-finite through ``g * level``
    and through the rebuilt norm backward. The other direction may differ
    element by element: MS-BP rebuilds the norm input as ``x̂ / r + μ``, and a
    row whose variance overflows has ``r = 0``, so ours is NaN where
    inductor's exact backward is finite (a step skipped that inductor takes:
    safe, not asserted).
    """
    torch.manual_seed(0)
    base = TwoBlocks(dtypes)
    theirs_model, ours_model = copy.deepcopy(base), copy.deepcopy(base)
    reports = []
    theirs = compiled(theirs_model, "inductor")
    ours = compiled(ours_model, "approxbp", reports=reports)
    outcome = {}
    for name, (x, weight_fill) in _bad_batches().items():
        for model in (theirs_model, ours_model):
            model.load_state_dict(base.state_dict())
            if weight_fill is not None:
                with torch.no_grad():
                    getattr(model, weight_fill[0]).weight.fill_(weight_fill[1])
        theirs_skip, theirs_bad = step_skipped(theirs, theirs_model, x), nonfinite_grads(theirs_model)
        ours_skip, ours_bad = step_skipped(ours, ours_model, x), nonfinite_grads(ours_model)
        assert set(theirs_bad) <= set(ours_bad), f"{name}: finite in approxbp only: {set(theirs_bad) - set(ours_bad)}"
        outcome[name] = (theirs_skip, ours_skip)
    # The comparison only means something if all four sites were rewritten.
    rewritten = sorted(d.site.op for r in reports for d in r.sites if d.rewritten)
    assert rewritten == ["gelu", "layer_norm", "rms_norm", "silu"]
    # Non-vacuous: inductor takes the clean step and skips the poisoned ones.
    assert outcome["clean"] == (False, False)
    for name in ("inf input", "nan input", "overflowing gelu input", "overflowing silu input"):
        assert outcome[name][0], f"precondition: inductor should skip the {name!r} step"
    for name, (theirs_skip, ours_skip) in outcome.items():
        assert ours_skip or not theirs_skip, f"{name}: inductor skips the step, approxbp would take it"


@pytest.mark.parametrize("activation", ["gelu", "silu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_code_backward_element_level_on_non_finite_inputs(activation, dtype):
    """What one element does, against the exact derivative.

    ``x = +inf``: code n, level ~1, exact h'(x) = NaN (torch: inf*pdf = inf*0);
    ``x = -inf`` and ``x = NaN``: code 0, level[0] (~0), exact NaN. So the codes alone
    would give a finite ``g * level`` where the exact backward is NaN; the
    non-finite flag saved beside them makes the whole dx NaN instead (coarser
    than exact, never finite where it is not). A non-finite ``g`` stays
    non-finite at every code (inf * 0 = NaN, NaN * level = NaN).
    """
    tab = table(activation, 2)
    x = torch.tensor([INF, -INF, NAN, 1e30, -1e30, 0.5]).to(dtype)
    exact = exact_derivative(activation, x).float()
    assert exact[:3].isnan().all()  # what inductor's backward gives at the same elements
    for poison in (None, INF, -INF, NAN):
        xs = x[3:] if poison is None else torch.cat([x[3:], torch.tensor([poison], dtype=dtype)])
        codes, flag = torch.ops.approxbp.act_pack(xs, list(tab.thresholds), 2)
        dx = lambda g: torch.ops.approxbp.code_grad(g, codes, flag, list(tab.levels), 2, dtype).float()
        finite_g = dx(torch.ones(xs.numel(), dtype=dtype))
        if poison is None:
            assert not flag.item() and finite_g.isfinite().all()
            # +-1e30: top code, code 0; dx = 1 * level, rounded once to dtype
            ends = torch.tensor([tab.levels[-1], tab.levels[0]]).to(dtype).float()
            assert finite_g[:2].tolist() == ends.tolist()
        else:
            assert flag.item() and finite_g.isnan().all(), poison
        for g_poison in (INF, NAN):
            assert not dx(torch.full((xs.numel(),), g_poison, dtype=dtype)).isfinite().any()


class MaskedFrozenMLP(nn.Module):
    """``sum(fc2(act(fc1(x) + mask)))``, fc2 frozen: the upstream gradient at the
    activation (fc2's weight) is finite whatever the forward computed, and the
    activation's output reaches no trainable parameter."""

    def __init__(self, act, d=16, hidden=32):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(d, hidden), act, nn.Linear(hidden, d)
        self.fc2.requires_grad_(False)

    def forward(self, x, mask):
        return self.fc2(self.act(self.fc1(x) + mask)).sum()


@pytest.mark.parametrize("tier", ["aot_eager", "approxbp"])
def test_non_finite_preactivation_under_finite_upstream_gradient_is_skipped(tier):
    # A NaN/-inf pre-activation gets code 0 and +inf the top one, so without the
    # non-finite flag the step-derivative backward here was finite where the
    # exact one is NaN, and GradScaler took a step inductor skips. Both tiers:
    # aot_eager runs the approxbp:: ops, approxbp their inductor lowering.
    torch.manual_seed(0)
    model = MaskedFrozenMLP(nn.GELU())
    ours = compiled(model, tier)
    x = torch.randn(3, 5, 16)
    taken = []
    for poison in (INF, -INF, NAN):
        mask = torch.zeros(3, 5, 32)
        mask[1, 2, 3] = poison
        # Precondition, against eager (inductor measured the same: fc1.weight
        # and fc1.bias grads NaN): the exact step is skipped.
        if not step_skipped(model, model, x, mask):
            pytest.fail(f"precondition: the exact step should be skipped ({poison})")
        if not step_skipped(ours, model, x, mask):
            taken.append((poison, nonfinite_grads(model)))
    if rewrites() != 1:
        pytest.fail(f"the GELU site should be rewritten: {dict(counters['approxbp'])}")
    assert not taken, f"approxbp takes steps whose loss is NaN (poison, non-finite grads): {taken}"


# --------------------------------------------------------------------------- 2. double backward


def test_double_backward_through_a_rewritten_site_raises():
    """Gradient penalty ``|d out/d x|^2``: AOTAutograd's compiled backward is
    not differentiable, and torch says so for every backend (plain aot_eager
    here); ours inherits that error rather than differentiating the codes
    (whose second derivative would silently be 0)."""
    torch.manual_seed(0)
    model = MLP(nn.GELU(), d=16, hidden=32)
    x = torch.randn(4, 16)
    for fn in (torch.compile(model, backend="aot_eager"), compiled(model, "approxbp")):
        xr = x.clone().requires_grad_(True)
        (gx,) = torch.autograd.grad(fn(xr).sum(), xr, create_graph=True)
        # First order under create_graph is the same compiled backward as without it.
        (gx_plain,) = torch.autograd.grad(fn(xr).sum(), xr)
        torch.testing.assert_close(gx.detach(), gx_plain, rtol=0, atol=0)
        with pytest.raises(RuntimeError, match="does not currently support double backward"):
            gx.pow(2).sum().backward()  # gradient penalty into the parameters
        (gx,) = torch.autograd.grad(fn(xr).sum(), xr, create_graph=True)
        with pytest.raises(RuntimeError, match="does not currently support double backward"):
            torch.autograd.grad(gx.sum(), xr)  # second derivative in the input
    assert rewrites() == 1  # the approxbp compile did rewrite the site it refused to differentiate twice


def test_eager_reference_refuses_double_backward():
    model = MLP(nn.GELU(), d=16, hidden=32)
    assert swap_modules(model, norms=False) == {"gelu": 1}
    x = torch.randn(4, 16, requires_grad=True)
    (gx,) = torch.autograd.grad(model(x).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        gx.pow(2).sum().backward()


# --------------------------------------------------------------------------- 3. paths left untouched


class NormMLP(nn.Module):
    """A LayerNorm block then a GELU MLP: one site of each rule."""

    def __init__(self, d=16):
        super().__init__()
        self.block, self.mlp = NormBlock(nn.LayerNorm(d), d=d), MLP(nn.GELU(), d=d, hidden=32)

    def forward(self, x):
        return self.mlp(self.block(x))


def _no_rewrite_anywhere(reports):
    assert reports == []
    assert all(v == 0 for v in counters["approxbp"].values())


def test_no_grad_and_inference_mode_rewrite_nothing():
    torch.manual_seed(0)
    model = NormMLP()
    x = torch.randn(3, 7, 16)
    reports = []
    ours, theirs = compiled(model, "approxbp", reports=reports), compiled(model, "inductor")
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            # Same inductor, no partitioner call: the very same kernels.
            assert torch.equal(ours(x), theirs(x)), mode
    _no_rewrite_anywhere(reports)
    # Guard: the same model, trained, does have sites to rewrite.
    compiled(model, "aot_eager", reports=reports)(x).sum().backward()
    assert sorted(d.site.op for r in reports for d in r.sites if d.rewritten) == ["gelu", "layer_norm"]


def test_eval_model_without_grad_inputs_rewrites_nothing():
    torch.manual_seed(0)
    model = NormMLP().eval().requires_grad_(False)
    x = torch.randn(3, 7, 16)
    reports = []
    out = compiled(model, "approxbp", reports=reports)(x)
    assert not out.requires_grad
    assert torch.equal(out, compiled(model, "inductor")(x))
    _no_rewrite_anywhere(reports)


# --------------------------------------------------------------------------- 4. unusual tensors


def _check_against_reference(model, fn, reports, view, *bases, tol=1e-5):
    """``fn`` (compiled ``model``) against eager: ``model`` with its GELU/SiLU
    modules swapped for the step-derivative :class:`ApproxActivation` where the
    sites were rewritten, the exact model where they were kept exact.

    The inputs are ``view(*bases)`` (so they keep their strides); compares the
    output (the first, where there are several) and the gradients of every
    parameter and every float base. Returns the sites' rewrite decisions.
    """

    def run(m, f):
        leaves = [b.detach().clone().requires_grad_(b.is_floating_point()) for b in bases]
        m.zero_grad(set_to_none=True)
        out = f(*view(*leaves))
        out = out[0] if isinstance(out, tuple) else out
        out.float().pow(2).sum().backward()
        return out, [p.grad for p in m.parameters()] + [b.grad for b in leaves if b.requires_grad]

    out, grads = run(model, fn)  # first: the compile happens here and fills ``reports``
    decisions = [d.rewritten for r in reports for d in r.sites]
    ref = copy.deepcopy(model)
    if any(decisions):
        swap_modules(ref, norms=False)
    ref_out, ref_grads = run(ref, ref)
    torch.testing.assert_close(out, ref_out, rtol=tol, atol=tol)
    for g, rg in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, rg, rtol=tol, atol=tol)
    return decisions


class OddInputs(nn.Module):
    """A GELU MLP and a SiLU MLP on two float inputs, plus an embedding of
    integer ids; the ids also come back shifted (an integer output)."""

    def __init__(self, d=16, hidden=32, vocab=11):
        super().__init__()
        self.a, self.b = MLP(nn.GELU(), d, hidden), MLP(nn.SiLU(), d, hidden)
        self.emb = nn.Embedding(vocab, d)

    def forward(self, a, b, ids):
        return self.a(a) + self.b(b) + self.emb(ids), ids + 1


def test_non_contiguous_and_integer_inputs():
    torch.manual_seed(0)
    model = OddInputs()
    # A transposed input (strides (1, 24)) and a step slice (strides (48, 3)).
    view = lambda a, b, ids: (a.t(), b[:, ::3], ids)
    bases = (torch.randn(16, 24), torch.randn(24, 48), torch.randint(0, 11, (24,)))
    a, b, ids = view(*bases)
    assert (a.stride(), b.stride()) == ((1, 24), (48, 3))
    reports = []
    fn = compiled(model, "approxbp", reports=reports)
    assert _check_against_reference(model, fn, reports, view, *bases) == [True, True]
    shifted = fn(a, b, ids)[1]
    assert shifted.dtype == torch.int64 and torch.equal(shifted, ids + 1)


def test_channels_last_conv_gelu_conv():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GELU(), nn.Conv2d(8, 4, 1)).to(memory_format=torch.channels_last)
    view = lambda x: (x.to(memory_format=torch.channels_last),)
    x = torch.randn(2, 3, 9, 9)
    reports = []
    fn = compiled(model, "approxbp", reports=reports)
    assert _check_against_reference(model, fn, reports, view, x, tol=1e-4) == [True]
    out = fn(*view(x))
    assert out.is_contiguous(memory_format=torch.channels_last)  # the layout survives the rewrite


def test_zero_size_batch():
    # No elements: whatever the partitioner decides, the gradients are zeros
    # and must come back as such (not garbage from an empty code buffer).
    torch.manual_seed(0)
    model = MLP(nn.GELU(), d=16, hidden=32)
    reports = []
    fn = compiled(model, "approxbp", reports=reports)
    assert len(_check_against_reference(model, fn, reports, lambda x: (x,), torch.randn(0, 16))) == 1
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in model.parameters())


def test_float64_is_left_exact():
    """float64 sites are never rewritten: the gradients are eager's up to fp64
    reassociation (1e-12), where a step derivative would be off by ~1e-1.

    The aot_eager tier runs the product's partitioner, where the decision is
    made; with nothing rewritten inductor would just compile inductor's graph.
    """
    torch.manual_seed(0)
    model = NormMLP().double()
    x = torch.randn(3, 7, 16, dtype=torch.float64)
    reports = []

    def grads(fn):
        model.zero_grad(set_to_none=True)
        fn(x).pow(2).sum().backward()
        return [p.grad for p in model.parameters()]

    for g, e in zip(grads(compiled(model, "aot_eager", reports=reports)), grads(model), strict=True):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)
    reasons = sorted({d.reason for r in reports for d in r.sites})
    assert reasons == ["torch.float64 inputs stay exact (ApproxBPConfig.dtypes)"]
    assert (rewrites(), kept_exact(), rewrites("share_norm_input"), kept_exact("share_norm_input")) == (0, 1, 0, 1)


# --------------------------------------------------------------------------- 5. torch version


@pytest.mark.parametrize(
    "version, ok",
    [("2.10.2", False), ("2.11.0", True), ("2.13.0+cpu", True), ("2.14.1", True), ("2.15.0a0+git1234", False),
     ("3.0.0", False), ("1.13.1", False), ("nightly", False)],
)
def test_version_range(version, ok):
    if ok:
        check_torch_version(version)
    else:
        with pytest.raises(ImportError, match=rf"torch>=2\.11,<2\.15, but torch {version.replace('+', '[+]')} is installed"):
            check_torch_version(version)


def test_range_matches_pyproject():
    text = (ROOT / "pyproject.toml").read_text()
    (lo_major, lo_minor), (hi_major, hi_minor) = SUPPORTED_TORCH
    assert f'"torch>={lo_major}.{lo_minor},<{hi_major}.{hi_minor}"' in text


# Fakes torch.__version__ after importing torch (autoload off), then tries the
# three ways approxbp-fx gets loaded; prints what each raised.
_FAKE_VERSION = r"""
import json, os, sys, torch
torch.__version__ = sys.argv[1]
out = {}
try:
    import approxbp_fx
except ImportError as e:
    out["import"] = str(e)
try:
    torch.compile(lambda x: x + 1, backend="approxbp")
    out["compile"] = "no error"
except ImportError as e:
    out["compile"] = str(e)
os.environ["APPROXBP_FX_AUTO"] = "1"
try:
    torch._import_device_backends()  # what `import torch` runs for torch.backends entry points
except RuntimeError as e:
    out["autoload"] = [str(e), str(e.__cause__)]
print(json.dumps(out))
"""


def test_unsupported_torch_fails_at_import_with_a_clear_message():
    env = {**os.environ, "TORCH_DEVICE_BACKEND_AUTOLOAD": "0", "PYTHONPATH": str(ROOT)}
    env.pop("APPROXBP_FX_AUTO", None)
    proc = subprocess.run(
        [sys.executable, "-c", _FAKE_VERSION, "2.15.0"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    message = "approxbp-fx supports torch>=2.11,<2.15, but torch 2.15.0 is installed"
    assert message in out["import"]
    assert message in out["compile"]  # backend="approxbp" loads the package through its entry point
    # torch wraps entry-point failures; ours stays the cause, with the same message.
    torch_says, cause = out["autoload"]
    assert "approxbp_fx" in torch_says and "TORCH_DEVICE_BACKEND_AUTOLOAD=0" in torch_says
    assert message in cause
