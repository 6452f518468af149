"""The eager reference: packing, the step derivative, and its autograd Function."""

from __future__ import annotations

import pytest
import torch

from approxbp_fx import table
from approxbp_fx.activations import ACTIVATIONS, exact_forward
from approxbp_fx.codes import pack_codes, step_derivative, unpack_levels
from approxbp_fx.eager import ApproxActivation, approx_activation


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("numel", [1, 7, 1023])
def test_pack_then_unpack_gives_the_step_derivative(bits, numel):
    tab = table("gelu", bits)
    x = torch.randn(numel) * 4
    codes = pack_codes(x, tab.thresholds, bits)
    assert codes.dtype == torch.uint8 and codes.numel() == -(-numel // (8 // bits))
    torch.testing.assert_close(unpack_levels(codes, tab.levels, bits, numel), step_derivative(x, tab))


@pytest.mark.parametrize(
    "family, inner, ends",
    # One x inside each of the two inner cells, and the end levels: the paper's
    # (knots -3.17, 0, 3.17) are 0 and 1; the fitted ones' (knots -0.499, 0, 0.499)
    # are E[GELU' | x < -0.499] and E[GELU' | x > 0.499].
    [("paper", (-1.0, 1.0), (0.0, 1.0)), ("fitted", (-0.25, 0.25), (-0.0464, 1.0464))],
)
def test_step_derivative_values_by_hand(family, inner, ends):
    tab = table("gelu", 2, family)
    x = torch.tensor([-10.0, *inner, 10.0, float("nan")])
    lv = tab.levels
    assert step_derivative(x, tab).tolist() == pytest.approx([lv[0], lv[1], lv[2], lv[3], lv[0]])
    assert (lv[0], lv[-1]) == pytest.approx(ends, abs=1e-4)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_function_forward_exact_backward_step(activation, dtype):
    x = (torch.randn(3, 5, 7) * 3).to(dtype).transpose(0, 2).requires_grad_(True)
    y = approx_activation(x, activation, bits=2)
    torch.testing.assert_close(y, exact_forward(activation, x.detach()))
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    want = (g.float() * step_derivative(x.detach(), table(activation, 2))).to(dtype)
    torch.testing.assert_close(gx, want)


def test_double_backward_raises_instead_of_lying():
    # The step derivative has no useful second derivative; create_graph must
    # not hand back a graph that claims one.
    x = torch.randn(8, requires_grad=True)
    w = torch.randn(8, requires_grad=True)
    y = ApproxActivation("silu")(x)
    (gx,) = torch.autograd.grad((y * w).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        gx.sum().backward()


def test_saves_only_codes():
    x = torch.randn(1000, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        approx_activation(x * 1.0, "gelu", 2)
    # The packed codes, and the 0-d non-finite flag (1 byte).
    assert [(t.dtype, t.numel()) for t in saved] == [(torch.uint8, 250), (torch.bool, 1)]
    assert not saved[1].item()


# --- MS-BP in eager form ---------------------------------------------------

from torch import nn  # noqa: E402

from approxbp_fx.measure import saved_activation_bytes  # noqa: E402
from approxbp_fx.eager import MSNorm, ms_norm, swap_modules  # noqa: E402


def _norm_ref(kind, x, w, b, ndim, eps):
    shape = x.shape[-ndim:]
    if kind == "layer_norm":
        return torch.nn.functional.layer_norm(x, shape, w, b, eps)
    return torch.nn.functional.rms_norm(x, shape, w, eps)


@pytest.mark.parametrize("kind", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("ndim", [1, 2])
@pytest.mark.parametrize("affine", [True, False])
def test_ms_norm_matches_the_exact_norm_in_float64(kind, ndim, affine):
    torch.manual_seed(0)
    x = (torch.randn(3, 5, 6, dtype=torch.float64) * 2 + 1).requires_grad_(True)
    shape = x.shape[-ndim:]
    # |γ| bounded away from 0: backward divides by it.
    w = (torch.rand(shape, dtype=torch.float64) + 0.5).requires_grad_(True) if affine else None
    b = torch.randn(shape, dtype=torch.float64).requires_grad_(True) if affine and kind == "layer_norm" else None
    y = ms_norm(x, kind, ndim, w, b, 1e-5)
    want = _norm_ref(kind, x, w, b, ndim, 1e-5)
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
    ins = [t for t in (x, w, b) if t is not None]
    go = torch.randn_like(y)
    for got, exp in zip(torch.autograd.grad(y, ins, go), torch.autograd.grad(want, ins, go)):
        torch.testing.assert_close(got, exp, rtol=1e-10, atol=1e-10)


def test_ms_norm_bf16_gradient_is_close_to_exact():
    torch.manual_seed(0)
    x32 = torch.randn(64, 256)
    ln = nn.LayerNorm(256)
    x = x32.bfloat16().requires_grad_(True)
    y = ms_norm(x, "layer_norm", 1, ln.weight, ln.bias)
    assert y.dtype == torch.bfloat16
    g = torch.randn(64, 256)
    (gx,) = torch.autograd.grad(y, x, g.bfloat16())
    xr = x32.bfloat16().float().requires_grad_(True)
    (want,) = torch.autograd.grad(torch.nn.functional.layer_norm(xr, (256,), ln.weight, ln.bias), xr, g.bfloat16().float())
    cos = torch.nn.functional.cosine_similarity(gx.float().flatten(), want.flatten(), dim=0)
    assert cos > 0.999


def test_ms_norm_rejects_unknown_kind():
    with pytest.raises(ValueError, match="kind must be"):
        ms_norm(torch.randn(2, 3), "batch_norm", 1)


class _Block(nn.Module):
    def __init__(self, d=64):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1, self.act, self.fc2 = nn.Linear(d, 3 * d), nn.GELU(), nn.Linear(3 * d, d)

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


@pytest.mark.parametrize("dtype,autocast", [(torch.bfloat16, False), (torch.float32, True)], ids=["bf16", "autocast"])
def test_swap_modules_shares_the_norm_output_and_saves_codes(dtype, autocast):
    torch.manual_seed(0)
    model = _Block().to(dtype)
    x = torch.randn(2, 37, 64, dtype=dtype, requires_grad=True)
    params_before = list(model.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        plain = saved_activation_bytes(model, x)
        assert swap_modules(model) == {"layer_norm": 1, "gelu": 1}
        swapped = saved_activation_bytes(model, x)
    # The same Parameter objects: an optimiser built before the swap still trains them.
    assert [id(p) for p in model.parameters()] == [id(p) for p in params_before]
    assert isinstance(model.norm, MSNorm)
    tokens, d = 2 * 37, 64
    # Saved after the swap: the norm output (bf16, shared with fc1), r (fp32 a row),
    # fc1's output codes (2 bits) and its non-finite flag (1 byte), the GELU
    # output (bf16, fc2's input).
    want = tokens * d * 2 + tokens * 4 + tokens * 3 * d // 4 + 1 + tokens * 3 * d * 2
    assert swapped == want
    assert swapped < plain


def test_swap_modules_recognises_hf_classes():
    from transformers.activations import ACT2FN
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    model = nn.Sequential(ACT2FN["gelu_new"], ACT2FN["silu"], ACT2FN["gelu"], LlamaRMSNorm(8), nn.RMSNorm(8), nn.ReLU())
    assert swap_modules(model) == {"gelu_tanh": 1, "silu": 1, "gelu": 1, "rms_norm": 2}
    assert isinstance(model[5], nn.ReLU)
    assert model[3].eps == pytest.approx(1e-6)
