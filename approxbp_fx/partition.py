"""Profitability by measurement: rewrite a site only if the real partitioner saves less.

Inductor's min-cut partitioner decides what the forward saves for backward,
and it already recomputes cheap pointwise ops where it can. Whether swapping
an activation's input for codes pays therefore depends on what the
partitioner would have done, so we ask it:

1. find the candidate sites of every rule in the joint graph (activations
   whose input can become codes, norms whose input can be shared away);
2. partition a copy of the unmodified graph: the baseline saved set;
3. keep the sites whose rewrite is predicted to shrink that set, rewrite a
   copy, partition it again;
4. if a kept site still leaves its input saved, or the total grew, drop the
   offenders and partition once more; if nothing helps, return the baseline.

The result is never larger than inductor's own choice, by construction.
Costs one to three partitioner runs per compiled graph.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence, Union

import torch.fx as fx
from torch._dynamo.utils import counters
from torch._inductor.custom_graph_pass import CustomPartitionerFn, get_hash_for_files

from .config import ApproxBPConfig
from .passes import RULES, lower_act_codes, save_act_codes, share_norm_input
from .passes.graph_bytes import saved_tensors
from .passes.save_act_codes import ActSite
from .passes.share_norm_input import NormSite

log = logging.getLogger("approxbp_fx")

__all__ = ["ApproxBPPartitioner", "SiteDecision", "GraphReport", "saved_tensors"]

Site = Union[ActSite, NormSite]


@dataclass
class SiteDecision:
    """What happened to one site; the raw material of :func:`approxbp_fx.explain`."""

    site: Site
    rewritten: bool
    reason: str
    saved_before: int = 0  # bytes of the site's tensors in inductor's saved set
    saved_after: int = 0  # the same after our choice
    rule: str = "save_act_codes"  # the passes.RULES entry that found it


@dataclass
class GraphReport:
    sites: list[SiteDecision] = field(default_factory=list)
    baseline_bytes: int = 0
    final_bytes: int = 0


def _copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy whose graph a trial may mutate (the partitioner DCEs and tags it).

    Only the graph is copied; attributes (lifted constants) are shared. A
    deepcopy of the module would clone real constant tensors while the
    partitioner's FakeTensorMode is active, which torch refuses (seen on GPT-2
    under PEFT: "set the storage of a tensor on device meta ... cpu").
    """
    out = fx.GraphModule(gm, copy.deepcopy(gm.graph), class_name=type(gm).__name__)
    out.meta = dict(getattr(gm, "meta", {}))
    return out


def find_sites(gm: fx.GraphModule, cfg: ApproxBPConfig) -> list[tuple[str, Site]]:
    """``(rule, site)`` for every candidate of every enabled rule, in rule order."""
    acts = save_act_codes.find_sites(gm, cfg) if cfg.save_act_codes else []
    norms = share_norm_input.find_sites(gm, cfg) if cfg.share_norm_input else []
    # One node, one owner: a norm whose nodes an activation site also rewrites
    # (a norm feeding GELU directly) stays exact rather than being rewritten twice.
    owned = {n for a in acts for n in a.nodes}
    norms = [
        n.with_skip("shares nodes with an activation site") if n.skip is None and n.nodes & owned else n
        for n in norms
    ]
    return [("save_act_codes", s) for s in acts] + [("share_norm_input", s) for s in norms]


def _recompute_patch(cfg: ApproxBPConfig):
    """``cfg.pointwise_recompute`` as functorch's config; a no-op when False (the user's setting stands)."""
    if not cfg.pointwise_recompute:
        return contextlib.nullcontext()
    from torch._functorch import config as functorch_config

    return functorch_config.patch(ban_recompute_materialized_backward=False)


class ApproxBPPartitioner(CustomPartitionerFn):
    """Inductor's partitioner with our rewrites applied where they pay.

    Args:
        cfg: what to rewrite.
        inner: the partitioner to measure with and delegate to; inductor's
            min-cut partitioner when None.
        on_report: called with a :class:`GraphReport` for every joint graph.
    """

    def __init__(
        self,
        cfg: ApproxBPConfig,
        inner: Callable[..., tuple[fx.GraphModule, fx.GraphModule]] | None = None,
        on_report: Callable[[GraphReport], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.inner = inner
        self.on_report = on_report

    def uuid(self) -> Any:
        import approxbp_fx

        files = tuple(sorted(str(p) for p in approxbp_fx._source_files()))
        inner = self.inner.uuid() if isinstance(self.inner, CustomPartitionerFn) else repr(self.inner)
        return (get_hash_for_files(files), self.cfg.key(), inner)

    def _partition(self, gm, joint_inputs, kwargs):
        # The baseline and every trial run under the same setting, so "never
        # more than the baseline" holds against the partitioner actually used.
        with _recompute_patch(self.cfg):
            if self.inner is not None:
                return self.inner(gm, joint_inputs, **kwargs)
            from torch._functorch.partitioners import min_cut_rematerialization_partition

            return min_cut_rematerialization_partition(gm, joint_inputs, **kwargs)

    def __call__(self, gm: fx.GraphModule, joint_inputs: Sequence[object], **kwargs: Any):
        cfg = self.cfg
        sites = find_sites(gm, cfg)
        report = GraphReport()
        static = kwargs.get("static_lifetime_input_indices")
        if not any(s.skip is None for _, s in sites):
            fw, bw = self._partition(gm, joint_inputs, kwargs)
            report.baseline_bytes = report.final_bytes = sum(saved_tensors(bw, gm, static).values())
            report.sites = [SiteDecision(s, False, s.skip or "", rule=r) for r, s in sites]
            self._finish(report)
            return fw, bw

        base_fw, base_bw = self._partition(_copy(gm), joint_inputs, kwargs)
        base_saved = saved_tensors(base_bw, gm, static)
        report.baseline_bytes = sum(base_saved.values())

        decisions: dict[tuple[str, str], SiteDecision] = {}
        for rule, s in sites:
            before = sum(base_saved.get(n, 0) for n in s.tensors)
            d = SiteDecision(s, False, s.skip or "", before, before, rule)
            if s.skip is None:
                predicted, why = RULES[rule].predict(gm, s, base_saved, cfg)
                d.rewritten = predicted < before
                d.reason = why if not d.rewritten else "rewritten"
            decisions[(rule, s.key)] = d

        result = (base_fw, base_bw)
        chosen = {k for k, d in decisions.items() if d.rewritten}
        while chosen:
            trial = _copy(gm)
            # Node names survive deepcopy, so the sites found on gm apply to the copy.
            added: dict[tuple[str, str], set[str]] = {}
            for rule, module in RULES.items():
                todo = [decisions[k].site for k in sorted(chosen) if k[0] == rule]
                for key, names in module.apply_sites(trial, todo, cfg).items():
                    added[(rule, key)] = names
            fw, bw = self._partition(trial, joint_inputs, kwargs)
            saved = saved_tensors(bw, trial, static)
            in_backward = {n.name for n in bw.graph.nodes}
            losers = set()
            for k in chosen:
                d = decisions[k]
                names = d.site.tensors | added[k]
                d.saved_after = sum(b for n, b in saved.items() if n in names)
                if any(n in in_backward for n in d.site.must_leave_backward):
                    why = "measured: backward still reads the input after the rewrite"
                elif d.saved_after >= d.saved_before:
                    why = "measured: the partitioner still saves as much here after the rewrite"
                else:
                    continue
                losers.add(k)
                d.rewritten = False
                d.reason = why
                d.saved_after = d.saved_before
            if not losers and sum(saved.values()) <= report.baseline_bytes:
                result = (fw, bw)
                report.final_bytes = sum(saved.values())
                break
            if not losers:  # total grew although no site did: be safe, keep inductor's graph
                for k in chosen:
                    decisions[k].rewritten = False
                    decisions[k].reason = "measured: total saved bytes grew"
                    decisions[k].saved_after = decisions[k].saved_before
                losers = set(chosen)
            chosen -= losers
        if not chosen:
            report.final_bytes = report.baseline_bytes
        elif cfg.act_lowering == "inductor":
            # The cut is made; from here the ops need not be opaque (lower_act_codes.py).
            for g in result:
                lower_act_codes.lower(g)
        report.sites = list(decisions.values())
        self._finish(report)
        return result

    def _finish(self, report: GraphReport) -> None:
        # Tests assert exact match counts here, as inductor's pattern-matcher tests do.
        per_rule = []
        for rule in RULES:
            mine = [d for d in report.sites if d.rule == rule]
            done = sum(d.rewritten for d in mine)
            counters["approxbp"][rule] += done
            counters["approxbp"][f"{rule}_kept_exact"] += len(mine) - done
            per_rule.append((rule, done, len(mine)))
        # Off by default (the "approxbp_fx" logger inherits WARNING): one
        # isEnabledFor check per graph, nothing formatted. docs/logging.md.
        if log.isEnabledFor(logging.DEBUG):
            for d in report.sites:
                log.debug(
                    "approxbp: %s %s %s at %s %s: %s; site saved bytes %d -> %d",
                    d.rule,
                    "rewrote" if d.rewritten else "kept exact",
                    d.site.op,
                    d.site.key,
                    list(d.site.shape),
                    d.reason,
                    d.saved_before,
                    d.saved_after,
                )
        if log.isEnabledFor(logging.INFO):
            rewritten = sum(done for _, done, _ in per_rule)
            base, final = report.baseline_bytes, report.final_bytes
            log.info(
                "approxbp: sites found %d, rewritten %d, kept exact %d (%s); saved activation bytes %d -> %d (%.3fx)",
                len(report.sites),
                rewritten,
                len(report.sites) - rewritten,
                ", ".join(f"{rule} {done}/{n}" for rule, done, n in per_rule),
                base,
                final,
                final / base if base else 1.0,
            )
        if self.on_report is not None:
            self.on_report(report)
