"""Data parallel training on CPU: two gloo ranks, the ``approxbp`` backend in each.

One spawn of two processes runs every wrapping in turn (the spawn, the
imports and the process group cost more than any one compile), and leaves
each rank's gradients and partitioner reports in a file. The oracle is one
process running the same compiled backend on the whole batch: with equal
halves, DDP's average of the two ranks' mean-loss gradients is the gradient
of the whole batch's mean loss, so they agree to fp32 rounding. That holds
only while both runs make the same approximation: every GELU rewritten in
both (a norm site kept exact changes nothing, MS-BP being exact).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import approxbp_fx
from tests.conftest import MLP, RULES_VS_INDUCTOR, NormBlock

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

WORLD = 2
D, HIDDEN = 64, 4096  # fc1 and fc2 hold 1 MiB each: DDP's 1 MiB buckets end between layers
WRAPPINGS = ("ddp_of_compiled", "compiled_ddp", "fsdp2")


class _Net(nn.Module):
    """Pre-norm residual block, then LayerNorm -> wide GELU MLP."""

    def __init__(self):
        super().__init__()
        self.block = NormBlock(nn.LayerNorm(D), D)
        self.norm = nn.LayerNorm(D)
        self.mlp = MLP(nn.GELU(), d=D, hidden=HIDDEN)

    def forward(self, x):
        h = self.block(x)
        return h + self.mlp(self.norm(h))


def _net_and_batch():
    torch.manual_seed(0)
    net = _Net()
    return net, torch.randn(8, 7, D, generator=torch.Generator().manual_seed(1))


def _wrap(kind: str, net: nn.Module, backend):
    if kind == "ddp_of_compiled":  # DDPOptimizer splits this one too: dynamo sees DDP's forward active
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(torch.compile(net, backend=backend))
    if kind == "compiled_ddp":  # dynamo's DDPOptimizer splits the graph at bucket boundaries
        from torch.nn.parallel import DistributedDataParallel as DDP

        # 1 MiB: DDPOptimizer refuses buckets below its 1 MiB first bucket
        # ("First bucket should be smaller/equal to other buckets").
        return torch.compile(DDP(net, bucket_cap_mb=1), backend=backend)
    if kind == "fsdp2":  # shard first, then compile the root
        from torch.distributed.fsdp import fully_shard

        for sub in (net.block, net.mlp):
            fully_shard(sub)
        fully_shard(net)
        return torch.compile(net, backend=backend)
    raise ValueError(kind)


def _worker(rank: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=WORLD)
    results = {}
    for kind in WRAPPINGS:
        torch._dynamo.reset()
        net, x = _net_and_batch()
        reports = []
        try:
            model = _wrap(kind, net, approxbp_fx.backend(RULES_VS_INDUCTOR, on_report=reports.append))
            model(x.chunk(WORLD)[rank]).pow(2).mean().backward()
            # FSDP2 leaves each rank a DTensor shard; full_tensor() all-gathers it.
            grads = {n: p.grad.full_tensor() if kind == "fsdp2" else p.grad for n, p in net.named_parameters()}
            graphs = [[(d.rule, d.rewritten, d.reason) for d in r.sites] for r in reports]
            results[kind] = {"grads": grads, "graphs": graphs}
        except Exception as e:  # each test reports its own wrapping's failure
            results[kind] = {"error": f"{type(e).__name__}: {e}"}
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Each rank's results, keyed by wrapping."""
    out = tmp_path_factory.mktemp("ranks")
    # Results go through files: a queue's pipe fills with the gradients and
    # blocks the worker while the parent waits in join().
    mp.spawn(_worker, args=(str(out / "init"), str(out)), nprocs=WORLD)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


@pytest.fixture(scope="module")
def single_process():
    """Gradients and reports of the same backend on the whole batch, in this process."""
    torch._dynamo.reset()
    net, x = _net_and_batch()
    reports = []
    torch.compile(net, backend=approxbp_fx.backend(RULES_VS_INDUCTOR, on_report=reports.append))(x).pow(2).mean().backward()
    return {n: p.grad for n, p in net.named_parameters()}, reports


def _check(ranks, single_process, kind):
    ref, _ = single_process
    for r, res in enumerate(ranks):
        assert "error" not in res[kind], res[kind].get("error")
        got = res[kind]["grads"]
        assert got.keys() == ref.keys()
        for name, g in ref.items():
            torch.testing.assert_close(got[name], g, rtol=1e-5, atol=1e-6, msg=lambda m: f"rank {r} {name}: {m}")
    assert ranks[1][kind]["graphs"] == ranks[0][kind]["graphs"]  # every rank compiles and rewrites alike
    return ranks[0][kind]["graphs"]


def _rewritten(graph, rule):
    return sum(1 for site_rule, done, _ in graph if site_rule == rule and done)


def test_single_process_oracle_rewrites_every_site(single_process):
    _, reports = single_process
    (report,) = reports
    decisions = [(d.rule, d.rewritten) for d in report.sites]
    assert sorted(decisions) == [("save_act_codes", True), ("share_norm_input", True), ("share_norm_input", True)]


def test_ddp_of_compiled_module_matches_single_process(ranks, single_process):
    # DDP(torch.compile(net)) is split as well: dynamo finds the DDP module
    # whose forward is running and applies DDPOptimizer with DDP's buckets.
    # Default buckets: 1 MiB first (fc2, walking backwards), 25 MiB after, so
    # [block, norm, fc1, gelu] [fc2, +]: every site sits in the first graph.
    graphs = _check(ranks, single_process, "ddp_of_compiled")
    assert len(graphs) == 2, graphs
    assert [_rewritten(g, "save_act_codes") for g in graphs] == [1, 0]
    assert [_rewritten(g, "share_norm_input") for g in graphs] == [2, 0]


def test_compiled_ddp_splits_at_buckets_and_matches_single_process(ranks, single_process):
    # DDPOptimizer cuts at 1 MiB buckets, walking the parameters backwards:
    # [block, norm] [fc1, gelu] [fc2, +]. GELU's code and fc2's saved input
    # sit in different graphs and the rewrite still pays; the last LayerNorm's
    # consumer fc1 is in the next graph, so no graph of its own saves its
    # output and it stays exact, which costs no accuracy (MS-BP is exact).
    graphs = _check(ranks, single_process, "compiled_ddp")
    assert len(graphs) == 3, graphs
    assert [_rewritten(g, "save_act_codes") for g in graphs] == [0, 1, 0]
    assert [_rewritten(g, "share_norm_input") for g in graphs] == [1, 0, 0]
    kept = [why for g in graphs for rule, done, why in g if rule == "share_norm_input" and not done]
    assert kept == ["no consumer saves the normalised output: nothing to share"]


def test_fsdp2_fully_shard_then_compile_matches_single_process(ranks, single_process):
    # Dynamo breaks the graph at every fully_shard module (skip_fsdp_hooks):
    # [block] [norm] [mlp] [+]. The norm alone in its graph stays exact.
    graphs = _check(ranks, single_process, "fsdp2")
    assert len(graphs) == 4, graphs
    assert [_rewritten(g, "save_act_codes") for g in graphs] == [0, 0, 1, 0]
    assert [_rewritten(g, "share_norm_input") for g in graphs] == [1, 0, 0, 0]
