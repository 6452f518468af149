"""What a compile tells its user: a decision per site, totals per graph, and the fallback warning.

Light on purpose (no torch internals): :func:`approxbp_fx.explain`, the
``on_report`` callback and the ``approxbp_fx`` logger all read these.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .passes.rule import Site

__all__ = ["SiteDecision", "GraphReport", "ApproxBPFallbackWarning", "log", "log_report"]

log = logging.getLogger("approxbp_fx")


class ApproxBPFallbackWarning(UserWarning):
    """The rewrite failed inside a compile; that graph was compiled exactly, as inductor's.

    A compile must never fail where inductor's succeeds, so an internal error
    costs the graph its savings, not the user's run. Every one is a bug worth
    reporting; the test suite turns this warning into an error.
    """


@dataclass
class SiteDecision:
    """What happened to one site; the raw material of :func:`approxbp_fx.explain`."""

    site: Site
    rule: str  # the passes.RULES entry that found it
    rewritten: bool
    reason: str
    bytes_before: int = 0  # bytes of the site's tensors in inductor's saved set
    bytes_after: int = 0  # the same after our choice

    def keep_exact(self, why: str) -> None:
        self.rewritten = False
        self.reason = why
        self.bytes_after = self.bytes_before


@dataclass
class GraphReport:
    """One joint graph: every site found, and the saved activation bytes before and after."""

    sites: list[SiteDecision] = field(default_factory=list)
    baseline_bytes: int = 0
    final_bytes: int = 0
    # The pointwise recompute the graph was partitioned with: "banned" or "allowed" (ApproxBPConfig.recompute).
    recompute: str = "banned"

    def counts(self, rules) -> list[tuple[str, int, int]]:
        """``(rule, rewritten, found)`` for each rule name in ``rules``."""
        out = []
        for rule in rules:
            mine = [d for d in self.sites if d.rule == rule]
            out.append((rule, sum(d.rewritten for d in mine), len(mine)))
        return out


def log_report(report: GraphReport, rules) -> None:
    """One INFO line per graph, one DEBUG line per site (docs/logging.md)."""
    # Off by default (the "approxbp_fx" logger inherits WARNING): one
    # isEnabledFor check per graph, nothing formatted.
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
                d.bytes_before,
                d.bytes_after,
            )
    if log.isEnabledFor(logging.INFO):
        counts = report.counts(rules)
        rewritten = sum(done for _, done, _ in counts)
        base, final = report.baseline_bytes, report.final_bytes
        log.info(
            "approxbp: sites found %d, rewritten %d, kept exact %d (%s); saved activation bytes %d -> %d (%.3fx); "
            "pointwise recompute %s",
            len(report.sites),
            rewritten,
            len(report.sites) - rewritten,
            ", ".join(f"{rule} {done}/{n}" for rule, done, n in counts),
            base,
            final,
            final / base if base else 1.0,
            report.recompute,
        )
