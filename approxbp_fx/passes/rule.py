"""The interface every joint-graph rule implements, and the registry that drives them.

A rule finds *sites* in AOTAutograd's joint forward+backward graph, predicts
what rewriting one would leave saved, and rewrites the ones
:mod:`approxbp_fx.partition` keeps. It registers itself where it is defined::

    RULE = register(Rule("save_act_codes", find_sites=find_sites, predict=predict, apply_site=apply_site))

and ``passes/__init__.py`` imports the rule modules in the order they apply;
the partitioner never names a rule. docs/adding_a_rule.md has the checklist a
new rule must pass.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
import torch.fx as fx

from ..config import ApproxBPConfig

__all__ = ["Baseline", "Site", "SiteFields", "Rule", "RULES", "register"]


class Site(Protocol):
    """One place a rule can rewrite; node *names*, so it applies to copies of the graph too."""

    key: str  # unique among the rule's sites in one graph
    op: str  # what the report calls it: "gelu", "layer_norm", ...
    shape: tuple
    dtype: torch.dtype
    skip: str | None  # why it cannot be rewritten, or None

    @property
    def tensors(self) -> set[str]:
        """Every name under which the site's tensors can appear in a saved set (its bytes before)."""

    @property
    def reads(self) -> set[str]:
        """Nodes the rewrite reads and leaves in place."""

    @property
    def writes(self) -> set[str]:
        """Nodes the rewrite replaces, re-points or erases: one owner each (docs/invariants.md)."""

    @property
    def must_leave_backward(self) -> tuple[str, ...]:
        """Names that must be gone from the backward graph for the rewrite to have paid."""

    def with_skip(self, why: str) -> Site: ...


@dataclass(frozen=True, kw_only=True)
class SiteFields:
    """What every site records, whichever rule found it (node names and the input's meta)."""

    x: str  # the input whose bytes the rewrite removes from the saved set
    x_aliases: tuple[str, ...]  # x and its full-size view bases
    aliases: tuple[str, ...]  # full-size views of the site's nodes
    shape: tuple
    dtype: torch.dtype
    skip: str | None = None

    def with_skip(self, why: str):
        return dataclasses.replace(self, skip=why)


@dataclass(frozen=True)
class Baseline:
    """What a site's prediction is made against.

    ``saved``: bytes by node name that inductor's partition of the untouched
    graph saves. ``rewritten``: the nodes written (re-pointed, replaced) by the
    sites already predicted to pay, earlier rules' first: their backward
    readers are those sites' business, so a prediction need not count them.
    """

    saved: dict[str, int]
    rewritten: frozenset[str] = frozenset()

    def bytes_of(self, names) -> int:
        return sum(self.saved.get(n, 0) for n in names)


# (gm, cfg) -> candidate sites, skipped ones included with their reason.
FindSites = Callable[[fx.GraphModule, ApproxBPConfig], list]
# (gm, site, baseline, cfg) -> (bytes left saved, why it would not pay).
Predict = Callable[[fx.GraphModule, Site, Baseline, ApproxBPConfig], tuple[int, str]]
# (gm, site, cfg) -> names of the nodes the rewrite added (where the site's saved tensors now live).
ApplySite = Callable[[fx.GraphModule, Site, ApproxBPConfig], set[str]]


@dataclass(frozen=True)
class Rule:
    """A joint-graph rewrite. ``name`` is also the :class:`ApproxBPConfig` switch that turns it on."""

    name: str
    find_sites: FindSites
    predict: Predict
    apply_site: ApplySite

    def enabled(self, cfg: ApproxBPConfig) -> bool:
        return bool(getattr(cfg, self.name))

    def apply_sites(self, gm: fx.GraphModule, sites: list, cfg: ApproxBPConfig, recompile: bool = True) -> dict[str, set[str]]:
        """Rewrite ``sites`` (found on ``gm`` or a copy of it) in order, then lint and recompile once.

        Returns site key -> names of the nodes the rewrite added.
        """
        out = {site.key: self.apply_site(gm, site, cfg) for site in sites}
        if sites:
            gm.graph.lint()
            if recompile:
                gm.recompile()
        return out

    def rewrite(self, gm: fx.GraphModule, cfg: ApproxBPConfig) -> int:
        """Rewrite every rewritable site, paying or not (no partitioner involved); returns the count."""
        if not self.enabled(cfg):
            return 0
        return len(self.apply_sites(gm, [s for s in self.find_sites(gm, cfg) if s.skip is None], cfg))


# name -> rule, in the order the rules apply (the import order in passes/__init__.py).
RULES: dict[str, Rule] = {}


def register(rule: Rule) -> Rule:
    """Add ``rule`` to :data:`RULES`; its name must be an :class:`ApproxBPConfig` switch."""
    if rule.name in RULES:
        raise ValueError(f"rule {rule.name!r} is registered twice")
    if rule.name not in {f.name for f in dataclasses.fields(ApproxBPConfig)}:
        raise ValueError(f"rule {rule.name!r} has no ApproxBPConfig switch of that name")
    RULES[rule.name] = rule
    return rule
