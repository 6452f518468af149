"""passes/fused_attention.py: the graph before AOTAutograd, checked on CPU.

The pass acts on CUDA graphs only (CUDA's kernel choice is what it fixes), so
these tests call it on dynamo's CPU graph with ``devices=("cpu",)`` and run
the transformed graph against the original.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from approxbp_fx import ApproxBPConfig
from approxbp_fx.passes.fused_attention import keep_fused_attention
from tests.conftest import compiled

B, L, D, H = 2, 37, 64, 4


def _hf_517_mask(x):
    # What transformers 5.17 builds under torch.compile for a model without
    # padding: all True, an expanded view with strides (0, L, 1, 0).
    n = x.shape[1]
    return (torch.arange(n, device=x.device)[None, None, :, None] + 0 >= 0).expand(x.shape[0], -1, n, n)


def _padding_mask(x):
    # Depends on the input: never provably all True. Expanded along the last dim (stride 0).
    return (x[:, None, :, :1] > -10).expand(-1, -1, -1, x.shape[1])


def _random_mask(x):
    n = x.shape[1]
    return (torch.rand(1, 1, n, 1, device=x.device) >= 0).expand(x.shape[0], -1, n, n)


def _contiguous_padding_mask(x):
    return (x[:, None, None, :, 0] > -10).expand(-1, -1, x.shape[1], -1)


class Attention(nn.Module):
    def __init__(self, mask_fn):
        super().__init__()
        self.qkv, self.o, self.mask_fn = nn.Linear(D, 3 * D), nn.Linear(D, D), mask_fn

    def forward(self, x):
        q, k, v = (t.view(B, L, H, D // H).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask_fn(x))
        return self.o(out.transpose(1, 2).reshape(B, L, D))


def _dynamo_graph(model, x) -> torch.fx.GraphModule:
    """Dynamo's graph of ``model(x)``, with the real inputs it takes (lifted parameters, x) as ``gm.inputs``."""
    graphs = []

    def keep(gm, inputs):
        gm.inputs = inputs
        graphs.append(gm)
        return gm.forward

    torch.compile(model, backend=keep, fullgraph=True)(x)
    (gm,) = graphs
    return gm


def _sdpa_mask(gm):
    (node,) = [n for n in gm.graph.nodes if n.target is F.scaled_dot_product_attention]
    return node.kwargs["attn_mask"]


@pytest.mark.parametrize(
    "mask_fn, action",
    [(_hf_517_mask, "drop the mask"), (_padding_mask, "make the mask contiguous"), (_random_mask, "make the mask contiguous")],
    ids=["all-true", "padding", "random"],
)
def test_a_mask_that_would_send_cuda_to_the_math_path_is_fixed_exactly(mask_fn, action):
    torch.manual_seed(0)
    model, x = Attention(mask_fn), torch.randn(B, L, D)
    gm = _dynamo_graph(model, x)
    (decision,) = keep_fused_attention(gm.graph, ApproxBPConfig(), devices=("cpu",))
    gm.recompile()
    assert decision.rewritten and decision.site.action == action and decision.rule == "fused_attention"
    # Predicted: the math path's fp32 probabilities against flash's logsumexp (+ a materialised mask).
    # The same function: on the CPU kernels, bit for bit.
    assert decision.bytes_before == B * H * L * L * 4
    assert decision.bytes_after == B * H * L * 4 + (0 if action == "drop the mask" else B * L * L)
    mask = _sdpa_mask(gm)
    if action == "drop the mask":
        assert mask is None
    else:
        assert mask.target == "contiguous"
    torch.manual_seed(1)
    ours = gm(*gm.inputs)
    torch.manual_seed(1)
    theirs = model(x)
    assert torch.equal(ours[0] if isinstance(ours, (tuple, list)) else ours, theirs)


def test_a_contiguous_input_dependent_mask_is_left_alone():
    gm = _dynamo_graph(Attention(_contiguous_padding_mask), torch.randn(B, L, D))
    assert keep_fused_attention(gm.graph, ApproxBPConfig(), devices=("cpu",)) == []
    assert _sdpa_mask(gm) is not None


def test_cpu_graphs_are_left_alone_and_report_no_site():
    # The CPU's kernels take any mask layout: the pass is for CUDA only.
    model, x = Attention(_hf_517_mask), torch.randn(B, L, D, requires_grad=True)
    reports = []
    compiled(model, "approxbp", reports=reports)(x).sum().backward()
    assert [d for r in reports for d in r.sites if d.rule == "fused_attention"] == []
    gm = _dynamo_graph(model, x)
    assert keep_fused_attention(gm.graph, ApproxBPConfig()) == []
