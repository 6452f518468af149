"""Profitability by measurement: rewrite a site only if the real partitioner saves less.

Inductor's min-cut partitioner decides what the forward saves for backward,
and it already recomputes cheap pointwise ops where it can. Whether swapping
an activation's input for codes pays therefore depends on what the
partitioner would have done, so we ask it:

1. find the candidate sites in the joint graph;
2. partition a copy of the unmodified graph: the baseline saved set;
3. keep the sites whose rewrite is predicted to shrink that set, rewrite a
   copy, partition it again;
4. if a kept site still leaves its input saved, or the total grew, drop the
   offenders and partition once more; if nothing helps, return the baseline.

The result is never larger than inductor's own choice, by construction.
Costs one to three partitioner runs per compiled graph.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
from torch._dynamo.utils import counters
from torch._inductor.custom_graph_pass import CustomPartitionerFn, get_hash_for_files

from .config import ApproxBPConfig
from .passes import pointwise as pw
from .passes import save_act_codes
from .passes.save_act_codes import ActSite
from .reference import packed_numel

log = logging.getLogger("approxbp_fx")

__all__ = ["ApproxBPPartitioner", "SiteDecision", "GraphReport", "saved_tensors"]


def _hint(n) -> int:
    if isinstance(n, int):
        return n
    try:  # torch >= 2.12 names it optimization_hint; older ones expose the node hint.
        from torch.fx.experimental.symbolic_shapes import optimization_hint

        return int(optimization_hint(n, fallback=4096))
    except ImportError:
        hint = n.node.hint
        return int(hint) if hint is not None else 4096


def _nbytes(val) -> int:
    if not isinstance(val, torch.Tensor):
        return 0
    return _hint(val.numel()) * val.element_size()


def saved_tensors(bw: fx.GraphModule) -> dict[str, int]:
    """Name -> bytes of the activations a backward graph receives from its forward.

    Primals (parameters and inputs) are left out: they are alive anyway.
    """
    out = {}
    for n in bw.graph.find_nodes(op="placeholder"):
        if n.name.startswith(("tangents", "primals")):
            continue
        b = _nbytes(n.meta.get("val"))
        if b:
            out[n.name] = b
    return out


@dataclass
class SiteDecision:
    """What happened to one site; the raw material of :func:`approxbp_fx.explain`."""

    site: ActSite
    rewritten: bool
    reason: str
    saved_before: int = 0  # bytes of the site's tensors in inductor's saved set
    saved_after: int = 0  # the same after our choice


@dataclass
class GraphReport:
    sites: list[SiteDecision] = field(default_factory=list)
    baseline_bytes: int = 0
    final_bytes: int = 0


def _copy(gm: fx.GraphModule) -> fx.GraphModule:
    # The partitioner mutates its input (DCE, tags); each trial gets its own.
    return copy.deepcopy(gm)


def _backward_users(node: fx.Node, dead: set[str]) -> list[fx.Node]:
    return [u for u in node.users if u.name not in dead and u.meta.get("partitioner_tag") == "is_backward"]


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
        if self.inner is not None:
            return self.inner(gm, joint_inputs, **kwargs)
        from torch._functorch.partitioners import min_cut_rematerialization_partition

        return min_cut_rematerialization_partition(gm, joint_inputs, **kwargs)

    def __call__(self, gm: fx.GraphModule, joint_inputs: Sequence[object], **kwargs: Any):
        cfg = self.cfg
        sites = save_act_codes.find_sites(gm, cfg) if cfg.save_act_codes else []
        report = GraphReport()
        if not any(s.skip is None for s in sites):
            fw, bw = self._partition(gm, joint_inputs, kwargs)
            report.baseline_bytes = report.final_bytes = sum(saved_tensors(bw).values())
            report.sites = [SiteDecision(s, False, s.skip or "") for s in sites]
            self._finish(report)
            return fw, bw

        base_fw, base_bw = self._partition(_copy(gm), joint_inputs, kwargs)
        base_saved = saved_tensors(base_bw)
        report.baseline_bytes = sum(base_saved.values())

        decisions: dict[str, SiteDecision] = {}
        for s in sites:
            before = sum(base_saved.get(n, 0) for n in s.tensors)
            d = SiteDecision(s, False, s.skip or "", before, before)
            if s.skip is None:
                predicted, why = self._predict(gm, s, base_saved)
                d.rewritten = predicted < before
                d.reason = why if not d.rewritten else "rewritten"
            decisions[s.x] = d

        result = (base_fw, base_bw)
        chosen = {x for x, d in decisions.items() if d.rewritten}
        while chosen:
            trial = _copy(gm)
            # Node names survive deepcopy, so the sites found on gm apply to the copy.
            save_act_codes.apply_sites(trial, [d.site for x, d in decisions.items() if x in chosen], cfg)
            fw, bw = self._partition(trial, joint_inputs, kwargs)
            saved = saved_tensors(bw)
            losers = set()
            for x in chosen:
                d = decisions[x]
                d.saved_after = sum(b for n, b in saved.items() if n in self._site_names(trial, d.site))
                if any(n in saved for n in d.site.x_aliases) or d.saved_after >= d.saved_before:
                    losers.add(x)
                    d.rewritten = False
                    d.reason = "measured: the partitioner still saves as much here after the rewrite"
                    d.saved_after = d.saved_before
            if not losers and sum(saved.values()) <= report.baseline_bytes:
                result = (fw, bw)
                report.final_bytes = sum(saved.values())
                break
            if not losers:  # total grew although no site did: be safe, keep inductor's graph
                for x in chosen:
                    decisions[x].rewritten = False
                    decisions[x].reason = "measured: total saved bytes grew"
                    decisions[x].saved_after = decisions[x].saved_before
                losers = set(chosen)
            chosen -= losers
        if not chosen:
            report.final_bytes = report.baseline_bytes
        report.sites = list(decisions.values())
        self._finish(report)
        return result

    @staticmethod
    def _site_names(gm: fx.GraphModule, site: ActSite) -> set[str]:
        """Names that hold the site's tensors after the rewrite: its closure plus the new pack outputs."""
        names = site.tensors
        x = next(n for n in gm.graph.nodes if n.name == site.x)
        for u in x.users:
            if u.target is save_act_codes._act_pack:
                names.add(u.name)
                for out in u.users:
                    names.add(out.name)
                    names.update(v.name for v in pw.view_descendants(out))
        return names

    @staticmethod
    def _views(node: fx.Node) -> list[str]:
        return [v.name for v in pw.view_descendants(node)]

    def _predict(self, gm: fx.GraphModule, s: ActSite, base_saved: dict[str, int]) -> tuple[int, str]:
        """Bytes the site would keep saved after the rewrite, and why it would not pay."""
        nodes = {n.name: n for n in gm.graph.nodes}
        xv = nodes[s.x].meta["val"]
        codes = _hint(packed_numel(xv.numel(), self.cfg.bits))
        dead = set(s.closure) | set(s.grad_region)
        # y stays needed if backward reads it for anything but the activation's own gradient.
        y_readers = [u for y in s.ys for u in _backward_users(nodes[y], dead)]
        y_bytes = _nbytes(nodes[s.ys[0]].meta["val"]) if y_readers else 0
        # So does x, if backward reads it outside the activation.
        x_readers = _backward_users(nodes[s.x], dead)
        x_bytes = sum(base_saved.get(n, 0) for n in s.x_aliases) if x_readers else 0
        after = codes + y_bytes + x_bytes
        if y_readers and not any(n in base_saved for y in s.ys for n in [y, *self._views(nodes[y])]):
            why = (
                f"backward reads the {s.activation} output ({y_readers[0].target}), which inductor "
                f"recomputes from the input; saving it plus codes ({after} B) would exceed the "
                f"input it saves now"
            )
        elif x_readers:
            why = f"backward still reads the input elsewhere ({x_readers[0].target})"
        else:
            why = f"inductor saves only {sum(base_saved.get(n, 0) for n in s.tensors)} B here"
        return after, why

    def _finish(self, report: GraphReport) -> None:
        # Tests assert exact match counts here, as inductor's pattern-matcher tests do.
        counters["approxbp"]["save_act_codes"] += sum(d.rewritten for d in report.sites)
        counters["approxbp"]["save_act_codes_kept_exact"] += sum(not d.rewritten for d in report.sites)
        for d in report.sites:
            verb = "rewrote" if d.rewritten else "kept exact"
            log.debug("%s %s at %s%s: %s", verb, d.site.activation, d.site.x, list(d.site.shape), d.reason)
        n = sum(d.rewritten for d in report.sites)
        log.info(
            "approxbp: %d/%d activation sites rewritten; saved activations %d -> %d bytes",
            n,
            len(report.sites),
            report.baseline_bytes,
            report.final_bytes,
        )
        if self.on_report is not None:
            self.on_report(report)
