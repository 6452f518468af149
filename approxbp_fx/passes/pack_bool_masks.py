"""A boolean mask that backward reads is saved 8 to a byte, not one byte an element.

Before (joint graph; a dropout mask ``rand > p``, a clamp's ``x < c``, any
bool tensor computed in forward and read in backward)::

    ... ──▶ m (bool) ──▶ forward users
                └──────▶ backward readers (grad * m * scale, where(m, g, 0))   # m saved: 1 B/element

After::

    ... ──▶ m (bool) ──▶ forward users                       # untouched
            m ──approxbp.pack_bits──▶ packed (uint8, numel/8)
    backward: m' = approxbp.unpack_bits(packed, shape) ──▶ the same readers

``m`` leaves the saved set and ``packed`` (an eighth of its bytes) takes its
place; ``m'`` is ``m`` bit for bit, so forward and gradients are unchanged.
``pack_bits`` is opaque, so the partitioner saves ``packed`` rather than
recompute it from ``m``; it is lowered to fusable aten ops after the cut.
GPT-2 and RoBERTa in training mode save two dropout masks a layer (resid
dropout after attention and after the MLP): 6 MiB each at 8 x 1024 tokens of
GPT-2, 0.75 MiB packed. :mod:`approxbp_fx.partition` measures every site, as
for the other rules: a mask the partitioner recomputes instead stays as it is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx as fx

from ..codes import packed_numel
from ..config import ApproxBPConfig
from . import pointwise as pw
from .graph_bytes import hint, is_backward, nbytes
from .graph_edit import copy_meta, fake_run
from .rule import Baseline, Rule, SiteFields, register

__all__ = ["MaskSite", "RULE", "find_sites", "predict", "apply_site"]

_pack = torch.ops.approxbp.pack_bits.default
_unpack = torch.ops.approxbp.unpack_bits.default
# Below this many elements packing saves less than it costs in ops and report rows.
_MIN_NUMEL = 1024


@dataclass(frozen=True, kw_only=True)
class MaskSite(SiteFields):
    """A bool tensor of the forward that backward reads; ``x`` is the mask."""

    readers: tuple[str, ...]  # its backward readers, which the rewrite re-points

    key = property(lambda self: self.x)
    op = property(lambda self: "bool mask")

    @property
    def tensors(self) -> set[str]:
        return {*self.x_aliases, *self.aliases}

    @property
    def reads(self) -> set[str]:
        # The readers are re-pointed in place (same node, same value), so they
        # must survive other rewrites; nothing of the graph is replaced or erased.
        return {*self.tensors, *self.readers}

    @property
    def writes(self) -> set[str]:
        return set()

    @property
    def must_leave_backward(self) -> tuple[str, ...]:
        return self.x_aliases


def find_sites(gm: fx.GraphModule, cfg: ApproxBPConfig) -> list[MaskSite]:
    """Every bool tensor computed in forward (not a graph input) that backward reads."""
    sites = []
    for m in gm.graph.nodes:
        v = pw.tensor_val(m)
        if m.op != "call_function" or v is None or v.dtype != torch.bool or is_backward(m):
            continue
        readers = [u for u in m.users if is_backward(u)]
        if not readers or m.target in (_pack, _unpack) or pw.is_view(m):
            continue
        site = MaskSite(
            x=m.name, x_aliases=tuple(n.name for n in [m, *pw.view_ancestors(m)]),
            aliases=tuple(v_.name for v_ in pw.view_descendants(m)), shape=tuple(v.shape), dtype=v.dtype,
            readers=tuple(u.name for u in readers),
        )
        if any(not isinstance(s, int) for s in v.shape):
            site = site.with_skip("symbolic shape: the unpacked mask's shape would need the graph's sizes")
        elif v.numel() < _MIN_NUMEL:
            site = site.with_skip(f"{v.numel()} elements: too small to pay for the pack")
        elif m.meta.get("recompute") is not None:
            site = site.with_skip("inside an activation-checkpoint region")
        sites.append(site)
    return sites


def predict(gm: fx.GraphModule, site: MaskSite, base: Baseline, cfg: ApproxBPConfig) -> tuple[int, str]:
    """The packed bytes; or, where backward would still read the mask, the mask and the packed bytes.

    The rewrite re-points only the mask's own backward readers. Where the
    baseline partition recomputes in backward a forward value made from the
    mask, and the mask stays the cheapest way to do so, packing only adds
    bytes: with pointwise recompute allowed, attention dropout's
    ``probs * mask * scale``, which the value gradient's bmm reads. Predicting
    that here saves a trial partition that would refute it.
    """
    before = base.bytes_of(site.tensors)
    after = hint(packed_numel(math.prod(site.shape), 1))
    recomputed = _recomputed_from_mask(gm, site, base)
    if recomputed is not None:
        return before + after, f"backward recomputes {recomputed.target} from the mask, so it would still read it"
    return after, f"inductor saves only {before} B here"


def _recomputed_from_mask(gm: fx.GraphModule, site: MaskSite, base: Baseline) -> fx.Node | None:
    """A value the baseline recomputes from the mask in backward, where the mask stays the cheapest input; or None.

    A forward value backward reads and nobody saved is recomputed in backward.
    Walking forward from the mask through pointwise ops and views (stopping at
    saved values, where backward starts) finds the recomputes that start at
    the mask. After packing, the partitioner keeps such a recompute, and the
    mask with it, if that still costs least: if every value along the way is
    larger than the mask (saving one instead costs more), and every other
    input of the recompute is needed in backward anyway (attention's
    probabilities, which softmax's backward reads), so costs nothing extra.
    Otherwise the cut may move, and only the trial can tell: RoBERTa's last
    output dropout, whose recompute's other input is a Linear's output nobody
    else needs, pays. The walk also stops at nodes another site predicted to
    pay rewrites: GPT-2's embedding dropout output is the first LayerNorm's
    input, which MS-LN stops backward from reading; then the mask pays.
    """
    mask = {n.name: n for n in gm.graph.nodes}[site.x]
    mask_bytes = nbytes(mask.meta["val"])
    stack, seen = [(mask, mask, frozenset())], set()
    while stack:
        node, op, others = stack.pop()  # op: the pointwise op whose value ``node`` is (or views)
        for u in node.users:
            if u in seen or is_backward(u) or not (pw.is_pointwise(u) or pw.is_view(u)) or u.name in base.rewritten:
                continue
            seen.add(u)
            if any(n.name in base.saved for n in [u, *pw.view_descendants(u)]) or nbytes(u.meta.get("val")) <= mask_bytes:
                continue
            u_op, u_others = (op if pw.is_view(u) else u), others | {a for a in pw.tensor_args(u) if a is not node}
            if any(is_backward(r) for r in u.users) and all(_needed_anyway(a, base) for a in u_others):
                return u_op
            stack.append((u, u_op, u_others))
    return None


def _needed_anyway(node: fx.Node, base: Baseline) -> bool:
    """Does backward read ``node`` (or a view of it) itself, through no site predicted to rewrite it?"""
    forms = [node, *pw.view_descendants(node)]
    return not any(n.name in base.rewritten for n in forms) and any(is_backward(u) for n in forms for u in n.users)


def apply_site(gm: fx.GraphModule, site: MaskSite, cfg: ApproxBPConfig) -> set[str]:
    """Pack the mask in forward, unpack it before its first backward reader, re-point the readers."""
    graph = gm.graph
    nodes = {n.name: n for n in graph.nodes}
    m = nodes[site.x]
    readers = [nodes[n] for n in site.readers]
    with graph.inserting_after(m):
        packed = graph.call_function(_pack, (m,))
    copy_meta(packed, m, fake_run(_pack, (m,)))
    order = {n: i for i, n in enumerate(graph.nodes)}
    first = min(readers, key=order.__getitem__)
    args = (packed, list(site.shape))
    with graph.inserting_before(first):
        unpacked = graph.call_function(_unpack, args)
    copy_meta(unpacked, m, fake_run(_unpack, args), tag="must_be_in_backward")
    for r in readers:
        r.args = fx.node.map_arg(r.args, lambda a: unpacked if a is m else a)
        r.kwargs = fx.node.map_arg(r.kwargs, lambda a: unpacked if a is m else a)
    return {packed.name}


RULE = register(Rule("pack_bool_masks", find_sites=find_sites, predict=predict, apply_site=apply_site))

