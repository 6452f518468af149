"""The save_act_codes rule on small graphs: what it matches, and what it refuses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from approxbp_fx import ApproxBPConfig
from approxbp_fx.passes import save_act_codes
from approxbp_fx.eager import approx_activation
from tests.conftest import ACT_FORMS, DTYPES, MLP, compiled, forced_rule_backend, kept_exact, rewrites, saved_bytes

X_SHAPE = (3, 37, 64)  # 3*37 tokens: matches no weight shape, numel not a multiple of 4


def _x(dtype=torch.float32):
    return torch.randn(*X_SHAPE, dtype=dtype)


@pytest.mark.parametrize("form", list(ACT_FORMS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_spelling_is_found_and_rewritten(form, dtype):
    expected, act = ACT_FORMS[form]
    reports = []
    model = MLP(act, frozen_second=True).to(dtype)
    saved_bytes(model, "approxbp", _x(dtype), reports=reports)
    (report,) = reports
    assert [d.site.activation for d in report.sites] == [expected]
    assert rewrites() == 1 and kept_exact() == 0


@pytest.mark.parametrize("form", ["nn.GELU", "NewGELU", "nn.SiLU"])
def test_found_under_autocast_with_dropout(form):
    expected, act = ACT_FORMS[form]
    reports = []
    model = MLP(act, dropout=0.1)
    saved_bytes(model, "approxbp", _x(), reports=reports, autocast=torch.bfloat16)
    (report,) = reports
    acts = [(d.site.activation, d.rewritten) for d in report.sites if d.rule == "save_act_codes"]
    assert acts == [(expected, True)]
    assert rewrites() == 1
    # The dropout's mask is the other site: packed 8 to a byte by its own rule.
    assert [(d.site.op, d.rewritten) for d in report.sites if d.rule == "pack_bool_masks"] == [("bool mask", True)]


@pytest.mark.parametrize("tier", ["aot_eager", "approxbp"])
def test_both_tiers_match_the_same_sites(tier):
    # aot_eager sees aten.gelu/gelu_backward undecomposed; inductor sees erf/exp/mul.
    model = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 32), nn.SiLU(), nn.Linear(32, 8))
    saved_bytes(model, tier, _x())
    assert rewrites() == 2


def test_two_layer_model_counts_each_site():
    model = nn.Sequential(MLP(nn.GELU()), MLP(nn.GELU()), MLP(nn.SiLU()))
    saved_bytes(model, "approxbp", _x())
    assert rewrites() == 3 and kept_exact() == 0


class SwiGLU(nn.Module):
    def __init__(self, d=64, hidden=200):
        super().__init__()
        self.gate = nn.Linear(d, hidden, bias=False)
        self.up = nn.Linear(d, hidden, bias=False)
        self.down = nn.Linear(hidden, d, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_swiglu_stays_exact_and_says_why(dtype):
    # silu(g) feeds the product's backward; inductor recomputes it from g and
    # saves only g, so codes could only add bytes (docs/saved_bytes.md, SwiGLU: 1.000).
    reports = []
    model = SwiGLU().to(dtype)
    ours = saved_bytes(model, "approxbp", _x(dtype), reports=reports)
    theirs = saved_bytes(model, "inductor", _x(dtype))
    (report,) = reports
    (decision,) = report.sites
    assert decision.site.activation == "silu" and not decision.rewritten
    assert "recomputes" in decision.reason
    assert ours == theirs
    assert rewrites() == 0 and kept_exact() == 1


def test_float64_stays_exact():
    reports = []
    saved_bytes(MLP(nn.GELU()).double(), "approxbp", _x(torch.float64), reports=reports)
    (decision,) = reports[0].sites
    assert not decision.rewritten and "float64" in decision.reason


def test_config_can_switch_an_activation_off():
    cfg = ApproxBPConfig(activations={"silu"}, recompute="banned")
    reports = []
    model = nn.Sequential(MLP(nn.GELU()), MLP(nn.SiLU()))
    saved_bytes(model, "approxbp", _x(), cfg=cfg, reports=reports)
    got = {d.site.activation: (d.rewritten, d.reason) for d in reports[0].sites}
    assert got["silu"][0] and not got["gelu"][0]
    assert "ApproxBPConfig.activations" in got["gelu"][1]


def test_rule_switched_off_rewrites_nothing():
    model = MLP(nn.GELU())
    ours = saved_bytes(model, "approxbp", _x(), cfg=ApproxBPConfig(save_act_codes=False, recompute="banned"))
    assert ours == saved_bytes(model, "inductor", _x())
    assert rewrites() == 0


def test_no_gradient_no_rewrite():
    # Nothing upstream needs a gradient: no backward reads the activation.
    model = MLP(nn.GELU())
    model.fc1.requires_grad_(False)
    x = _x()
    reports = []
    saved_bytes(model, "approxbp", x, reports=reports)
    assert rewrites() == 0


def test_residual_keeps_its_exact_branch():
    # x feeds both gelu and the residual add: only the gelu branch's gradient is approximated.
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 64)
            self.out = nn.Linear(64, 64)

        def forward(self, x):
            h = self.fc(x)
            return self.out(h + F.gelu(h))

    model = Residual()
    x = _x().requires_grad_(True)
    out = compiled(model, "approxbp")(x)
    g = torch.randn_like(out)
    (gx,) = torch.autograd.grad(out, x, g)
    from approxbp_fx import table
    from approxbp_fx.codes import step_derivative

    h = model.fc(x.detach())
    gh = g @ model.out.weight
    want = (gh + gh * step_derivative(h, table("gelu", 2))) @ model.fc.weight
    torch.testing.assert_close(gx, want, rtol=1e-5, atol=1e-5)


def test_activation_after_a_checkpointed_producer_is_measured_not_blamed_on_the_checkpoint():
    # fc1 runs under torch.utils.checkpoint, the GELU does not. The GELU's input
    # is the region's output, tagged for recompute in the joint graph, so the
    # partitioner recomputes it from fc1's input in backward and saves nothing
    # for the GELU: codes could only add bytes. The site is kept exact by the
    # bytes, and its reason must not claim it sits inside the region.
    import torch.utils.checkpoint as checkpoint

    class CheckpointedFc1(MLP):
        def forward(self, x):
            return self.fc2(self.act(checkpoint.checkpoint(self.fc1, x, use_reentrant=False)))

    reports = []
    model = CheckpointedFc1(nn.GELU())
    ours = saved_bytes(model, "approxbp", _x(), reports=reports)
    (report,) = reports
    (decision,) = report.sites
    assert decision.site.activation == "gelu" and not decision.rewritten
    # Kept exact by the partitioner's bytes (predicted from its baseline, or measured), not by the region.
    assert "checkpoint" not in decision.reason and decision.bytes_after == decision.bytes_before, decision.reason
    assert ours == saved_bytes(model, "inductor", _x())


# --------------------------------------------------------------------------- sound recognition (issue 12)


class FrozenTail(nn.Module):
    """``fc2(act(fc1(x)))``; ``act`` any callable (a clamp or clip around an activation)."""

    def __init__(self, act, d=16, hidden=40, frozen_second=True):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(d, hidden), act, nn.Linear(hidden, d)
        self.fc2.requires_grad_(not frozen_second)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def _clipped_gelu():
    from transformers.activations import ACT2FN

    return ACT2FN["gelu_10"]  # ClippedGELUActivation: clip(gelu(x), -10, 10)


# name -> (the activation inside, a factory of the callable, the same callable
# with the step derivative for the gradient check)
CLIPPED = {
    "hf.gelu_10": ("gelu", _clipped_gelu, lambda h: torch.clip(approx_activation(h, "gelu"), -10, 10)),
    "gelu.clamp(max=9)": ("gelu", lambda: lambda h: F.gelu(h).clamp(max=9), lambda h: approx_activation(h, "gelu").clamp(max=9)),
    "gelu(clamp)": ("gelu", lambda: lambda h: F.gelu(h.clamp(-10, 10)), lambda h: approx_activation(h.clamp(-10, 10), "gelu")),
    "silu.clamp(max=20)": ("silu", lambda: lambda h: F.silu(h).clamp(max=20), lambda h: approx_activation(h, "silu").clamp(max=20)),
}


def _wide_input(dtype):
    # Pre-activations out to about +-40: well past every clamp above and past
    # the [-8, 8] that sampled recognition used to look at.
    g = torch.Generator().manual_seed(0)
    return (torch.randn(3, 37, 16, generator=g) * 16).to(dtype)


@pytest.mark.parametrize("form", list(CLIPPED))
@pytest.mark.parametrize("dtype,frozen_second", [(torch.float32, True), (torch.bfloat16, False)], ids=str)
def test_a_clamp_around_an_activation_keeps_the_forward_bit_for_bit(form, dtype, frozen_second):
    # Sampled recognition took clip(gelu(x), -10, 10) for gelu(x) and replaced
    # it: forward max 13.7 instead of 10 (and a KeyError crash for gelu(clamp)).
    torch.manual_seed(0)
    activation, make, _ = CLIPPED[form]
    model = FrozenTail(make(), frozen_second=frozen_second).to(dtype)
    x = _wide_input(dtype)
    reports = []
    ours = compiled(model, "approxbp", reports=reports)(x)
    torch._dynamo.reset()
    theirs = compiled(model, "inductor")(x)
    assert torch.equal(ours, theirs)
    assert model.fc1(x).abs().max() > 20  # the clamp bites: the test could tell
    assert [d.site.activation for r in reports for d in r.sites] == [activation]


@pytest.mark.parametrize("form", list(CLIPPED))
def test_a_clamp_around_an_activation_keeps_its_own_gradient(form):
    # Only the activation's derivative is approximated: the clamp's mask reaches
    # the gradient as in exact training. The rule is forced (whether it pays
    # is the partitioner's business, tested elsewhere), through aot_eager.
    _, make, approximated = CLIPPED[form]
    torch.manual_seed(0)
    model = FrozenTail(make())
    x = _wide_input(torch.float32)
    torch.compile(model, backend=forced_rule_backend(save_act_codes.RULE))(x).sum().backward()
    assert forced_rule_backend.applied == 1
    ref = FrozenTail(approximated)
    ref.load_state_dict(model.state_dict())
    ref(x).sum().backward()
    torch.testing.assert_close(model.fc1.weight.grad, ref.fc1.weight.grad, rtol=1e-5, atol=1e-5)
    exact = FrozenTail(make())
    exact.load_state_dict(model.state_dict())
    exact(x).sum().backward()
    assert not torch.allclose(model.fc1.weight.grad, exact.fc1.weight.grad, rtol=1e-3, atol=1e-3)  # non-vacuous


def _gelu_times_far_bump(h):
    # Equal to GELU to 1e-20 on [-8, 8] (exp(h - 60) < 1e-22 there), not beyond:
    # 2x GELU at h = 60. Made of smooth ops only, so only probing tells.
    return F.gelu(h) * (1 + torch.exp(h - 60))


def test_a_function_that_is_gelu_only_near_zero_is_not_taken_for_gelu():
    near = torch.linspace(-8, 8, 161, dtype=torch.float64)
    assert torch.allclose(_gelu_times_far_bump(near), F.gelu(near), rtol=1e-12, atol=1e-12)  # the trap is real
    torch.manual_seed(0)
    model = FrozenTail(_gelu_times_far_bump)
    x = _wide_input(torch.float32) * 2  # pre-activations past 60
    torch.compile(model, backend=forced_rule_backend(save_act_codes.RULE))(x).sum().backward()
    # GELU itself is a site, but its gradient reaches x only through the bump's
    # factor: no node is g * gelu'(x), so nothing is rewritten and the gradient is exact.
    assert forced_rule_backend.applied == 0
    got = model.fc1.weight.grad.clone()
    model.zero_grad()
    model(x).sum().backward()
    torch.testing.assert_close(got, model.fc1.weight.grad, rtol=1e-5, atol=1e-5)


def _trunc(h):
    return h.to(torch.int32).to(h.dtype)


def test_a_round_trip_through_an_integer_dtype_is_no_identity():
    # Casts are the identity to the probes, but only between float dtypes.
    # Here gelu(h) is scaled by trunc(h) - h + 1, which an identity int cast
    # would call 1: the rewrite would then drop the factor from the gradient.
    torch.manual_seed(0)
    model = FrozenTail(lambda h: F.gelu(h) * (_trunc(h) - h + 1))
    x = _wide_input(torch.float32) / 4
    torch.compile(model, backend=forced_rule_backend(save_act_codes.RULE))(x).sum().backward()
    assert forced_rule_backend.applied == 1
    ref = FrozenTail(lambda h: approx_activation(h, "gelu") * (_trunc(h) - h + 1))
    ref.load_state_dict(model.state_dict())
    ref(x).sum().backward()
    torch.testing.assert_close(model.fc1.weight.grad, ref.fc1.weight.grad, rtol=1e-5, atol=1e-5)
