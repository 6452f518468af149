"""The partitioner's trial graphs: copies that skip codegen, and a heap frozen while trials run."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.fx as fx

from approxbp_fx.trial_graphs import copy_graph, frozen_heap


def _traced() -> fx.GraphModule:
    return fx.symbolic_trace(lambda x: torch.relu(x) * 2 + 1)


def test_a_copy_generates_no_python_until_someone_reads_it(monkeypatch):
    gm = _traced()
    made = []
    python_code = fx.Graph.python_code
    monkeypatch.setattr(fx.Graph, "python_code", lambda self, *a, **k: made.append(self) or python_code(self, *a, **k))
    out = copy_graph(gm)
    assert made == []  # a plain GraphModule would have generated and exec'd its source here
    assert out.graph is not gm.graph and [n.name for n in out.graph.nodes] == [n.name for n in gm.graph.nodes]
    x = torch.randn(5)
    assert torch.equal(out(x), gm(x)) and made  # made on first call
    assert out.code == gm.code


def test_a_copy_can_be_edited_without_touching_the_original():
    gm = _traced()
    out = copy_graph(gm)
    (relu,) = [n for n in out.graph.nodes if n.target is torch.relu]
    relu.target = torch.sigmoid
    out.recompile()
    x = torch.randn(5)
    assert torch.equal(out(x), torch.sigmoid(x) * 2 + 1) and torch.equal(gm(x), torch.relu(x) * 2 + 1)


class _Cycle:
    def __init__(self) -> None:
        self.me = self


def test_frozen_heap_freezes_what_lives_and_still_collects_new_garbage():
    assert gc.get_freeze_count() == 0
    before = _Cycle()
    with frozen_heap():
        assert gc.get_freeze_count() > 0 and gc.is_tracked(before)
        _Cycle()  # garbage made inside the block: a cycle only the collector frees
        assert gc.collect() >= 1
    assert gc.get_freeze_count() == 0


def test_frozen_heap_leaves_a_process_that_froze_its_own_objects_alone():
    # The freeze count is no witness: frozen objects still die by refcount, so it
    # can fall during the block. A frozen cycle can only die if it was thawed.
    obj = _Cycle()
    cycle = weakref.ref(obj)
    gc.freeze()
    del obj  # now only its own cycle holds it: only the collector frees it
    try:
        with frozen_heap():
            pass
        gc.collect()
        assert cycle() is not None  # an unfreeze in frozen_heap would have let this collect it
    finally:
        gc.unfreeze()
    gc.collect()
    assert cycle() is None  # the test can tell: thawed, the cycle is collected


def test_the_partitioner_runs_its_trials_on_a_frozen_heap_and_thaws_it(monkeypatch):
    import approxbp_fx
    from approxbp_fx.partition import ApproxBPPartitioner

    frozen = []
    partition = ApproxBPPartitioner._partition
    monkeypatch.setattr(
        ApproxBPPartitioner, "_partition", lambda self, *a: frozen.append(gc.get_freeze_count()) or partition(self, *a)
    )
    torch._dynamo.reset()
    lin = torch.nn.Linear(8, 8)
    fn = torch.compile(lambda x: torch.nn.functional.gelu(lin(x)), backend=approxbp_fx.backend())
    fn(torch.randn(4, 8)).sum().backward()
    assert frozen and all(n > 0 for n in frozen)
    assert gc.get_freeze_count() == 0


def _tiny_models():
    transformers = pytest.importorskip("transformers")
    small = dict(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=2)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=61))
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(**small, num_key_value_heads=1, vocab_size=61))
    vit = transformers.ViTForImageClassification(transformers.ViTConfig(**small, image_size=16, patch_size=8))
    ids = torch.randint(0, 61, (2, 9))
    return {"gpt2": (gpt2, (ids,)), "llama": (llama, (ids,)), "vit": (vit, (torch.randn(2, 3, 16, 16),))}


@pytest.mark.parametrize(("name", "recompute"), [("gpt2", "allowed"), ("llama", "banned")])
def test_a_measured_saved_set_is_the_one_the_built_partition_has(monkeypatch, name, recompute):
    # Cut-only runs stand in for inductor's partition wherever it is not returned;
    # each is held here to the partition built in full from the same graph.
    import approxbp_fx
    from approxbp_fx.partition import ApproxBPPartitioner
    from approxbp_fx.passes.graph_bytes import saved_tensors

    checked = []
    exact_partitions = ApproxBPPartitioner._exact_partitions

    def both(self, gm, joint_inputs, kwargs):
        out = exact_partitions(self, gm, joint_inputs, kwargs)
        for mode, e in out.items():
            built = self._partition(copy_graph(gm), joint_inputs, kwargs, mode)
            checked.append((e.result is None, e.saved, saved_tensors(built[1], gm, kwargs["static_lifetime_input_indices"])))
        return out

    monkeypatch.setattr(ApproxBPPartitioner, "_exact_partitions", both)
    torch._dynamo.reset()
    torch.manual_seed(0)
    model, args = _tiny_models()[name]
    model.train()
    fn = torch.compile(model, backend=approxbp_fx.backend(approxbp_fx.ApproxBPConfig(recompute=recompute)))
    out = fn(*args)
    (out.logits.float().sum()).backward()
    assert checked and all(measured for measured, _, _ in checked)
    for _, measured, built in checked:
        assert measured == built
