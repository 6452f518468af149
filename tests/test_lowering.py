"""approxbp_fx/lowering.py: after the cut, the custom ops become aten ops, element for element the same."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx

import approxbp_fx
from approxbp_fx import ApproxBPConfig, table
import approxbp_fx.partition
from approxbp_fx import lowering
from tests.conftest import MLP

_OPS = (torch.ops.approxbp.act_pack.default, torch.ops.approxbp.code_grad.default)


def _uses_ops(gm) -> int:
    return sum(n.target in _OPS for n in gm.graph.nodes)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("numel", [1, 7, 64, 1001])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("poison", [None, "nan", "inf", "-inf"])
def test_lowered_graph_matches_the_ops_bit_for_bit(bits, numel, dtype, poison):
    tab = table("gelu", bits)
    thr, lvl = list(tab.thresholds), list(tab.levels)

    def f(x, g):
        codes, flag = torch.ops.approxbp.act_pack(x, thr, bits)
        return codes, flag, torch.ops.approxbp.code_grad(g, codes, flag, lvl, bits, dtype)

    x = torch.randn(numel, dtype=dtype) * 4
    x[numel // 2] = thr[len(thr) // 2]  # a value on a threshold
    if poison:
        x[-1] = float(poison)  # NaN's and -inf's code is 0, +inf's the top, on every path; the flag is set
    g = torch.randn(numel, dtype=dtype)
    gm = make_fx(f, tracing_mode="symbolic")(x, g)
    assert _uses_ops(gm) == 2
    assert lowering.lower(gm) == 2
    assert _uses_ops(gm) == 0
    (codes, flag, dx), (codes0, flag0, dx0) = gm(x, g), f(x, g)
    # Codes, flag and gradient are integer logic and one float32 multiply: exact
    # on every processor (no transcendental function is involved any more: the
    # activation's output is the graph's own, never the op's).
    torch.testing.assert_close(codes, codes0, rtol=0, atol=0)
    assert flag.dtype == torch.bool and flag.dim() == 0 and flag.item() == flag0.item() == (poison is not None)
    torch.testing.assert_close(dx, dx0, rtol=0, atol=0, equal_nan=True)
    assert dx.isnan().all() if poison else dx.isfinite().all()


@pytest.mark.parametrize("lowering", ["inductor", "kernels"])
def test_compiled_graphs_hold_the_ops_only_when_asked(lowering, monkeypatch):
    # Spy on what the partitioner hands inductor, read before inductor's own
    # passes touch the graphs (they drop placeholder metadata).
    seen = []
    real = approxbp_fx.partition.ApproxBPPartitioner.__call__

    def spy(self, gm, joint_inputs, **kwargs):
        fw, bw = real(self, gm, joint_inputs, **kwargs)
        vals = [n.meta.get("val") for n in bw.graph.nodes if n.op == "placeholder"]
        dtypes = [v.dtype for v in vals if isinstance(v, torch.Tensor)]
        seen.append((_uses_ops(fw), _uses_ops(bw), dtypes.count(torch.uint8), dtypes.count(torch.bool)))
        return fw, bw

    monkeypatch.setattr(approxbp_fx.partition.ApproxBPPartitioner, "__call__", spy)
    torch.manual_seed(0)
    model = MLP(nn.GELU(), frozen_second=True).bfloat16()
    x = torch.randn(4, 33, 64, dtype=torch.bfloat16, requires_grad=True)
    fn = torch.compile(model, backend=approxbp_fx.backend(ApproxBPConfig(act_lowering=lowering)))
    fn(x).float().sum().backward()
    expected = 1 if lowering == "kernels" else 0
    # Either way backward reads the codes and the flag, not the activation's
    # input: one uint8 and one bool tensor cross the cut.
    assert seen == [(expected, expected, 1, 1)]


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


def test_one_trace_serves_every_call_of_a_signature(monkeypatch):
    # Two identical blocks: each op is traced once and copied for the second
    # block (with fresh fake values), and the gradients stay the kernels' bit for bit.
    traced = []
    real = lowering._trace
    monkeypatch.setattr(lowering, "_trace", lambda fn, vals: traced.append(fn) or real(fn, vals))
    grads = {}
    for act_lowering in ("kernels", "inductor"):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = nn.Sequential(MLP(nn.GELU(), frozen_second=True), MLP(nn.GELU(), frozen_second=True)).bfloat16()
        x = torch.randn(3, 37, 64, dtype=torch.bfloat16, requires_grad=True)
        fn = torch.compile(model, backend=approxbp_fx.backend(ApproxBPConfig(act_lowering=act_lowering)))
        fn(x).float().square().sum().backward()
        grads[act_lowering] = [x.grad, *(p.grad for p in model.parameters() if p.grad is not None)]
    assert len(traced) == 2  # act_pack once, code_grad once, for four calls
    for a, b in zip(grads["kernels"], grads["inductor"], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
