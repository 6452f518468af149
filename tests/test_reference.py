"""The eager reference: packing, the step derivative, and its autograd Function."""

from __future__ import annotations

import pytest
import torch

from approxbp_fx import table
from approxbp_fx.activations import ACTIVATIONS, exact_forward
from approxbp_fx.reference import ApproxActivation, approx_activation, pack_codes, step_derivative, unpack_levels


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("numel", [1, 7, 1023])
def test_pack_then_unpack_gives_the_step_derivative(bits, numel):
    tab = table("gelu", bits)
    x = torch.randn(numel) * 4
    codes = pack_codes(x, tab.thresholds, bits)
    assert codes.dtype == torch.uint8 and codes.numel() == -(-numel // (8 // bits))
    torch.testing.assert_close(unpack_levels(codes, tab.levels, bits, numel), step_derivative(x, tab))


def test_step_derivative_values_by_hand():
    tab = table("gelu", 2)
    x = torch.tensor([-10.0, -1.0, 1.0, 10.0, float("nan")])
    lv = tab.levels
    assert step_derivative(x, tab).tolist() == pytest.approx([lv[0], lv[1], lv[2], lv[3], lv[0]])
    assert lv[0] == 0.0 and lv[-1] == pytest.approx(1.0)


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
    assert [(t.dtype, t.numel()) for t in saved] == [(torch.uint8, 250)]
