"""What a LayerNorm or RMSNorm looks like in a joint graph, whatever its spelling.

The pieces :mod:`.share_norm_input` assembles a site from: the row statistic
``r = rsqrt(var + eps)`` (``var_mean`` for LayerNorm, ``mean(x²)`` for
RMSNorm), the input's family of casts, the affine chain from ``x̂`` to the
consumers, the pointwise cone ``x`` is computed from, and the test that tells
the norm's own backward readers of ``x`` from another op's.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from . import pointwise as pw
from .graph_bytes import is_backward

__all__ = ["strip_casts", "family_of", "row_statistic", "affine_chain", "cone", "foreign_reader"]

aten = torch.ops.aten

# How far downstream of a backward reader of x we look for the norm's own
# statistics; the norm backwards of every supported spelling mix them in
# within 2 hops (LayerNorm: at once; RMSNorm: through sum/mul/pow(r, 3)).
_OWN_READER_DEPTH = 6


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
    return v is not None and v.dim() == 0 and strip_casts(a).op == "placeholder"


def _trailing_dims(node: fx.Node, dims) -> int | None:
    """How many trailing dims ``dims`` names (a keepdim reduction over the last k dims), else None."""
    nd = node.meta["val"].dim()
    if not isinstance(dims, (list, tuple)) or not dims:
        return None
    norm = sorted(d % nd for d in dims)
    return len(norm) if norm == list(range(nd - len(norm), nd)) else None


def _keepdim(node: fx.Node, pos: int) -> bool:
    return bool(node.kwargs.get("keepdim", node.args[pos] if len(node.args) > pos else False))


def strip_casts(n: fx.Node) -> fx.Node:
    while n.target in pw.CASTS and isinstance(n.args[0], fx.Node) and pw.tensor_val(n.args[0]) is not None:
        if not n.args[0].meta["val"].is_floating_point():
            break
        n = n.args[0]
    return n


def family_of(x: fx.Node) -> list[fx.Node]:
    """``x`` and its forward float casts (casts of casts included)."""
    out, stack = [x], [x]
    while stack:
        for u in stack.pop().users:
            if u.target in pw.CASTS and not is_backward(u) and u not in out and pw.same_shape(u, x):
                out.append(u)
                stack.append(u)
    return out


def row_statistic(rstd: fx.Node):
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


def affine_chain(xhat: fx.Node, x: fx.Node, k: int, order) -> list[fx.Node]:
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


def cone(x: fx.Node, limit: int = 64) -> list[fx.Node]:
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


def foreign_reader(readers: list[fx.Node], stats: list[fx.Node]) -> fx.Node | None:
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
