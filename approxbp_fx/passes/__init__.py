"""The pipeline, stage by stage, in the order a compile runs it.

1. **Before AOTAutograd** (:func:`before_aot`, over ``GRAPH_PASSES``):
   rewrites of the graph dynamo hands the compiler, run as inductor's
   ``pre_grad_custom_pass`` (:class:`approxbp_fx.partition.ApproxBPGraphPasses`),
   so ``enable()`` gets them too. Each returns a decision per site; the
   partitioner puts them in the graph's report.
2. **The joint graph** (:data:`RULES`): each rule finds sites in AOTAutograd's
   joint forward+backward graph; :mod:`approxbp_fx.partition` predicts,
   applies and measures them with the real partitioner, and keeps only what
   shrinks the saved set. A rule registers itself where it is defined
   (:func:`.rule.register`); the imports below are the registration, in the
   order the rules apply.
3. **After the cut** (:func:`after_cut`): on the partitioned forward and
   backward graphs, our opaque ops become aten ops that inductor fuses
   (:mod:`approxbp_fx.lowering`, when ``act_lowering="inductor"``).
"""

from __future__ import annotations

import torch.fx as fx

from ..config import ApproxBPConfig
from .fused_attention import keep_fused_attention
from .rule import RULES, Baseline, Rule, Site, register

# 1. save_act_codes first: an activation's codes replace its input. A norm
#    feeding an activation directly is then left to the activation (one owner
#    per node: partition.find_sites).
from . import save_act_codes  # noqa: E402,F401  (registers the rule)

# 2. share_norm_input: a norm's backward reads the tensor its consumers save.
from . import share_norm_input  # noqa: E402,F401  (registers the rule)

# 3. pack_bool_masks: what backward still reads as bool (dropout masks) is saved a bit an element.
#    Last: the masks it packs belong to no other rule's site, and its prediction sees which
#    nodes the sites of the rules before it are predicted to rewrite.
from . import pack_bool_masks  # noqa: E402,F401  (registers the rule)

# name (the ApproxBPConfig switch) -> pass(graph, cfg) -> [SiteDecision], editing the graph in place.
GRAPH_PASSES = {
    # Keep CUDA attention off the math path, whose fp32 probabilities dwarf every saving below.
    "fused_attention": keep_fused_attention,
}


def before_aot(graph: fx.Graph, cfg: ApproxBPConfig) -> list:
    """Stage 1: the enabled graph passes, in order, on the graph dynamo hands the compiler."""
    return [d for name, graph_pass in GRAPH_PASSES.items() if getattr(cfg, name) for d in graph_pass(graph, cfg)]


def after_cut(graphs: tuple[fx.GraphModule, ...], cfg: ApproxBPConfig) -> None:
    """Stage 3: once the partition is cut, the ops need not be opaque (approxbp_fx/lowering.py)."""
    if cfg.act_lowering == "inductor":
        from .. import lowering

        for g in graphs:
            lowering.lower(g)


__all__ = ["GRAPH_PASSES", "RULES", "Baseline", "Rule", "Site", "register", "before_aot", "after_cut"]
