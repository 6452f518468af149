"""Profitability by measurement: rewrite a site only if the real partitioner saves less.

Inductor's min-cut partitioner decides what the forward saves for backward,
and it already recomputes cheap pointwise ops where it can. Whether a
rewrite pays therefore depends on what the partitioner would have done, so we
ask it. For every joint graph:

1. find the candidate sites of every enabled rule (:data:`passes.RULES`),
   one owner per node;
2. partition a copy of the unmodified graph in every recompute mode of
   ``ApproxBPConfig.recompute`` (pointwise recompute banned, as inductor's
   default, and allowed): the saved sets to beat, measured by cut-only runs
   (:mod:`approxbp_fx.trial_graphs`), since graphs are built only for the
   partition returned;
3. in the mode whose saved set, less the savings the rules predict, is
   smallest, keep the sites predicted to pay, rewrite a copy, partition it;
4. if a kept site still leaves its input in backward, or saves as much, or the
   total grew, drop the offenders and partition once more; if nothing helps,
   or an exact partition of step 2 saves fewer bytes, return that partition;
5. lower our ops on the cut graphs (:func:`passes.after_cut`).

The result is never larger than inductor's own choice in either mode, by
construction, and an internal error anywhere in 1-5 returns an exact
partition with a warning. Costs one cut-only partitioner run per mode, plus
one or two trials per graph with a site predicted to pay or one more run
building inductor's partition otherwise.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import torch.fx as fx
from torch._dynamo.utils import counters
from torch._inductor.custom_graph_pass import CustomGraphPass, CustomPartitionerFn, get_hash_for_files

from .config import ApproxBPConfig
from .passes import GRAPH_PASSES, RULES, Baseline, Site, after_cut, before_aot
from .passes.graph_bytes import saved_tensors, saved_values_bytes
from .report import ApproxBPFallbackWarning, GraphReport, SiteDecision, log, log_report
from .trial_graphs import MODES, copy_graph, frozen_heap, recompute_mode, saved_set_only

__all__ = ["ApproxBPPartitioner", "ApproxBPGraphPasses", "find_sites"]

# (rule name, site key): a site's identity in one graph.
Key = tuple[str, str]


def find_sites(gm: fx.GraphModule, cfg: ApproxBPConfig) -> list[tuple[str, Site]]:
    """``(rule, site)`` for every candidate of every enabled rule, in rule order.

    One node, one owner (docs/invariants.md): a site that writes a node another
    site reads or writes stays exact, whichever rule found either; the first
    found keeps it. Two activation sites read the same incoming gradient
    without conflict; a norm feeding a GELU directly is left to the GELU.
    """
    owners: list[Site] = []
    out = []
    for rule in RULES.values():
        if not rule.enabled(cfg):
            continue
        for site in rule.find_sites(gm, cfg):
            if site.skip is None:
                other = next((o for o in owners if _conflict(site, o)), None)
                if other is None:
                    owners.append(site)
                else:
                    site = site.with_skip(f"shares nodes with the {other.op} site at {other.key} (one owner per node)")
            out.append((rule.name, site))
    return out


def _conflict(a: Site, b: Site) -> bool:
    return bool(a.writes & (b.reads | b.writes) or b.writes & a.reads)


@dataclasses.dataclass
class _Exact:
    """Inductor's partition of the untouched graph in one recompute mode: what it saves, and the graphs once built.

    ``result`` is None while only the saved set was measured
    (:func:`~approxbp_fx.trial_graphs.saved_set_only`); :meth:`ApproxBPPartitioner._exact_result` builds it.
    """

    saved: dict[str, int]
    result: tuple | None = None

    @property
    def bytes(self) -> int:
        return sum(self.saved.values())


def _predicted_gain(decisions: dict[Key, SiteDecision]) -> int:
    """Bytes the sites predicted to pay would save, from the rules' predictions."""
    return sum(d.bytes_before - d.bytes_after for d in decisions.values() if d.rewritten)


def _losers(decisions: dict[Key, SiteDecision], chosen: set[Key], added, saved: dict[str, int], in_bw: set[str]):
    """The chosen sites the trial partition shows not paying, marked exact; the others get their bytes."""
    losers = set()
    for k in chosen:
        d = decisions[k]
        names = d.site.tensors | added[k]
        d.bytes_after = sum(b for n, b in saved.items() if n in names)
        if any(n in in_bw for n in d.site.must_leave_backward):
            d.keep_exact("measured: backward still reads the input after the rewrite")
        elif d.bytes_after >= d.bytes_before:
            d.keep_exact("measured: the partitioner still saves as much here after the rewrite")
        else:
            continue
        losers.add(k)
    return losers


def _source_files() -> list[Path]:
    """The files whose text decides what the backend emits (for compile-cache keys)."""
    return sorted(Path(__file__).parent.rglob("*.py"))


def _uuid(cfg: ApproxBPConfig, inner) -> tuple:
    """What decides the code a hook of ours makes: our source, the config, and the hook it wraps."""
    files = tuple(str(p) for p in _source_files())
    inner_id = inner.uuid() if isinstance(inner, (CustomPartitionerFn, CustomGraphPass)) else repr(inner)
    return (get_hash_for_files(files), cfg.key(), inner_id)


class ApproxBPGraphPasses(CustomGraphPass):
    """The pipeline's first stage as inductor's ``pre_grad_custom_pass`` (so ``enable()`` runs it too).

    Runs ``inner`` (a pre-grad pass installed before ours) first, then the
    enabled :data:`~approxbp_fx.passes.GRAPH_PASSES`; their decisions wait in
    ``pending`` for the partitioner of the same compile, which reports them.
    """

    def __init__(self, cfg: ApproxBPConfig, inner=None) -> None:
        self.cfg = cfg
        self.inner = inner
        self.pending: list[SiteDecision] = []

    def __call__(self, graph: fx.Graph) -> None:
        if self.inner is not None:
            self.inner(graph)
        self.pending = before_aot(graph, self.cfg)

    def take(self) -> list[SiteDecision]:
        pending, self.pending = self.pending, []
        return pending

    def uuid(self) -> Any:
        return _uuid(self.cfg, self.inner)

    def __reduce__(self):
        # Pickled into cache keys, like the partitioner (see ApproxBPPartitioner.__reduce__).
        return (type(self), (self.cfg, self.inner))


class ApproxBPPartitioner(CustomPartitionerFn):
    """Inductor's partitioner with our rewrites applied where they pay.

    Args:
        cfg: what to rewrite.
        inner: the partitioner to measure with and delegate to; inductor's
            min-cut partitioner when None.
        on_report: called with a :class:`~approxbp_fx.report.GraphReport` for every joint graph.
        graph_passes: the first stage of the same compiles, whose decisions
            each report begins with.
    """

    def __init__(
        self,
        cfg: ApproxBPConfig,
        inner: Callable[..., tuple[fx.GraphModule, fx.GraphModule]] | None = None,
        on_report: Callable[[GraphReport], None] | None = None,
        graph_passes: ApproxBPGraphPasses | None = None,
    ) -> None:
        self.cfg = cfg
        self.inner = inner
        self.on_report = on_report
        self.graph_passes = graph_passes

    def uuid(self) -> Any:
        return _uuid(self.cfg, self.inner)

    def __reduce__(self):
        # AOTAutograd's and inductor's cache keys hash the pickled inductor
        # config, this object included; the default pickle would carry the
        # on_report callback (another per-process object). What decides the
        # compiled code is the config and the inner partitioner, and the
        # config pickles in a stable order (ApproxBPConfig.__reduce__), so a
        # new process finds the graphs an earlier one compiled. A callback
        # cannot cross processes anyway; one that is set turns the cache
        # lookup off (backend.py), since a hit would skip the report.
        return (type(self), (self.cfg, self.inner))

    def _partition(self, gm, joint_inputs, kwargs, mode: str):
        # The baseline and every trial of a mode run under the same setting, so
        # "never more than the baseline" holds against the partitioner actually used.
        with recompute_mode(mode):
            if self.inner is not None:
                return self.inner(gm, joint_inputs, **kwargs)
            from torch._functorch.partitioners import min_cut_rematerialization_partition

            return min_cut_rematerialization_partition(gm, joint_inputs, **kwargs)

    def __call__(self, gm: fx.GraphModule, joint_inputs: Sequence[object], **kwargs: Any):
        with frozen_heap():  # our extra partitioner runs would otherwise trigger full collections of the process
            return self._partition_best(gm, joint_inputs, kwargs)

    def _partition_best(self, gm: fx.GraphModule, joint_inputs: Sequence[object], kwargs: dict):
        sites, failure = self._find_sites(gm)
        exact = self._exact_partitions(gm, joint_inputs, kwargs)
        base = min(exact, key=lambda m: exact[m].bytes)  # a tie keeps the first, banned, which recomputes less
        if failure is None and any(s.skip is None for _, s in sites):
            result, report = self._rewrite_best(gm, joint_inputs, kwargs, sites, exact, base)
        else:
            result, report = None, self._exact_report(sites, failure, exact[base].bytes, base)
        if result is None:  # inductor's own partition in the mode chosen
            result = self._exact_result(gm, joint_inputs, kwargs, exact, report)
        # Lowered once, on the partition kept.
        try:
            after_cut(result, self.cfg)
        except Exception as err:  # noqa: BLE001  (see ApproxBPFallbackWarning)
            mode = report.recompute
            report = self._exact_report(sites, err, exact[mode].bytes, mode)
            result = self._exact_result(gm, joint_inputs, kwargs, exact, report)
        self._finish(report)
        return result

    def _exact_partitions(self, gm, joint_inputs, kwargs) -> dict[str, _Exact]:
        """Inductor's own partition in every recompute mode of the config: the peers to beat.

        If the partitioner fails on the untouched graph, inductor alone would
        fail too, so this may raise.
        """
        static = kwargs.get("static_lifetime_input_indices")
        # Measured, not built, where the cut-only run is known to give the saved
        # set the built partition has: inductor's partitioner, outside
        # activation-checkpoint regions (whose RNG functionalization adds saved
        # seeds after the cut).
        measure = self.inner is None and "num_fwd_outputs" in kwargs and not any(
            n.meta.get("recompute") is not None for n in gm.graph.nodes
        )
        out = {}
        for mode in MODES[self.cfg.recompute]:
            run = functools.partial(self._partition, copy_graph(gm), joint_inputs, kwargs, mode)
            got = saved_set_only(run, kwargs["num_fwd_outputs"]) if measure else run()
            out[mode] = _Exact(saved_tensors(got[1], gm, static), got) if isinstance(got, tuple) else _Exact(
                saved_values_bytes(got, static)
            )
        return out

    def _exact_result(self, gm, joint_inputs, kwargs, exact: dict[str, _Exact], report: GraphReport) -> tuple:
        """Inductor's partition in the report's mode, built now if it was only measured."""
        e = exact[report.recompute]
        if e.result is None:
            e.result = self._partition(copy_graph(gm), joint_inputs, kwargs, report.recompute)
            built = saved_tensors(e.result[1], gm, kwargs.get("static_lifetime_input_indices"))
            if built != e.saved:  # the measurement must be the partition: tests hold it to that
                log.warning("approxbp: measured %d saved bytes, built %d (%s)", e.bytes, sum(built.values()), report.recompute)
                e.saved = built
                report.baseline_bytes = report.final_bytes = e.bytes
        return e.result

    def _rewrite_best(self, gm, joint_inputs, kwargs, sites, exact: dict[str, _Exact], base: str):
        """Rewrite in the mode whose prediction saves least; keep it only if no exact partition saves less.

        One trial mode, not every one: each trial is a full partitioner run,
        and with ``recompute="auto"`` trials in both modes cost 1.3-1.4x
        inductor's compile time (docs/performance.md). Every exact partition
        is still measured, so the result never saves more than inductor with
        either setting.
        """
        try:  # the predictions too: a rule's graph walk must not fail the compile
            predictions = {m: self._predict(gm, sites, e.saved) for m, e in exact.items()}
            mode = min(exact, key=lambda m: exact[m].bytes - _predicted_gain(predictions[m]))
            result, report = self._rewrite(gm, joint_inputs, kwargs, predictions[mode], exact[mode], mode)
        except Exception as err:  # noqa: BLE001  (see ApproxBPFallbackWarning)
            return None, self._exact_report(sites, err, exact[base].bytes, base)
        if exact[base].bytes < report.final_bytes:  # an exact partition of another mode saves less
            why = (f"measured: inductor's partition with pointwise recompute {base} saves {exact[base].bytes} B "
                   f"without rewrites, fewer than {report.final_bytes} B with them (recompute {mode})")
            for d in report.sites:
                if d.rewritten:
                    d.keep_exact(why)
            report.baseline_bytes = report.final_bytes = exact[base].bytes
            report.recompute, result = base, None
        return result, report

    def _find_sites(self, gm: fx.GraphModule) -> tuple[list[tuple[str, Site]], Exception | None]:
        try:
            return find_sites(gm, self.cfg), None
        except Exception as err:  # noqa: BLE001  (see ApproxBPFallbackWarning)
            return [], err

    def _exact_report(self, sites, failure: Exception | None, saved: int, mode: str) -> GraphReport:
        """Every site kept exact: for its own reason, or for the internal error that stopped the rewrite."""
        report = GraphReport(baseline_bytes=saved, final_bytes=saved, recompute=mode)
        if failure is None:
            report.sites = [SiteDecision(s, r, False, s.skip or "") for r, s in sites]
            return report
        why = f"internal error in the rewrite, graph kept exact: {type(failure).__name__}: {failure}"
        report.sites = [SiteDecision(s, r, False, why) for r, s in sites]
        warnings.warn(
            f"approxbp: {why}. The compile goes on as inductor's; please report this.",
            ApproxBPFallbackWarning,
            stacklevel=2,
        )
        log.debug("approxbp: the rewrite failed", exc_info=failure)
        return report

    def _rewrite(self, gm, joint_inputs, kwargs, decisions, exact: _Exact, mode: str) -> tuple[tuple | None, GraphReport]:
        """Keep the sites predicted to pay, then measure them with the real partitioner until none loses.

        Returns the trial's partition, or None where no site was kept (inductor's, in ``mode``).
        """
        static = kwargs.get("static_lifetime_input_indices")
        report = GraphReport(baseline_bytes=exact.bytes, recompute=mode)
        result = None
        chosen = {k for k, d in decisions.items() if d.rewritten}
        while chosen:
            trial, added = self._apply(gm, decisions, chosen)
            fw, bw = self._partition(trial, joint_inputs, kwargs, mode)
            saved = saved_tensors(bw, trial, static)
            losers = _losers(decisions, chosen, added, saved, {n.name for n in bw.graph.nodes})
            if not losers and sum(saved.values()) <= report.baseline_bytes:
                result = (fw, bw)
                report.final_bytes = sum(saved.values())
                break
            if not losers:  # total grew although no site did: be safe, keep inductor's graph
                losers = set(chosen)
                for k in losers:
                    decisions[k].keep_exact("measured: total saved bytes grew")
            chosen -= losers
        if not chosen:
            report.final_bytes = report.baseline_bytes
        report.sites = list(decisions.values())
        return result, report

    def _predict(self, gm, sites, base_saved) -> dict[Key, SiteDecision]:
        decisions: dict[Key, SiteDecision] = {}
        base = Baseline(base_saved)  # grows by the nodes of each site predicted to pay (rule order)
        for rule, s in sites:
            before = base.bytes_of(s.tensors)
            d = SiteDecision(s, rule, False, s.skip or "", before, before)
            if s.skip is None:
                predicted, why = RULES[rule].predict(gm, s, base, self.cfg)
                d.rewritten = predicted < before
                d.reason = why if not d.rewritten else "rewritten"
                d.bytes_after = predicted if d.rewritten else before  # the trial measures it
                if d.rewritten:
                    base = Baseline(base_saved, base.rewritten | s.writes)
            decisions[(rule, s.key)] = d
        return decisions

    def _apply(self, gm, decisions, chosen) -> tuple[fx.GraphModule, dict[Key, set[str]]]:
        """A copy of ``gm`` with the chosen sites rewritten, and each site's new saved candidates."""
        trial = copy_graph(gm)
        # Node names survive the copy, so the sites found on gm apply to it.
        added: dict[Key, set[str]] = {}
        for name, rule in RULES.items():
            todo = [decisions[k].site for k in sorted(chosen) if k[0] == name]
            # The partitioner recompiles the joint module first thing: no need here.
            for key, names in rule.apply_sites(trial, todo, self.cfg, recompile=False).items():
                added[(name, key)] = names
        return trial, added

    def _finish(self, report: GraphReport) -> None:
        if self.graph_passes is not None:
            report.sites[:0] = self.graph_passes.take()
        # Tests assert exact match counts here, as inductor's pattern-matcher tests do.
        stages = [*GRAPH_PASSES, *RULES]
        for rule, done, found in report.counts(stages):
            counters["approxbp"][rule] += done
            counters["approxbp"][f"{rule}_kept_exact"] += found - done
        log_report(report, stages)
        if self.on_report is not None:
            self.on_report(report)


def inductor_hooks(cfg: ApproxBPConfig, on_report=None) -> dict[str, Any]:
    """Inductor config values that run the whole pipeline with ``cfg``.

    Wraps the partitioner and pre-grad pass installed now (unwrapping ours, so
    that under ``enable()`` a backend's own config runs once, not twice): they
    still run, and the rewrite is measured against that partitioner.
    """
    from torch._inductor import config as inductor_config

    partitioner, pre_grad = inductor_config.custom_partitioner_fn, inductor_config.pre_grad_custom_pass
    graph_passes = ApproxBPGraphPasses(cfg, inner=pre_grad.inner if isinstance(pre_grad, ApproxBPGraphPasses) else pre_grad)
    inner = partitioner.inner if isinstance(partitioner, ApproxBPPartitioner) else partitioner
    return {
        "custom_partitioner_fn": ApproxBPPartitioner(cfg, inner=inner, on_report=on_report, graph_passes=graph_passes),
        "pre_grad_custom_pass": graph_passes,
    }
