"""MS-BP: a LayerNorm/RMSNorm backward reads the tensor its consumers save, not its input.

Before (joint graph; ``nn.LayerNorm``, ``F.rms_norm``, Hugging Face's Llama/T5/
Gemma RMSNorm, in fp32/fp16/bf16 and under autocast)::

    x ─stats─▶ μ, r = rsqrt(var + eps)        # row statistics, fp32
    x ──▶ x̂ = (x − μ)·r ──affine chain──▶ y ──▶ consumers (linear, q/k/v, LoRA A)
    backward: the norm's dx reads x, μ, r; the consumers' dW read y

After::

    x̂ ──▶ s = cast(x̂, consumer dtype)        # saved (MUST_SAVE), shared by everyone
    backward: x̂' = float(s);  x' = x̂'/r + μ  # the norm's backward, unchanged, on x'
              y' = affine chain replayed on x̂' # the consumers' dW, on y'

``x`` and ``y`` leave the saved set; ``s`` (one tensor the size of ``y``)
replaces both, with the fp32 row statistics. The affine weight is never
divided out: ``y'`` is rebuilt forward from ``x̂'`` (``(y − β)/γ`` would blow
up where |γ| is small next to |β| in bf16).

Exactness. In fp32, ``s`` is ``x̂`` itself: ``y'`` equals ``y`` bit for bit and
``x'`` equals ``x`` to a few ulps of max(|x|, |μ|), so gradients agree with
inductor's to ~1e-6 relative. In bf16 models ``s`` is what the consumers save
anyway (``bf16(x̂)``), so the norm backward sees x̂ rounded to bf16 (2^-9
relative). Under autocast the consumers read bf16 while ``x`` is fp32: sharing
the bf16 copy (``norm_share_dtype="consumer"``, the default) rounds x̂ for the
norm's backward; ``"input"`` shares fp32 x̂ instead, exact but ~2x the bytes.
docs/how_it_works.md has the derivation and the measured cosines.

Each rebuilt node is tagged ``must_be_in_backward``, so the partitioner
computes it in backward from the saved ``s`` and the statistics rather than
saving it; :mod:`approxbp_fx.partition` then checks that ``x`` really left the
saved set and that the site's bytes fell, and keeps the site exact otherwise.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.utils.checkpoint import CheckpointPolicy

from ..config import ApproxBPConfig
from . import norm_match as nm
from . import pointwise as pw
from .graph_bytes import is_backward, nbytes
from .graph_edit import copy_meta, fake_run
from .rule import Baseline, Rule, SiteFields, register

__all__ = ["NormSite", "RULE", "find_sites", "predict", "apply_site"]

aten = torch.ops.aten
_convert = torch.ops.prims.convert_element_type.default


@dataclass(frozen=True, kw_only=True)
class NormSite(SiteFields):
    """One normalisation found in a joint graph (node names; stable across copies).

    ``x`` is its input, what inductor saves for the norm's backward.
    """

    kind: str  # "layer_norm" or "rms_norm"
    family: tuple[str, ...]  # x and its forward dtype casts
    mean: str | None  # fp32 row mean (layer_norm only)
    rstd: str  # fp32 1/sqrt(var + eps)
    xhat: str  # (x − μ)·r, the normalised tensor
    chain: tuple[str, ...]  # affine/cast/view nodes from x̂ to the consumers, graph order
    inner: tuple[str, ...]  # other full-size forward nodes of the norm (x − μ, x²)
    stats: tuple[str, ...]  # the row statistics and their casts (small; saved as they are)
    share_dtype: torch.dtype  # the dtype of the shared tensor s
    # What x is computed from by pointwise ops (a residual add's operands):
    # inductor often saves those and recomputes x, so they count as x's bytes.
    cone: tuple[str, ...]

    @property
    def key(self) -> str:
        # The statistic, not x: two norms may read one input (parallel branches).
        return self.rstd

    @property
    def op(self) -> str:
        return self.kind

    @property
    def nodes(self) -> set[str]:
        """The nodes the rewrite reads or replaces."""
        return {*self.family, *self.chain, *self.inner, *self.stats, self.xhat, *self.x_aliases, *self.aliases}

    # For ownership, every node of the norm counts as written: the rewrite
    # re-points their backward readers, and may mark one of them MUST_SAVE.
    reads = writes = nodes

    @property
    def tensors(self) -> set[str]:
        return self.nodes | set(self.cone)

    @property
    def must_leave_backward(self) -> tuple[str, ...]:
        # Nothing by name: where x and s cost the same (bf16), the partitioner may
        # save x and re-derive s from it; the bytes check decides.
        return ()


# --------------------------------------------------------------------------- finding


def find_sites(gm: fx.GraphModule, cfg: ApproxBPConfig) -> list[NormSite]:
    """Every LayerNorm/RMSNorm in ``gm`` whose input a rewrite could drop from the saved set."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    sites = []
    for rstd in gm.graph.find_nodes(op="call_function", target=aten.rsqrt.default):
        site = _match(rstd, order)
        if site is not None:
            sites.append(_decide(site, {n.name: n for n in gm.graph.nodes}, cfg))
    return sites


def _match(rstd: fx.Node, order) -> NormSite | None:
    """The norm whose statistic ``rstd`` is, as a site (not yet judged), or None."""
    found = nm.row_statistic(rstd)
    if found is None:
        return None
    kind, src, mean, stat_nodes, k = found
    x = nm.strip_casts(src)
    xv = pw.tensor_val(x)
    if xv is None or not xv.is_floating_point():
        return None
    family = nm.family_of(x)
    if src not in family:
        return None
    xhat, inner = _xhat(kind, rstd, family, mean, stat_nodes)
    if xhat is None or not pw.same_shape(xhat, x):
        return None
    chain = nm.affine_chain(xhat, x, k, order)
    stats = [*stat_nodes, *(c for s in stat_nodes for c in s.users if c.target in pw.CASTS and not is_backward(c))]
    full = [*family, *inner, xhat, *chain]
    names = lambda nodes: tuple(n.name for n in nodes)  # noqa: E731
    return NormSite(
        kind=kind,
        x=x.name,
        family=names(family),
        mean=mean.name if mean is not None else None,
        rstd=rstd.name,
        xhat=xhat.name,
        chain=names(chain),
        inner=names(inner),
        stats=names(stats),
        share_dtype=xhat.meta["val"].dtype,
        x_aliases=names([x, *pw.view_ancestors(x)]),
        aliases=tuple(sorted({v.name for n in full for v in [*pw.view_ancestors(n), *pw.view_descendants(n)]})),
        cone=names(nm.cone(x)),
        shape=tuple(xv.shape),
        dtype=xv.dtype,
    )


def _xhat(kind, rstd, family, mean, stat_nodes) -> tuple[fx.Node | None, list[fx.Node]]:
    """x̂, the one forward product of r with x (RMS) or with x − μ (LayerNorm), and the norm's other full-size nodes."""
    inner: list[fx.Node] = [stat_nodes[0]] if kind == "rms_norm" else []
    xhats = []
    for u in rstd.users:
        if u.target is not aten.mul.Tensor or is_backward(u):
            continue
        other = u.args[1] if u.args[0] is rstd else u.args[0]
        if kind == "rms_norm" and other in family:
            xhats.append(u)
        elif (
            kind == "layer_norm"
            and isinstance(other, fx.Node)
            and other.target is aten.sub.Tensor
            and other.args[0] in family
            and other.args[1] is mean
        ):
            xhats.append(u)
            inner.append(other)
    return (xhats[0] if len(xhats) == 1 else None), inner


def _decide(site: NormSite, nodes: dict[str, fx.Node], cfg: ApproxBPConfig) -> NormSite:
    """``site`` with the reason it must stay exact, or with the dtype of the tensor it will share."""
    if site.dtype not in cfg.dtypes:
        return site.with_skip(f"{site.dtype} inputs stay exact (ApproxBPConfig.dtypes)")
    # x itself may be the output of a checkpointed block (a pre-norm block
    # after a checkpointed one): that tags x, not the norm, so look only at
    # the nodes the norm computes.
    computed = [*site.family[1:], *site.inner, site.xhat, *site.chain, *site.stats]
    if any(nodes[n].meta.get("recompute") is not None for n in computed):
        return site.with_skip("inside an activation-checkpoint region")
    family = [nodes[n] for n in site.family]
    x_readers = [u for n in family for u in n.users if is_backward(u)]
    consumer_reads = [nodes[n] for n in [site.xhat, *site.chain] if any(is_backward(u) for u in nodes[n].users)]
    if not x_readers:
        return site.with_skip("the norm's backward does not read its input")
    foreign = nm.foreign_reader(x_readers, [nodes[n] for n in site.stats])
    if foreign is not None:
        return site.with_skip(f"backward reads the norm input outside the norm ({foreign.target})")
    share = _share_dtype(site, nodes, consumer_reads, cfg)
    if share is None:
        return site.with_skip("no consumer saves the normalised output: nothing to share")
    return dataclasses.replace(site, share_dtype=share)


def _share_dtype(site: NormSite, nodes: dict[str, fx.Node], consumer_reads, cfg: ApproxBPConfig):
    """The dtype of the tensor s the norm's backward will read x̂ from, or None if nothing is gained.

    ``"consumer"``: the lowest precision the consumers read x̂ in, in backward
    (what they save) or in forward (autocast's cast before a Linear). So under
    autocast s is bf16 even where no consumer saves anything (a frozen next
    layer, a norm whose only backward reader is its own weight's gradient):
    x (fp32) gives way to bf16 x̂, which the norm's backward reads rounded.
    ``"input"``: x's own dtype where that is narrower than x̂'s, else x̂'s; only
    where a consumer saves x̂ anyway (else s would cost what x costs).
    docs/norm_saved_bytes.md has the bytes and the precision of both.
    """
    xhat_dtype = site.share_dtype
    if cfg.norm_share_dtype == "input":
        if not consumer_reads:
            return None
        return site.dtype if site.dtype.itemsize <= xhat_dtype.itemsize else xhat_dtype
    read = [n.meta["val"].dtype for n in consumer_reads]
    read += [nodes[n].meta["val"].dtype for n in site.chain if nodes[n].target is _convert]
    share = min(read, key=lambda d: d.itemsize, default=None)
    if not consumer_reads and (share is None or share.itemsize >= site.dtype.itemsize):
        return None
    return share


# --------------------------------------------------------------------------- accounting


def predict(gm: fx.GraphModule, site: NormSite, base: Baseline, cfg: ApproxBPConfig) -> tuple[int, str]:
    """Bytes the site would keep saved after the rewrite, and why it would not pay."""
    nodes = {n.name: n for n in gm.graph.nodes}
    xv = nodes[site.x].meta["val"]
    shared = nbytes(xv) // xv.element_size() * site.share_dtype.itemsize
    # Statistics stay saved as the partitioner chose them (they are rows, not elements).
    stats = base.bytes_of(site.stats)
    after = shared + stats
    before = base.bytes_of(site.tensors)
    return after, f"inductor saves only {before} B here; sharing would keep {after} B"


# --------------------------------------------------------------------------- rewrite


def apply_site(gm: fx.GraphModule, site: NormSite, cfg: ApproxBPConfig) -> set[str]:
    """Rewrite one site in place; returns the names of the new saved candidates (``s``)."""
    assert site.skip is None, site
    graph = gm.graph
    nodes = {n.name: n for n in graph.nodes}
    region = {nodes[n] for n in (*site.family, *site.inner, site.xhat, *site.chain)}
    s = _shared_tensor(graph, nodes, site)
    # The whole point: the partitioner must save s, not re-derive it from x.
    s.meta["recompute"] = CheckpointPolicy.MUST_SAVE
    order = {n: i for i, n in enumerate(graph.nodes)}
    readers = sorted({u for n in region for u in n.users if is_backward(u)}, key=order.__getitem__)
    if readers:
        _Rebuild(graph, nodes, site, s, readers[0]).repoint(readers, region)
    return {s.name}


def _shared_tensor(graph: fx.Graph, nodes: dict[str, fx.Node], site: NormSite) -> fx.Node:
    """s: x̂ itself, the chain's own cast of it (Llama's x̂.to(bf16)), or a new cast to the shared dtype."""
    xhat = nodes[site.xhat]
    if site.share_dtype == xhat.meta["val"].dtype:
        return xhat
    for c in (nodes[n] for n in site.chain):
        if c.target is _convert and c.args[0] is xhat and c.args[1] == site.share_dtype:
            return c
    with graph.inserting_after(xhat):
        s = graph.call_function(_convert, (xhat, site.share_dtype))
    copy_meta(s, xhat, fake_run(_convert, (xhat, site.share_dtype)))
    return s


class _Rebuild:
    """The backward's copies of the norm's forward values, rebuilt from s and the statistics.

    Every node it emits goes before the first backward reader and is tagged
    ``must_be_in_backward``, so the partitioner computes it there from the
    saved s rather than saving it.
    """

    def __init__(self, graph: fx.Graph, nodes: dict[str, fx.Node], site: NormSite, s: fx.Node, first: fx.Node):
        self.graph, self.first = graph, first
        self.family = [nodes[n] for n in site.family]
        xhat = nodes[site.xhat]
        # Backward reads s through an alias: a replayed chain fed by s itself would be
        # node for node the forward one, and the partitioner's CSE would merge the
        # two back (and save y again).
        s_bw = self._emit(torch.ops.aten.alias.default, (s,), s)
        self.built: dict[fx.Node, fx.Node] = {} if s is xhat else {s: s_bw}
        xhat_bw = s_bw if s is xhat else self._emit(_convert, (s_bw, xhat.meta["val"].dtype), xhat)
        self.built[xhat] = xhat_bw
        # x' = x̂'/r (+ μ): the norm's input, rebuilt in the statistics' precision.
        self.x = self._emit(aten.div.Tensor, (xhat_bw, nodes[site.rstd]), xhat)
        if site.mean is not None:
            self.x = self._emit(aten.add.Tensor, (self.x, nodes[site.mean]), xhat)

    def _emit(self, op, args, like: fx.Node, kwargs=None) -> fx.Node:
        with self.graph.inserting_before(self.first):
            n = self.graph.call_function(op, args, kwargs or {})
        copy_meta(n, like, fake_run(op, args, kwargs), tag="must_be_in_backward")
        return n

    def of(self, n: fx.Node, region: set[fx.Node]) -> fx.Node:
        """The backward copy of forward node ``n`` of the norm's region."""
        if n not in self.built:
            if n in self.family:
                dt = n.meta["val"].dtype
                self.built[n] = self.x if dt == self.x.meta["val"].dtype else self._emit(_convert, (self.x, dt), n)
            else:
                args = fx.node.map_arg(n.args, lambda a: self.of(a, region) if a in region else a)
                self.built[n] = self._emit(n.target, args, n, dict(n.kwargs))
        return self.built[n]

    def repoint(self, readers: list[fx.Node], region: set[fx.Node]) -> None:
        """Make every backward reader of the region read the rebuilt copies."""
        x_dtype = self.x.meta["val"].dtype
        for u in readers:
            # A backward cast of x to fp32 is x' itself: skip a round trip through x's dtype.
            if u.target in pw.CASTS and u.args[0] in self.family and u.meta["val"].dtype == x_dtype:
                u.replace_all_uses_with(self.x)
                self.graph.erase_node(u)
                continue
            u.args = fx.node.map_arg(u.args, lambda a: self.of(a, region) if a in region else a)
            u.kwargs = fx.node.map_arg(u.kwargs, lambda a: self.of(a, region) if a in region else a)


RULE = register(Rule("share_norm_input", find_sites=find_sites, predict=predict, apply_site=apply_site))
