"""Recognise pointwise subgraphs by what they compute, not how they are spelled.

By the time a joint graph reaches us, ``F.gelu`` is ``mul/erf/add``, the
GPT-2 formula is ``pow/mul/tanh``, autocast has sprinkled dtype casts, and the
backward is whatever autograd's chain rule produced for the user's formula.
Matching each spelling is a losing game, so the rules use three facts instead:

* the *unary closure* of a node ``x``: every node whose tensor inputs are all
  ``x`` or already in the closure, i.e. every node that is a function of ``x``
  alone, built from the **smooth** ops of :data:`SMOOTH` only;
* *probing*: such a subgraph is evaluated in float64, with dtype casts as the
  identity, and compared with a known function at :data:`PROBE_X`;
* *soundness*: compositions of :data:`SMOOTH` ops are real-analytic wherever
  they are finite, and two analytic functions that agree to 1e-9 at the 161
  dense points of [-8, 8] agree everywhere (an analytic difference that
  vanishes on a set with an accumulation point vanishes identically; the
  tolerance stands in for "vanishes" against rounding). So a ``clamp``,
  ``where``, ``minimum``/``maximum``, ``abs``, ``sign``, rounding op or
  comparison, which can equal GELU on [-8, 8] and not beyond, never joins a
  closure: ``clip(gelu(x), -10, 10)`` is the GELU ``gelu(x)`` whose output a
  clip reads, and ``gelu(x.clamp(-10, 10))`` is a GELU of the clamp's output.
  The probes also run far outside [-8, 8] (up to 1e100, and down to
  subnormals), which backs the argument numerically: a closure must match
  there too wherever the known function is finite.

The probes hold no ±inf or NaN: the forward is never replaced, and a
rewritten backward is NaN wherever its input held one (the non-finite flag),
whatever the function, so probing there could prove nothing.
"""

from __future__ import annotations

import heapq
from typing import Callable, Iterable

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

aten = torch.ops.aten
prims = torch.ops.prims

# Casts change rounding, not the function: the probe treats them as identity.
CASTS = frozenset(
    {
        prims.convert_element_type.default,
        aten._to_copy.default,
        aten.to.dtype,
        aten.clone.default,
        aten.alias.default,
    }
)

# A closure containing none of these is affine in x and cannot be an activation.
TRANSCENDENTAL = frozenset(
    {
        aten.erf.default,
        aten.erfc.default,
        aten.tanh.default,
        aten.sigmoid.default,
        aten.exp.default,
        aten.expm1.default,
        aten.gelu.default,
        aten.silu.default,
        aten.gelu_backward.default,
        aten.silu_backward.default,
        aten.sigmoid_backward.default,
        aten.tanh_backward.default,
    }
)

# The ops a recognised closure or gradient region may contain (see the module
# docstring): real-analytic wherever finite. pow needs an integer exponent
# (checked in is_smooth), or x**p is not analytic at 0.
SMOOTH = CASTS | TRANSCENDENTAL | frozenset(
    {
        aten.add.Tensor,
        aten.add.Scalar,
        aten.sub.Tensor,
        aten.sub.Scalar,
        aten.rsub.Scalar,
        aten.rsub.Tensor,
        aten.mul.Tensor,
        aten.mul.Scalar,
        aten.div.Tensor,
        aten.div.Scalar,
        aten.neg.default,
        aten.reciprocal.default,
        aten.pow.Tensor_Scalar,
    }
)


def _probe_points() -> torch.Tensor:
    """Where closures are compared with the known functions, float64.

    161 dense points of [-8, 8] (where the activations bend: what pins the
    function down), then the tails out to 1e100 (past every float32/bfloat16
    value; x**3 still finite), small and subnormal magnitudes, and 64 seeded
    log-uniform points of either sign.
    """
    gen = torch.Generator().manual_seed(0)
    dense = torch.linspace(-8.0, 8.0, 161, dtype=torch.float64)
    mags = [10.0, 12.0, 16.0, 24.0, 32.0, 50.0, 100.0, 300.0, 1e3, 1e4, 1e6, 1e10, 1e20, 1e38, 1e100]
    mags += [1e-3, 1e-8, 1e-30, 1e-300, 2.0**-1074, 2.0**-1030]
    wide = torch.tensor(mags, dtype=torch.float64)
    rand = 10.0 ** (torch.rand(64, dtype=torch.float64, generator=gen) * 8 - 4)
    rand = rand * torch.where(torch.rand(64, generator=gen) < 0.5, -1.0, 1.0).double()
    return torch.cat([dense, wide, -wide, rand])


PROBE_X = _probe_points()
_PROBE_G = torch.randn(PROBE_X.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(0))
PROBE_G = _PROBE_G + torch.sign(_PROBE_G)  # bounded away from 0 so g*f(x) pins f
PROBE_RTOL = 1e-9
PROBE_ATOL = 1e-9

# Closures grow through pointwise users only; this bound keeps a pathological
# graph from costing quadratic time. Activation closures are ~10-40 nodes.
MAX_CLOSURE = 256


def is_pointwise(node: fx.Node) -> bool:
    if node.op != "call_function":
        return False
    target = node.target
    if target in CASTS:
        return True
    if not isinstance(target, torch._ops.OpOverload):
        return False
    tags = target.tags
    return torch.Tag.pointwise in tags and torch.Tag.nondeterministic_seeded not in tags


def is_smooth(node: fx.Node) -> bool:
    """A pointwise op of :data:`SMOOTH`: may join a closure or gradient region that is probed."""
    if node.target not in SMOOTH or not is_pointwise(node):
        return False
    if node.target in CASTS:
        # A cast to an integer dtype rounds: it is no identity.
        val, src = tensor_val(node), tensor_val(node.args[0]) if node.args else None
        return val is not None and src is not None and val.is_floating_point() and src.is_floating_point()
    if node.target is aten.pow.Tensor_Scalar:
        e = node.args[1]
        return isinstance(e, (int, float)) and not isinstance(e, bool) and float(e).is_integer()
    return True


def tensor_val(node) -> torch.Tensor | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val if isinstance(val, torch.Tensor) else None


def same_shape(a: fx.Node, b: fx.Node) -> bool:
    va, vb = tensor_val(a), tensor_val(b)
    if va is None or vb is None or va.dim() != vb.dim():
        return False
    return all(statically_known_true(x == y) for x, y in zip(va.shape, vb.shape))


def is_view(node: fx.Node) -> bool:
    """An ATen view of its first argument with the same number of elements."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return False
    rets = node.target._schema.returns
    if len(rets) != 1 or rets[0].alias_info is None or rets[0].alias_info.is_write:
        return False
    src, out = tensor_val(node.args[0]) if node.args else None, tensor_val(node)
    return src is not None and out is not None and statically_known_true(src.numel() == out.numel())


def view_ancestors(node: fx.Node) -> list[fx.Node]:
    """``node``'s bases through full-size views: what the partitioner may save instead of it."""
    out = []
    while is_view(node) and isinstance(node.args[0], fx.Node):
        node = node.args[0]
        out.append(node)
    return out


def view_descendants(node: fx.Node) -> list[fx.Node]:
    out, stack = [], [node]
    while stack:
        for u in stack.pop().users:
            if is_view(u) and u.args[0] is not None:
                out.append(u)
                stack.append(u)
    return out


def tensor_args(node: fx.Node) -> list[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda a: out.append(a) or a)
    return out


def _grow(starts, order: dict[fx.Node, int], visit) -> None:
    """Visit ``starts`` and the users of every node ``visit`` accepts, each once, in graph order.

    Graph order is topological, so one sweep in that order sees every argument
    before its user; a heap keeps the sweep ordered as it grows. ``visit(n)``
    returns True to grow from ``n``, False not to, None to stop.
    """
    heap = [(order[u], u) for u in starts]
    heapq.heapify(heap)
    seen: set[fx.Node] = set()
    while heap:
        _, n = heapq.heappop(heap)
        if n in seen:
            continue
        seen.add(n)
        accepted = visit(n)
        if accepted is None:
            return
        if accepted:
            for u in n.users:
                if u not in seen:
                    heapq.heappush(heap, (order[u], u))


def unary_closure(x: fx.Node, order: dict[fx.Node, int]) -> list[fx.Node] | None:
    """Nodes that are smooth functions of ``x`` alone, in graph order, ``x`` first.

    Returns None if the closure exceeds :data:`MAX_CLOSURE`.
    """
    members = {x}
    too_big = []

    def visit(n: fx.Node):
        if not is_smooth(n) or not same_shape(n, x) or not all(a in members for a in tensor_args(n)):
            return False
        members.add(n)
        if len(members) > MAX_CLOSURE:
            too_big.append(n)
            return None
        return True

    _grow(x.users, order, visit)
    return None if too_big else sorted(members, key=order.__getitem__)


def evaluate(nodes: Iterable[fx.Node], env: dict[fx.Node, torch.Tensor]) -> dict[fx.Node, torch.Tensor]:
    """Run pointwise ``nodes`` (graph order) in float64 over ``env``; casts are identity.

    Call outside any FakeTensorMode (see ``unset_fake_temporarily``): probes are real tensors.
    """
    env = dict(env)
    for n in nodes:
        if n in env:
            continue
        if n.target in CASTS:
            env[n] = env[n.args[0]]
            continue
        args, kwargs = fx.node.map_arg((n.args, n.kwargs), env.__getitem__)
        kwargs = {k: v for k, v in kwargs.items() if k != "dtype"}
        out = n.target(*args, **kwargs)
        env[n] = out.to(torch.float64) if out.is_floating_point() else out
    return env


def matches(value: torch.Tensor, expected: torch.Tensor) -> bool:
    """``value`` equals ``expected`` at every probe where ``expected`` is finite.

    A spelling that overflows where the function does not (``x / (1 + exp(-x))``
    differentiated at -1e100 is -1e100 * inf / inf = NaN) does not match: its
    own backward would be NaN there, and a finite step derivative would not be
    that spelling's gradient.
    """
    if value.shape != expected.shape or not value.is_floating_point():
        return False
    finite = expected.isfinite()
    if not bool(value[finite].isfinite().all()):
        return False
    return bool(torch.allclose(value[finite], expected[finite], rtol=PROBE_RTOL, atol=PROBE_ATOL))


def has_transcendental(nodes: Iterable[fx.Node]) -> bool:
    return any(n.target in TRANSCENDENTAL for n in nodes)


def linear_region(
    closure: set[fx.Node], order: dict[fx.Node, int], x: fx.Node
) -> dict[fx.Node, fx.Node]:
    """Smooth nodes outside ``closure`` that read it and exactly one other tensor ``g``.

    Returns ``{node: g}``: each node is a function of (x, g) alone, e.g. the
    chain-rule product ``g * h'(x)`` and its partial sums.
    """
    region: dict[fx.Node, fx.Node] = {}

    def visit(n: fx.Node):
        if not is_smooth(n) or not same_shape(n, x):
            return False
        leaves = {region.get(a, a) for a in tensor_args(n) if a not in closure}
        if len(leaves) != 1:
            return False
        (g,) = leaves
        if not same_shape(g, x):
            return False
        region[n] = g
        return None if len(region) > MAX_CLOSURE else True

    _grow([u for c in closure for u in c.users if u not in closure], order, visit)
    return region


def probe_region(
    region_nodes: list[fx.Node],
    closure: list[fx.Node],
    x: fx.Node,
    g: fx.Node,
    expected: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> list[fx.Node]:
    """The nodes of ``region_nodes`` (all reading the same ``g``) equal to ``expected(x, g)``."""
    env = evaluate(closure, {x: PROBE_X})
    env[g] = PROBE_G
    env = evaluate(region_nodes, env)
    want = expected(PROBE_X, PROBE_G)
    return [n for n in region_nodes if matches(env[n], want)]
