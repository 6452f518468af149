"""docs/invariants.md items 4, 5 and 8, checked on every rule's rewritten joint graph.

Each rule is applied unconditionally (``Rule.rewrite``) to the joint graph
AOTAutograd hands a partitioner, and the graph is inspected before it is cut.
"""

from __future__ import annotations

import pytest
import torch
from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
from torch import nn
from torch._dynamo.backends.common import aot_autograd
from torch._inductor.decomposition import select_decomp_table
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils.checkpoint import CheckpointPolicy

from approxbp_fx import ApproxBPConfig
from approxbp_fx.passes import RULES
from tests.conftest import MLP, NormBlock

# rule -> a model with one site of it, every tensor of the block needing a gradient
MODELS = {
    "save_act_codes": lambda: MLP(nn.GELU(), frozen_second=True),
    "share_norm_input": lambda: NormBlock(nn.LayerNorm(64)),
    "pack_bool_masks": lambda: MLP(nn.GELU(), dropout=0.1).train(),
}


def _rewritten_joint(rule_name: str) -> tuple[dict, torch.fx.GraphModule]:
    """(node name -> meta before the rewrite, the rewritten joint graph)."""
    seen = {}

    def partition(gm, joint_inputs, **kwargs):
        seen["before"] = {n.name: dict(n.meta) for n in gm.graph.nodes}
        seen["applied"] = RULES[rule_name].rewrite(gm, ApproxBPConfig())
        seen["gm"] = gm
        return min_cut_rematerialization_partition(gm, joint_inputs, **kwargs)

    run = lambda gm, _: make_boxed_func(gm.forward)  # noqa: E731
    # Inductor's decompositions: the joint graph its partitioner receives (norms as var_mean/rsqrt).
    backend = aot_autograd(fw_compiler=run, bw_compiler=run, partition_fn=partition, decompositions=select_decomp_table())
    torch.manual_seed(0)
    model = MODELS[rule_name]()
    x = torch.randn(3, 37, 64, requires_grad=True)
    torch.compile(model, backend=backend)(x).sum().backward()
    assert seen["applied"] == 1
    return seen["before"], seen["gm"]


@pytest.mark.parametrize("rule_name", list(RULES))
def test_new_nodes_carry_provenance_and_fake_values(rule_name):
    # 4. Metadata travels: the partitioner reads partitioner_tag, debuggers read
    # stack traces and seq_nr; val is recomputed under the graph's fake mode.
    before, gm = _rewritten_joint(rule_name)
    new = [n for n in gm.graph.nodes if n.name not in before and n.op == "call_function"]
    assert new
    for n in new:
        assert n.meta.get("partitioner_tag") in ("is_forward", "is_backward", "must_be_in_backward"), n
        assert "stack_trace" in n.meta and "seq_nr" in n.meta, n
        vals = n.meta["val"] if isinstance(n.meta["val"], (tuple, list)) else [n.meta["val"]]
        assert all(isinstance(v, FakeTensor) for v in vals), n


@pytest.mark.parametrize("rule_name", list(RULES))
def test_the_graph_lints_and_new_ops_alias_nothing(rule_name):
    # 5. No aliasing: new ops return fresh tensors (no alias annotation in
    # their schemas, views of new nodes only), and the graph is well formed.
    _, gm = _rewritten_joint(rule_name)
    gm.graph.lint()
    for n in gm.graph.nodes:
        if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) and n.target.namespace == "approxbp":
            assert all(r.alias_info is None for r in n.target._schema.returns), n.target


def test_norm_rebuilds_are_backward_only_and_the_shared_tensor_must_be_saved():
    # 8. Backward-only rebuilds are tagged; the shared tensor is MUST_SAVE; the
    # activation-checkpoint tags of a replaced node are never copied.
    before, gm = _rewritten_joint("share_norm_input")
    new = [n for n in gm.graph.nodes if n.name not in before and n.op == "call_function"]
    forward_new = [n for n in new if n.meta["partitioner_tag"] != "must_be_in_backward"]
    assert all(n.target is torch.ops.prims.convert_element_type.default for n in forward_new), forward_new
    saved = [n for n in gm.graph.nodes if n.meta.get("recompute") == CheckpointPolicy.MUST_SAVE]
    assert len(saved) == 1 and saved[0].meta["partitioner_tag"] != "must_be_in_backward"
    assert not any("ac_graph_id" in n.meta for n in new)
