"""partition.py: one owner per node, no compile that fails where inductor's succeeds, a cache that hits."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import approxbp_fx
from approxbp_fx.passes import RULES
from approxbp_fx import lowering
from approxbp_fx.report import ApproxBPFallbackWarning
from tests.conftest import MLP, compiled

ROOT = Path(__file__).resolve().parents[1]


def _run(model, tier, x, reports=None):
    torch._dynamo.reset()
    model.zero_grad(set_to_none=True)
    out = compiled(model, tier, reports=reports)(x)
    out.sum().backward()
    return out, [p.grad for p in model.parameters() if p.requires_grad]


def _model_and_input():
    torch.manual_seed(0)
    return MLP(nn.GELU(), frozen_second=True), torch.randn(3, 37, 64)


def test_two_sites_that_share_nodes_get_one_owner(monkeypatch):
    # The activation found twice, once more under another input name: the second
    # would rewrite the gradient the first already rewrote (the KeyError of
    # issue 12). It stays exact, with the reason.
    rule = RULES["save_act_codes"]

    def twice(gm, cfg):
        sites = rule.find_sites(gm, cfg)
        return sites + [dataclasses.replace(s, x=s.closure[1]) for s in sites]

    monkeypatch.setitem(RULES, rule.name, dataclasses.replace(rule, find_sites=twice))
    model, x = _model_and_input()
    reports = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", ApproxBPFallbackWarning)
        ours, grads = _run(model, "approxbp", x, reports)
    first, second = [d for r in reports for d in r.sites]
    assert first.rewritten and not second.rewritten
    assert second.reason == f"shares nodes with the gelu site at {first.site.key} (one owner per node)"


def test_two_activations_reading_one_gradient_are_both_rewritten():
    # gelu(a) + silu(b): both backwards read the same incoming gradient, which
    # is no conflict; only nodes a rewrite replaces have one owner.
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.out = nn.Linear(64, 96), nn.Linear(64, 96), nn.Linear(96, 8)
            self.out.requires_grad_(False)

        def forward(self, x):
            return self.out(nn.functional.gelu(self.a(x)) + nn.functional.silu(self.b(x)))

    reports = []
    _run(Two(), "approxbp", torch.randn(3, 37, 64), reports)
    assert sorted((d.site.op, d.rewritten) for r in reports for d in r.sites) == [("gelu", True), ("silu", True)]


@pytest.mark.parametrize("where", ["find_sites", "predict", "apply_site", "lowering"])
def test_an_internal_error_compiles_the_graph_exactly_and_warns(monkeypatch, where):
    model, x = _model_and_input()
    theirs, their_grads = _run(model, "inductor", x)

    def broken(*args, **kwargs):
        raise KeyError("mul_9")

    if where == "lowering":  # after the cut, on the partition kept
        monkeypatch.setattr(lowering, "lower", broken)
    else:
        rule = RULES["save_act_codes"]
        monkeypatch.setitem(RULES, rule.name, dataclasses.replace(rule, **{where: broken}))
    reports = []
    with pytest.warns(ApproxBPFallbackWarning, match="KeyError: 'mul_9'"):
        ours, our_grads = _run(model, "approxbp", x, reports)
    assert torch.equal(ours, theirs)
    for a, b in zip(our_grads, their_grads):
        assert torch.equal(a, b)
    (report,) = reports
    assert report.final_bytes == report.baseline_bytes > 0
    assert all(not d.rewritten and "internal error" in d.reason for d in report.sites)
    assert len(report.sites) == (0 if where == "find_sites" else 1)


def test_no_futurewarning_from_copying_graphs():
    # Plain inductor prints none; deep-copying the joint graph's pytree codegen did, once per compile.
    model, x = _model_and_input()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _run(model, "approxbp", x)
    assert not [w for w in caught if issubclass(w.category, FutureWarning)], [str(w.message) for w in caught]


_CACHE_PROBE = textwrap.dedent(
    """
    import torch
    from torch import nn
    from torch._dynamo.utils import counters
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 40), nn.GELU(), nn.Linear(40, 16))
    m[2].requires_grad_(False)
    x = torch.randn(3, 16)
    out = torch.compile(m, backend="approxbp")(x)
    out.sum().backward()
    c = counters["aot_autograd"]
    print(c["autograd_cache_hit"], c["autograd_cache_miss"], out.sum().item(), m[0].weight.grad.sum().item())
    """
)


def test_a_second_process_reuses_the_compile_cache(tmp_path):
    # AOTAutograd's key hashed the pickled partitioner, whose config held
    # frozensets (pickled in hash-seed order): every process missed.
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    env.pop("PYTHONHASHSEED", None)
    runs = []
    for _ in range(2):
        proc = subprocess.run(
            [sys.executable, "-c", _CACHE_PROBE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append(proc.stdout.split())
    (hit1, miss1, *result1), (hit2, miss2, *result2) = runs
    assert (hit1, miss1) == ("0", "1") and (hit2, miss2) == ("1", "0")
    assert result1 == result2
