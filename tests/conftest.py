"""Shared fixtures and the one helper every end-to-end test climbs through."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

import approxbp_fx
from approxbp_fx import ApproxBPConfig, saved_activation_bytes
from benchmarks._forms import ACT_FORMS, NORM_FORMS  # noqa: F401  (re-exported: tests import them from here)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


class MLP(nn.Module):
    """linear -> activation -> [dropout] -> linear, the block every test uses."""

    def __init__(self, act, d=64, hidden=200, frozen_second=False, dropout=0.0):
        super().__init__()
        self.fc1 = nn.Linear(d, hidden)
        self.act = act
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, d)
        self.fc2.requires_grad_(not frozen_second)

    def forward(self, x):
        return self.fc2(self.drop(self.act(self.fc1(x))))


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Every compile starts cold and runs the partitioner.

    Tests compile many models of one class: dynamo's per-code caches are reset
    so they neither hit the recompile limit nor leak state between tests.
    AOTAutograd's cache (persistent across processes, so across CI runs) would
    serve a graph compiled earlier without calling the partitioner, so the
    rewrite counters would stay at zero; it is off here. The backend keeps it
    off by itself when a report or the log is asked for, which
    test_logging.py checks with the cache on. Inductor's code cache, which
    runs after partitioning, stays on.
    """
    from torch._functorch import config as functorch_config

    torch._dynamo.reset()
    counters.clear()
    with functorch_config.patch(enable_autograd_cache=False):
        yield
    torch._dynamo.reset()


# The config a test gets when it names none. Most tests exercise the rules
# themselves, measured against inductor's default partition. Under the
# product's default, recompute="auto", a site whose consumer is trainable
# often goes to pointwise recompute instead (fewer bytes, no rewrite): tests
# of that choice pass ApproxBPConfig() explicitly.
RULES_VS_INDUCTOR = ApproxBPConfig(recompute="banned")


def compiled(model, tier: str, cfg: ApproxBPConfig | None = None, reports: list | None = None, dynamic=None):
    """``model`` at one rung of the climb: eager -> aot_eager -> inductor -> approxbp.

    ``cfg`` None: :data:`RULES_VS_INDUCTOR`. ``dynamic`` is ``torch.compile``'s
    (None: automatic dynamic).
    """
    cfg = RULES_VS_INDUCTOR if cfg is None else cfg
    on_report = reports.append if reports is not None else None
    if tier == "eager":
        return model
    if tier == "inductor":
        return torch.compile(model, backend="inductor", dynamic=dynamic)
    if tier == "aot_eager":
        backend = approxbp_fx.backend(cfg, compiler="aot_eager", on_report=on_report)
        return torch.compile(model, backend=backend, dynamic=dynamic)
    if tier == "approxbp":
        return torch.compile(model, backend=approxbp_fx.backend(cfg, on_report=on_report), dynamic=dynamic)
    raise ValueError(tier)


def forced_rule_backend(rule, cfg: ApproxBPConfig | None = None):
    """A torch.compile backend that applies ``rule`` to every site it can, paying or not.

    AOTAutograd with ``rule.rewrite`` on the joint graph, then the min-cut
    partitioner, graphs run op by op: the
    rewrite's numerics, separated from the profitability decision. The number
    of sites rewritten in the last compile is left in ``forced_rule_backend.applied``.
    """
    from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd

    cfg = cfg or ApproxBPConfig()

    def partition(gm, joint_inputs, **kwargs):
        forced_rule_backend.applied = rule.rewrite(gm, cfg)
        return min_cut_rematerialization_partition(gm, joint_inputs, **kwargs)

    run = lambda gm, _: make_boxed_func(gm.forward)  # noqa: E731
    return aot_autograd(fw_compiler=run, bw_compiler=run, partition_fn=partition)


def saved_bytes(model, tier, *args, cfg=None, reports=None, autocast=None):
    fn = compiled(model, tier, cfg, reports)
    if autocast is None:
        return saved_activation_bytes(fn, *args, params=model)
    with torch.autocast("cpu", dtype=autocast):
        return saved_activation_bytes(fn, *args, params=model)


def rewrites(rule: str = "save_act_codes") -> int:
    return counters["approxbp"][rule]


def kept_exact(rule: str = "save_act_codes") -> int:
    return counters["approxbp"][f"{rule}_kept_exact"]


# --------------------------------------------------------------------------- norms (share_norm_input)


class NormBlock(nn.Module):
    """``h = x + fc0(x); out = h + fc(norm(h))``: a pre-norm residual block."""

    def __init__(self, norm, d=64):
        super().__init__()
        self.fc0 = nn.Linear(d, d)
        self.norm = norm
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        h = x + self.fc0(x)
        return h + self.fc(self.norm(h))


def norm_sites(reports) -> list:
    """The share_norm_input decisions of every report, in graph order."""
    return [d for r in reports for d in r.sites if d.rule == "share_norm_input"]


@pytest.fixture
def partitioner_hook():
    """Inductor's custom_partitioner_fn and pre_grad_custom_pass (all that
    approxbp_fx.enable() changes), put back after the test whatever it installed."""
    from torch._inductor import config as inductor_config

    before = inductor_config.custom_partitioner_fn, inductor_config.pre_grad_custom_pass
    yield
    inductor_config.custom_partitioner_fn, inductor_config.pre_grad_custom_pass = before
