"""The ``approxbp_fx`` logger: one INFO summary per joint graph, one DEBUG line per site.

The partitioner (aot_eager tier: the same :class:`ApproxBPPartitioner` as the
product, without inductor's code generation) is where the lines come from, so
the numbers are checked against the :class:`GraphReport` it hands ``on_report``.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from approxbp_fx import ApproxBPConfig
from tests.conftest import compiled

LOGGER = "approxbp_fx"
SUMMARY = re.compile(
    r"approxbp: sites found (\d+), rewritten (\d+), kept exact (\d+) "
    # fused_attention: a CUDA-only stage, 0/0 on these CPU graphs.
    r"\(fused_attention 0/0, save_act_codes (\d+)/(\d+), share_norm_input (\d+)/(\d+), pack_bool_masks (\d+)/(\d+)\); "
    r"saved activation bytes (\d+) -> (\d+) \((\d+\.\d+)x\); pointwise recompute (?:banned|allowed)"
)
SITE = re.compile(r"approxbp: (\w+) (rewrote|kept exact) (\w+) at (\w+) \[[\d, ]*\]: (.*); site saved bytes (\d+) -> (\d+)")


class TwoGraphs(nn.Module):
    """LayerNorm -> GELU MLP, a graph break, then a SiLU MLP: two joint graphs.

    With ``activations={"gelu"}`` the SiLU site is skipped for a config
    reason, so the DEBUG lines carry both a rewrite and a skip.
    """

    def __init__(self, d=32, hidden=64):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, d)
        self.fc3, self.fc4 = nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x):
        h = x + self.fc2(F.gelu(self.fc1(self.norm(x))))
        torch._dynamo.graph_break()
        return h + self.fc4(F.silu(self.fc3(h)))


# recompute="banned": under "auto" the first graph would take recompute over both rewrites (fewer
# bytes), and these lines are about sites that were rewritten.
CFG = ApproxBPConfig(activations={"gelu"}, recompute="banned")


def _train_step(reports):
    torch.manual_seed(0)
    model = TwoGraphs()
    compiled(model, "aot_eager", CFG, reports)(torch.randn(3, 11, 32)).sum().backward()


def _records(caplog, level):
    return [r for r in caplog.records if r.name == LOGGER and r.levelno == level]


def test_one_info_summary_per_joint_graph_matching_the_report(caplog):
    reports = []
    with caplog.at_level(logging.INFO, logger=LOGGER):
        _train_step(reports)
    infos = _records(caplog, logging.INFO)
    assert len(reports) == 2  # the graph break makes two joint graphs
    assert len(infos) == len(reports), [r.getMessage() for r in infos]
    assert not _records(caplog, logging.DEBUG)  # INFO does not switch DEBUG on
    for record, report in zip(infos, reports):
        m = SUMMARY.fullmatch(record.getMessage())
        assert m, record.getMessage()
        found, done, kept, act_done, acts, norm_done, norms, mask_done, masks, base, final = map(int, m.groups()[:11])
        assert (found, done, kept) == (
            len(report.sites),
            sum(d.rewritten for d in report.sites),
            sum(not d.rewritten for d in report.sites),
        )
        per_rule = {"save_act_codes": (act_done, acts), "share_norm_input": (norm_done, norms), "pack_bool_masks": (mask_done, masks)}
        for rule, counts in per_rule.items():
            sites = [d for d in report.sites if d.rule == rule]
            assert counts == (sum(d.rewritten for d in sites), len(sites)), rule
        assert (base, final) == (report.baseline_bytes, report.final_bytes)
        assert float(m[12]) == pytest.approx(final / base, abs=5e-4)
    # The numbers are not trivially zero: the first graph rewrote its GELU and
    # LayerNorm and saved fewer bytes, the second kept its SiLU exact.
    first, second = (SUMMARY.fullmatch(r.getMessage()) for r in infos)
    assert int(first[2]) == 2 and int(first[11]) < int(first[10])
    assert (int(second[1]), int(second[2])) == (1, 0)


def test_debug_line_per_site_names_rule_key_reason_and_bytes(caplog):
    reports = []
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        _train_step(reports)
    lines = [SITE.fullmatch(r.getMessage()) for r in _records(caplog, logging.DEBUG)]
    assert all(lines), [r.getMessage() for r in _records(caplog, logging.DEBUG)]
    decisions = [d for r in reports for d in r.sites]
    assert len(lines) == len(decisions) == 3
    for m, d in zip(lines, decisions):
        assert m[1] == d.rule and m[3] == d.site.op and m[4] == d.site.key
        assert m[2] == ("rewrote" if d.rewritten else "kept exact")
        assert m[5] == d.reason and (int(m[6]), int(m[7])) == (d.bytes_before, d.bytes_after)
    skipped = [m for m in lines if m[2] == "kept exact"]
    assert [(m[3], m[5]) for m in skipped] == [("silu", "silu is not in ApproxBPConfig.activations")]
    # The summaries still come, once per graph, alongside.
    assert len(_records(caplog, logging.INFO)) == 2


def test_nothing_is_logged_when_the_logger_is_off(caplog):
    # WARNING is the inherited default: the partitioner must not emit, at any level.
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        _train_step([])
    assert not [r for r in caplog.records if r.name == LOGGER]


def test_torch_logs_turns_the_logger_on():
    # TORCH_LOGS accepts any importable module name ("+" means DEBUG) and
    # installs torch's handler on it. Torch parses it at import, so this needs
    # its own interpreter; _finish is called directly to skip a compile there.
    code = (
        "import logging, approxbp_fx\n"
        "from approxbp_fx.partition import ApproxBPPartitioner\nfrom approxbp_fx.report import GraphReport\n"
        "ApproxBPPartitioner(approxbp_fx.ApproxBPConfig())._finish(GraphReport(baseline_bytes=100, final_bytes=40))\n"
        "print(logging.getLogger('approxbp_fx').getEffectiveLevel())\n"
    )
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TORCH_LOGS": "+approxbp_fx", "PYTHONPATH": str(root)}
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [str(logging.DEBUG)]
    (m,) = SUMMARY.finditer(out.stderr)
    assert m.groups() == ("0",) * 9 + ("100", "40", "0.400"), out.stderr


@pytest.mark.parametrize("tier", ["aot_eager", "approxbp"])
def test_a_warm_autograd_cache_still_reports_and_logs(tier, caplog):
    # The cache on, as users have it (conftest turns it off for every other
    # test). The first compile warms AOTAutograd's cache (in memory and on
    # disk); a hit would skip the partitioner, and with it the report and the
    # log line, which CI once hit across runs. The backend skips the lookup
    # only when someone is listening.
    from torch._functorch import config as functorch_config

    model = nn.Sequential(nn.Linear(16, 40), nn.GELU(), nn.Linear(40, 16))
    x = torch.randn(5, 16)
    with functorch_config.patch(enable_autograd_cache=True):
        compiled(model, tier)(x).sum().backward()  # nobody listening: may use the cache
        torch._dynamo.reset()
        reports = []
        compiled(model, tier, reports=reports)(x).sum().backward()
        assert [d.rewritten for r in reports for d in r.sites] == [True]
        torch._dynamo.reset()
        with caplog.at_level(logging.INFO, logger=LOGGER):
            compiled(model, tier)(x).sum().backward()
    (info,) = _records(caplog, logging.INFO)
    assert SUMMARY.fullmatch(info.getMessage())
