"""passes/lower_act_codes.py: the custom ops become aten ops, element for element the same."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx

import approxbp_fx
from approxbp_fx import ApproxBPConfig, table
from approxbp_fx.passes import lower_act_codes
from tests.conftest import MLP

_OPS = (torch.ops.approxbp.act_pack.default, torch.ops.approxbp.code_grad.default)


def _uses_ops(gm) -> int:
    return sum(n.target in _OPS for n in gm.graph.nodes)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("numel", [1, 7, 64, 1001])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_lowered_graph_matches_the_ops_bit_for_bit(bits, numel, dtype):
    tab = table("gelu", bits)
    thr, lvl = list(tab.thresholds), list(tab.levels)

    def f(x, g):
        y, codes = torch.ops.approxbp.act_pack(x, "gelu", thr, bits, dtype)
        return y, codes, torch.ops.approxbp.code_grad(g, codes, lvl, bits, dtype)

    x = torch.randn(numel, dtype=dtype) * 4
    x[0] = float("nan")  # NaN's code is 0 on every path
    if numel > 2:
        x[1], x[2] = float("inf"), thr[len(thr) // 2]  # +inf, and a value on a threshold
    g = torch.randn(numel, dtype=dtype)
    gm = make_fx(f, tracing_mode="symbolic")(x, g)
    assert _uses_ops(gm) == 2
    assert lower_act_codes.lower(gm) == 2
    assert _uses_ops(gm) == 0
    (y, codes, dx), (y0, codes0, dx0) = gm(x, g), f(x, g)
    # Codes and gradient are integer logic and one float32 multiply: exact.
    torch.testing.assert_close(codes, codes0, rtol=0, atol=0)
    torch.testing.assert_close(dx, dx0, rtol=0, atol=0, equal_nan=True)
    # y is the activation through inductor's decomposition (erf written out), as
    # inductor computes it anyway: equal to aten's kernel to float32 rounding (1e-6, as test_forward_equals_inductor).
    torch.testing.assert_close(y, y0, equal_nan=True, **({"rtol": 1e-6, "atol": 1e-6} if dtype == torch.float32 else {}))


@pytest.mark.parametrize("lowering", ["inductor", "kernels"])
def test_compiled_graphs_hold_the_ops_only_when_asked(lowering, monkeypatch):
    # Spy on what the partitioner hands inductor, read before inductor's own
    # passes touch the graphs (they drop placeholder metadata).
    seen = []
    real = approxbp_fx.partition.ApproxBPPartitioner.__call__

    def spy(self, gm, joint_inputs, **kwargs):
        fw, bw = real(self, gm, joint_inputs, **kwargs)
        vals = [n.meta.get("val") for n in bw.graph.nodes if n.op == "placeholder"]
        uint8_inputs = sum(isinstance(v, torch.Tensor) and v.dtype == torch.uint8 for v in vals)
        seen.append((_uses_ops(fw), _uses_ops(bw), uint8_inputs))
        return fw, bw

    monkeypatch.setattr(approxbp_fx.partition.ApproxBPPartitioner, "__call__", spy)
    torch.manual_seed(0)
    model = MLP(nn.GELU(), frozen_second=True).bfloat16()
    x = torch.randn(4, 33, 64, dtype=torch.bfloat16, requires_grad=True)
    fn = torch.compile(model, backend=approxbp_fx.backend(ApproxBPConfig(act_lowering=lowering)))
    fn(x).float().sum().backward()
    expected = 1 if lowering == "kernels" else 0
    # Either way backward reads the codes, not the activation's input: one uint8 tensor crosses the cut.
    assert seen == [(expected, expected, 1)]


def test_lowerings_give_the_same_gradients():
    grads = {}
    for lowering in ("kernels", "inductor"):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = MLP(nn.SiLU()).bfloat16()
        x = torch.randn(3, 37, 64, dtype=torch.bfloat16, requires_grad=True)
        fn = torch.compile(model, backend=approxbp_fx.backend(ApproxBPConfig(act_lowering=lowering)))
        fn(x).float().square().sum().backward()
        grads[lowering] = [x.grad, *(p.grad for p in model.parameters())]
    for a, b in zip(grads["kernels"], grads["inductor"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
