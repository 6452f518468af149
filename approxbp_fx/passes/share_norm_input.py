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
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.utils.checkpoint import CheckpointPolicy

from ..config import ApproxBPConfig
from . import pointwise as pw
from .graph_bytes import is_backward, nbytes
from .graph_edit import apply_each, copy_meta, fake_run

__all__ = ["NormSite", "find_sites", "apply_sites", "predict", "rewrite"]

aten = torch.ops.aten
_convert = torch.ops.prims.convert_element_type.default

# How far downstream of a backward reader of x we look for the norm's own
# statistics; the norm backwards of every supported spelling mix them in
# within 2 hops (LayerNorm: at once; RMSNorm: through sum/mul/pow(r, 3)).
_OWN_READER_DEPTH = 6


@dataclass(frozen=True)
class NormSite:
    """One normalisation found in a joint graph (node names; stable across copies)."""

    kind: str  # "layer_norm" or "rms_norm"
    x: str  # the input; what inductor saves for the norm's backward
    family: tuple[str, ...]  # x and its forward dtype casts
    mean: str | None  # fp32 row mean (layer_norm only)
    rstd: str  # fp32 1/sqrt(var + eps)
    xhat: str  # (x − μ)·r, the normalised tensor
    chain: tuple[str, ...]  # affine/cast/view nodes from x̂ to the consumers, graph order
    inner: tuple[str, ...]  # other full-size forward nodes of the norm (x − μ, x²)
    stats: tuple[str, ...]  # the row statistics and their casts (small; saved as they are)
    share_dtype: torch.dtype  # the dtype of the shared tensor s
    x_aliases: tuple[str, ...]  # x and its full-size view bases
    aliases: tuple[str, ...]  # full-size views of the site's nodes
    # What x is computed from by pointwise ops (a residual add's operands):
    # inductor often saves those and recomputes x, so they count as x's bytes.
    cone: tuple[str, ...]
    shape: tuple
    dtype: torch.dtype
    skip: str | None = None

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
        """Every name under which the site's tensors can appear in a saved set."""
        return self.nodes | set(self.cone)

    @property
    def must_leave_backward(self) -> tuple[str, ...]:
        # Nothing by name: where x and s cost the same (bf16), the partitioner may
        # save x and re-derive s from it; the bytes check decides.
        return ()

    def with_skip(self, why: str) -> "NormSite":
        return dataclasses.replace(self, skip=why)


# --------------------------------------------------------------------------- matching


def _scalar(a) -> bool:
    return isinstance(a, (int, float)) and not isinstance(a, bool)


def _eps(a) -> bool:
    """A norm's epsilon: a Python number, or a lifted one.

    Under ``torch.compile(dynamic=True)`` dynamo does not specialise float
    attributes, so Hugging Face's ``self.variance_epsilon`` reaches the graph
    as a 0-d tensor input (cast to fp32), not as a constant.
    """
    if _scalar(a):
        return True
    if not isinstance(a, fx.Node):
        return False
    v = pw.tensor_val(a)
    return v is not None and v.dim() == 0 and _strip_casts(a).op == "placeholder"


def _trailing_dims(node: fx.Node, dims) -> int | None:
    """How many trailing dims ``dims`` names (a keepdim reduction over the last k dims), else None."""
    nd = node.meta["val"].dim()
    if not isinstance(dims, (list, tuple)) or not dims:
        return None
    norm = sorted(d % nd for d in dims)
    return len(norm) if norm == list(range(nd - len(norm), nd)) else None


def _keepdim(node: fx.Node, pos: int) -> bool:
    return bool(node.kwargs.get("keepdim", node.args[pos] if len(node.args) > pos else False))


def _strip_casts(n: fx.Node) -> fx.Node:
    while n.target in pw.CASTS and isinstance(n.args[0], fx.Node) and pw.tensor_val(n.args[0]) is not None:
        if not n.args[0].meta["val"].is_floating_point():
            break
        n = n.args[0]
    return n


def _family(x: fx.Node) -> list[fx.Node]:
    """``x`` and its forward float casts (casts of casts included)."""
    out, stack = [x], [x]
    while stack:
        for u in stack.pop().users:
            if u.target in pw.CASTS and not is_backward(u) and u not in out and pw.same_shape(u, x):
                out.append(u)
                stack.append(u)
    return out


def _stat_of(rstd: fx.Node):
    """``(kind, stat input, mean, stat nodes, k)`` if ``rstd`` is rsqrt(var + eps) of a row statistic."""
    if rstd.target is not aten.rsqrt.default or is_backward(rstd):
        return None
    add = rstd.args[0]
    if not isinstance(add, fx.Node) or add.target not in (aten.add.Tensor, aten.add.Scalar):
        return None
    v, eps = add.args[0], add.args[1]
    if not isinstance(v, fx.Node) or not _eps(eps):
        return None
    if v.target is operator.getitem and v.args[1] == 0 and v.args[0].target is aten.var_mean.correction:
        vm = v.args[0]
        src = vm.args[0]
        correction = vm.kwargs.get("correction", 1)
        if correction != 0 or not vm.kwargs.get("keepdim", False):
            return None
        k = _trailing_dims(src, vm.args[1] if len(vm.args) > 1 else vm.kwargs.get("dim"))
        means = [u for u in vm.users if u.target is operator.getitem and u.args[1] == 1]
        if k is None or len(means) != 1:
            return None
        return "layer_norm", src, means[0], [vm, v, means[0], add, rstd], k
    if v.target is aten.mean.dim and _keepdim(v, 2):
        sq = v.args[0]
        if sq.target is aten.pow.Tensor_Scalar and sq.args[1] == 2:
            src = sq.args[0]
        elif sq.target is aten.mul.Tensor and sq.args[0] is sq.args[1]:
            src = sq.args[0]
        else:
            return None
        k = _trailing_dims(sq, v.args[1])
        if k is None:
            return None
        return "rms_norm", src, None, [sq, v, add, rstd], k
    return None


def _is_vector(a: fx.Node, x: fx.Node, k: int) -> bool:
    """A tensor that broadcasts along the normalised dims only: an affine weight or bias."""
    v, xv = pw.tensor_val(a), x.meta["val"]
    if v is None or v.dim() > xv.dim() or is_backward(a):
        return False
    lead = xv.dim() - k  # batch dims of x; right-aligned, the vector must be 1 there
    shape = [1] * (xv.dim() - v.dim()) + list(v.shape)
    return all(pw.statically_known_true(s == 1) for s in shape[:lead])


def _chain(xhat: fx.Node, x: fx.Node, k: int, order) -> list[fx.Node]:
    """Forward nodes that are functions of x̂ and affine vectors only: casts, ·γ, +β, views."""
    members = {xhat}
    out: list[fx.Node] = []
    numel = xhat.meta["val"].numel()
    stack = list(xhat.users)
    while stack:
        u = stack.pop()
        if u in members or is_backward(u) or pw.tensor_val(u) is None:
            continue
        if not pw.statically_known_true(u.meta["val"].numel() == numel):
            continue
        if pw.is_view(u):
            ok = u.args[0] in members
        elif pw.is_pointwise(u):
            args = pw.tensor_args(u)
            ok = any(a in members for a in args) and all(a in members or _is_vector(a, x, k) for a in args)
        else:
            ok = False
        if ok:
            members.add(u)
            out.append(u)
            stack.extend(u.users)
    return sorted(out, key=order.__getitem__)


def _cone(x: fx.Node, limit: int = 64) -> list[fx.Node]:
    """The nodes ``x`` is computed from through pointwise ops and views (bounded)."""
    out: list[fx.Node] = []
    stack = [a for a in pw.tensor_args(x)] if (pw.is_pointwise(x) or pw.is_view(x)) else []
    while stack and len(out) < limit:
        n = stack.pop()
        if n in out or pw.tensor_val(n) is None:
            continue
        out.append(n)
        if pw.is_pointwise(n) or pw.is_view(n):
            stack.extend(pw.tensor_args(n))
    return out


def find_sites(gm: fx.GraphModule, cfg: ApproxBPConfig) -> list[NormSite]:
    """Every LayerNorm/RMSNorm in ``gm`` whose input a rewrite could drop from the saved set."""
    graph = gm.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    sites = []
    for rstd in graph.find_nodes(op="call_function", target=aten.rsqrt.default):
        site = _classify(rstd, order, cfg)
        if site is not None:
            sites.append(site)
    return sites


def _classify(rstd: fx.Node, order, cfg: ApproxBPConfig) -> NormSite | None:
    found = _stat_of(rstd)
    if found is None:
        return None
    kind, src, mean, stat_nodes, k = found
    x = _strip_casts(src)
    xv = pw.tensor_val(x)
    if xv is None or not xv.is_floating_point():
        return None
    family = _family(x)
    if src not in family:
        return None
    # x̂: the forward product of r with x (RMS) or with x − μ (LayerNorm).
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
    if len(xhats) != 1 or not pw.same_shape(xhats[0], x):
        return None
    xhat = xhats[0]
    chain = _chain(xhat, x, k, order)
    stats = [*stat_nodes, *(c for s in stat_nodes for c in s.users if c.target in pw.CASTS and not is_backward(c))]

    full = [*family, *inner, xhat, *chain]
    site = NormSite(
        kind=kind,
        x=x.name,
        family=tuple(n.name for n in family),
        mean=mean.name if mean is not None else None,
        rstd=rstd.name,
        xhat=xhat.name,
        chain=tuple(n.name for n in chain),
        inner=tuple(n.name for n in inner),
        stats=tuple(n.name for n in stats),
        share_dtype=xhat.meta["val"].dtype,
        x_aliases=tuple(n.name for n in [x, *pw.view_ancestors(x)]),
        aliases=tuple(sorted({v.name for n in full for v in [*pw.view_ancestors(n), *pw.view_descendants(n)]})),
        cone=tuple(n.name for n in _cone(x)),
        shape=tuple(xv.shape),
        dtype=xv.dtype,
    )
    if not cfg.share_norm_input:
        return site.with_skip("ApproxBPConfig.share_norm_input is off")
    if xv.dtype not in cfg.dtypes:
        return site.with_skip(f"{xv.dtype} inputs stay exact (ApproxBPConfig.dtypes)")
    # x itself may be the output of a checkpointed block (a pre-norm block
    # after a checkpointed one): that tags x, not the norm, so look only at
    # the nodes the norm computes.
    if any(n.meta.get("recompute") is not None for n in [*full[1:], *stat_nodes]):
        return site.with_skip("inside an activation-checkpoint region")

    x_readers = [u for n in family for u in n.users if is_backward(u)]
    consumer_reads = [n for n in [xhat, *chain] if any(is_backward(u) for u in n.users)]
    if not x_readers:
        return site.with_skip("the norm's backward does not read its input")
    if not consumer_reads:
        return site.with_skip("no consumer saves the normalised output: nothing to share")
    foreign = _foreign_reader(x_readers, [*stat_nodes, *stats])
    if foreign is not None:
        return site.with_skip(f"backward reads the norm input outside the norm ({foreign.target})")

    # The shared tensor: what the consumers' backward reads, at its lowest precision.
    if cfg.norm_share_dtype == "consumer":
        share = min((n.meta["val"].dtype for n in consumer_reads), key=lambda d: d.itemsize)
    else:
        share = xv.dtype if xv.dtype.itemsize <= xhat.meta["val"].dtype.itemsize else xhat.meta["val"].dtype
    return dataclasses.replace(site, share_dtype=share)


def _foreign_reader(readers: list[fx.Node], stats: list[fx.Node]) -> fx.Node | None:
    """A backward reader of x that is not part of the norm's own backward, if any.

    The norm's backward mixes x with its own statistics within a few ops;
    another op's backward reading x (a linear fed by x as well) never does.
    Such a reader must keep the true x, so the site stays exact.
    """
    # Backward may reach a statistic through forward views of it (autograd's
    # saved detach(rsqrt) in undecomposed graphs), so views pass the taint on.
    tainted: set[fx.Node] = set()
    stack = [u for s in stats for u in s.users if is_backward(u) or pw.is_view(u)]
    while stack:
        n = stack.pop()
        if n in tainted:
            continue
        tainted.add(n)
        stack.extend(u for u in n.users if is_backward(u) or pw.is_view(u))
    for r in readers:
        frontier, seen, hit = [r], set(), False
        for _ in range(_OWN_READER_DEPTH):
            if any(n in tainted for n in frontier):
                hit = True
                break
            nxt = []
            for n in frontier:
                for u in n.users:
                    if u not in seen and is_backward(u):
                        seen.add(u)
                        nxt.append(u)
            frontier = nxt
        if not hit:
            return r
    return None


# --------------------------------------------------------------------------- accounting


def predict(gm: fx.GraphModule, site: NormSite, base_saved: dict[str, int], cfg: ApproxBPConfig) -> tuple[int, str]:
    """Bytes the site would keep saved after the rewrite, and why it would not pay."""
    nodes = {n.name: n for n in gm.graph.nodes}
    xv = nodes[site.x].meta["val"]
    shared = nbytes(xv) // xv.element_size() * site.share_dtype.itemsize
    # Statistics stay saved as the partitioner chose them (they are rows, not elements).
    stats = sum(base_saved.get(n, 0) for n in site.stats)
    after = shared + stats
    before = sum(base_saved.get(n, 0) for n in site.tensors)
    return after, f"inductor saves only {before} B here; sharing would keep {after} B"


# --------------------------------------------------------------------------- rewrite


def apply_site(gm: fx.GraphModule, site: NormSite, cfg: ApproxBPConfig) -> set[str]:
    """Rewrite one site in place; returns the names of the new saved candidates (``s``)."""
    assert site.skip is None, site
    graph = gm.graph
    nodes = {n.name: n for n in graph.nodes}
    xhat = nodes[site.xhat]
    rstd = nodes[site.rstd]
    mean = nodes[site.mean] if site.mean else None
    family = [nodes[n] for n in site.family]
    chain = [nodes[n] for n in site.chain]
    inner = [nodes[n] for n in site.inner]
    region = {*family, *inner, xhat, *chain}

    # s: reuse the chain's own cast of x̂ when it is exactly the shared tensor (Llama's x̂.to(bf16)).
    if site.share_dtype == xhat.meta["val"].dtype:
        s = xhat
    else:
        casts = [c for c in chain if c.target is _convert and c.args[0] is xhat and c.args[1] == site.share_dtype]
        if casts:
            s = casts[0]
        else:
            with graph.inserting_after(xhat):
                s = graph.call_function(_convert, (xhat, site.share_dtype))
            copy_meta(s, xhat, fake_run(_convert, (xhat, site.share_dtype)))
    # The whole point: the partitioner must save s, not re-derive it from x.
    s.meta["recompute"] = CheckpointPolicy.MUST_SAVE

    order = {n: i for i, n in enumerate(graph.nodes)}
    readers = sorted({u for n in region for u in n.users if is_backward(u)}, key=order.__getitem__)
    if not readers:
        return {s.name}
    first = readers[0]
    bw = "must_be_in_backward"
    built: dict[fx.Node, fx.Node] = {}

    def emit(op, args, like: fx.Node) -> fx.Node:
        with graph.inserting_before(first):
            n = graph.call_function(op, args)
        copy_meta(n, like, fake_run(op, args), tag=bw)
        return n

    # Backward reads s through an alias: a replayed chain fed by s itself would be
    # node for node the forward one, and the partitioner's CSE would merge the
    # two back (and save y again).
    s_bw = emit(aten.alias.default, (s,), s)
    if s is not xhat:
        built[s] = s_bw
    xhat_bw = s_bw if s is xhat else emit(_convert, (s_bw, xhat.meta["val"].dtype), xhat)
    built[xhat] = xhat_bw
    # x' = x̂'/r (+ μ): the norm's input, rebuilt in the statistics' precision.
    x_rec = emit(aten.div.Tensor, (xhat_bw, rstd), xhat)
    if mean is not None:
        x_rec = emit(aten.add.Tensor, (x_rec, mean), xhat)

    def rebuild(n: fx.Node) -> fx.Node:
        if n in built:
            return built[n]
        if n in family:
            dt = n.meta["val"].dtype
            out = x_rec if dt == x_rec.meta["val"].dtype else emit(_convert, (x_rec, dt), n)
        else:
            args = fx.node.map_arg(n.args, lambda a: rebuild(a) if a in region else a)
            with graph.inserting_before(first):
                out = graph.call_function(n.target, args, dict(n.kwargs))
            copy_meta(out, n, fake_run(n.target, args, n.kwargs), tag=bw)
        built[n] = out
        return out

    dead: list[fx.Node] = []
    for u in readers:
        # A backward cast of x to fp32 is x' itself: skip a round trip through x's dtype.
        if u.target in pw.CASTS and u.args[0] in family and u.meta["val"].dtype == x_rec.meta["val"].dtype:
            u.replace_all_uses_with(x_rec)
            dead.append(u)
            continue
        u.args = fx.node.map_arg(u.args, lambda a: rebuild(a) if a in region else a)
        u.kwargs = fx.node.map_arg(u.kwargs, lambda a: rebuild(a) if a in region else a)
    for u in dead:
        graph.erase_node(u)
    return {s.name}


def apply_sites(gm: fx.GraphModule, sites: list[NormSite], cfg: ApproxBPConfig) -> dict[str, set[str]]:
    """Rewrite the given (rewritable) sites of ``gm``; returns site key -> new saved-candidate names."""
    return apply_each(gm, sites, lambda site: apply_site(gm, site, cfg))


def rewrite(gm: fx.GraphModule, cfg: ApproxBPConfig) -> int:
    """Rewrite every rewritable site; returns the count."""
    if not cfg.share_norm_input:
        return 0
    return len(apply_sites(gm, [s for s in find_sites(gm, cfg) if s.skip is None], cfg))
