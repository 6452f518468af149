"""Approx-BP: an activation saves a k-bit derivative code instead of its input.

Before (joint graph, any spelling of h: erf/tanh GELU, GPT-2's formula,
QuickGELU, SiLU; casts and autocast included)::

    x ──h(x) as pointwise ops──▶ y ──▶ consumers
    g, x ──pointwise ops──▶ dx            # dx == g * h'(x); backward reads x

After::

    x ──h(x) as pointwise ops──▶ y ──▶ consumers        # untouched: inductor's forward, bit for bit
    x ──approxbp.act_pack──▶ (codes, nonfinite)
    g, codes, nonfinite ──approxbp.code_grad──▶ dx   # dx = g * level[code(x)]

``x`` leaves the saved set; ``codes`` (numel * bits / 8 bytes) and a 1-byte
flag, set if ``x`` held a NaN or ±inf (dx is then NaN, as the exact one would
be where it matters for GradScaler), take its place.
``y`` is saved only if a backward node other than ``dx`` reads it (a trainable
next linear's weight gradient): it is then an input of a matmul in backward,
which the partitioner never recomputes, so it saves ``y`` rather than ``x``.
That is why the rule does not pay in SwiGLU, where inductor recomputes
``silu(g)`` from ``g`` and saves only ``g``: :mod:`approxbp_fx.partition`
measures each site with the real partitioner and keeps the unprofitable ones
exact (a site where ``x`` is still in the backward graph after the rewrite
is one of them).

Recognition is sound, not sampled (:mod:`.pointwise`): the closure and the
gradient region hold only smooth ops, so a clamp, clip or ``where`` around
the activation is never taken for part of it; ``clip(gelu(x))`` is a GELU of
``x`` whose gradient reaches it through the clip's mask.
"""

from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import unset_fake_temporarily

from ..activations import ACTIVATIONS, activation_fn, exact_derivative
from ..coefficients import table
from ..config import ApproxBPConfig
from ..codes import packed_numel
from . import pointwise as pw
from .graph_bytes import hint, is_backward, nbytes
from .graph_edit import copy_meta, fake_run
from .rule import Baseline, Rule, SiteFields, register

__all__ = ["ActSite", "RULE", "find_sites", "predict", "apply_site"]

_act_pack = torch.ops.approxbp.act_pack.default
_code_grad = torch.ops.approxbp.code_grad.default

# Probe values of each exact activation and of g * h'(x), computed once.
_PROBE_Y = {name: activation_fn(name)(pw.PROBE_X) for name in ACTIVATIONS}
_PROBE_DX = {name: exact_derivative(name, pw.PROBE_X) for name in ACTIVATIONS}


@dataclass(frozen=True, kw_only=True)
class ActSite(SiteFields):
    """One activation found in a joint graph (node names; stable across copies).

    ``x`` is its input, what inductor would save; ``x_aliases`` and ``aliases``
    are the full-size views of x (its bases) and of the closure: the
    partitioner saves whichever alias is cheapest to reach, so accounting must
    see them all.
    """

    activation: str
    ys: tuple[str, ...]  # nodes equal to h(x)
    dx: str | None  # the node equal to g * h'(x); None if no gradient flows
    grad_region: tuple[str, ...]  # dx and the chain-rule nodes feeding it, which die with it
    g: str | None  # the incoming gradient
    closure: tuple[str, ...]  # every node that is a function of x alone (x included)

    @property
    def key(self) -> str:
        return self.x

    @property
    def op(self) -> str:
        return self.activation

    @property
    def tensors(self) -> set[str]:
        return {*self.closure, *self.x_aliases, *self.aliases}

    @property
    def reads(self) -> set[str]:
        # The forward stays as it is: x, its closure and the incoming gradient are only read.
        return {*self.tensors, *([self.g] if self.g else [])}

    @property
    def writes(self) -> set[str]:
        return {*([self.dx] if self.dx else []), *self.grad_region}

    @property
    def must_leave_backward(self) -> tuple[str, ...]:
        # Saved or recomputed, x in the backward graph means the codes bought nothing.
        return self.x_aliases


def find_sites(gm: fx.GraphModule, cfg: ApproxBPConfig) -> list[ActSite]:
    """Every activation of :data:`ACTIVATIONS` in ``gm``, with its backward if any."""
    # Partitioners run under the graph's FakeTensorMode; probing computes on real tensors.
    with unset_fake_temporarily():
        return _find_sites(gm, cfg)


def _find_sites(gm: fx.GraphModule, cfg: ApproxBPConfig) -> list[ActSite]:
    graph = gm.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    sites: list[ActSite] = []
    for x in graph.nodes:
        xv = pw.tensor_val(x)
        if xv is None or not xv.is_floating_point():
            continue
        # A cast of a float tensor is in its source's closure: find the site there.
        if x.target in pw.CASTS and pw.tensor_val(x.args[0]) is not None and x.args[0].meta["val"].is_floating_point():
            continue
        closure = pw.unary_closure(x, order)
        if closure is None or len(closure) < 2 or not pw.has_transcendental(closure):
            continue
        site = _classify(x, closure, order, cfg)
        if site is not None:
            sites.append(site)
    return sites


def _classify(x: fx.Node, closure: list[fx.Node], order, cfg: ApproxBPConfig) -> ActSite | None:
    env = pw.evaluate(closure, {x: pw.PROBE_X})
    found = None
    for name in ACTIVATIONS:
        hits = {n for n in closure[1:] if pw.matches(env[n], _PROBE_Y[name])}
        # Keep the outermost: a bf16 cast of the fp32 result also equals h(x),
        # and the fp32 node it casts dies with it. A residual h + gelu(h) is
        # in the closure too, so "outermost" means read by a non-match.
        ys = [n for n in closure if n in hits and any(u not in hits for u in n.users)]
        if ys:
            found = name, ys
            break
    if found is None:
        return None
    name, ys = found
    xv = x.meta["val"]
    site = ActSite(
        activation=name,
        x=x.name,
        ys=tuple(y.name for y in ys),
        dx=None,
        grad_region=(),
        g=None,
        closure=tuple(n.name for n in closure),
        x_aliases=tuple(n.name for n in [x, *pw.view_ancestors(x)]),
        aliases=tuple(sorted({v.name for n in closure for v in [*pw.view_ancestors(n), *pw.view_descendants(n)]})),
        shape=tuple(xv.shape),
        dtype=xv.dtype,
    )
    if any(n.meta.get("recompute") is not None for n in closure[1:]):
        # Activation checkpointing already drops x; a non-recomputable custom op would re-save it.
        # x itself (closure[0]) may be a checkpoint region's output, tagged but
        # saved as the region's result: the activation is then outside it.
        return site.with_skip("inside an activation-checkpoint region")

    dx, g, region, why = _find_gradient(x, closure, order, name)
    if dx is None:
        return site.with_skip(why)
    site = dataclasses.replace(site, dx=dx.name, g=g.name, grad_region=tuple(n.name for n in region))
    if name not in cfg.activations:
        return site.with_skip(f"{name} is not in ApproxBPConfig.activations")
    if xv.dtype not in cfg.dtypes:
        return site.with_skip(f"{xv.dtype} inputs stay exact (ApproxBPConfig.dtypes)")
    return site


def _find_gradient(x, closure, order, name):
    """``(dx, g, nodes feeding dx, None)`` for the node equal to ``g * h'(x)``, or ``(None, None, (), reason)``."""
    region = pw.linear_region(set(closure), order, x)
    if not region:
        return None, None, (), "no gradient flows through it"
    by_g: dict[fx.Node, list[fx.Node]] = {}
    for n in sorted(region, key=order.__getitem__):
        by_g.setdefault(region[n], []).append(n)
    hits = []
    for g, nodes in by_g.items():
        for n in pw.probe_region(nodes, closure, x, g, lambda xs, gs: gs * _PROBE_DX[name]):
            hits.append((n, g))
    # A cast of dx also equals g*h'(x); the outermost one is the gradient autograd hands on.
    outer = [(n, g) for n, g in hits if not any(u is m for u in n.users for m, _ in hits)]
    if len(outer) != 1:
        why = "no node computes g * h'(x)" if not outer else f"{len(outer)} gradient nodes read it"
        return None, None, (), f"backward not recognised: {why}"
    dx, g = outer[0]
    feeding, stack = {dx}, [dx]
    while stack:
        for a in pw.tensor_args(stack.pop()):
            if a in region and a not in feeding:
                feeding.add(a)
                stack.append(a)
    return dx, g, sorted(feeding, key=order.__getitem__), None


def apply_site(gm: fx.GraphModule, site: ActSite, cfg: ApproxBPConfig) -> set[str]:
    """Rewrite one site in place (see the module docstring); returns the new nodes' names.

    The forward is left as it is: ``act_pack`` only reads ``x``, beside the
    nodes that compute ``h(x)``, which keep computing it.
    """
    assert site.skip is None and site.dx is not None, site
    nodes = {n.name: n for n in gm.graph.nodes}
    x, dx, g = nodes[site.x], nodes[site.dx], nodes[site.g]
    first_y = nodes[site.ys[0]]  # find_sites lists them in graph order
    tab = table(site.activation, cfg.bits, cfg.table)
    graph = gm.graph

    pack_args = (x, list(tab.thresholds), cfg.bits)
    with graph.inserting_before(first_y):
        pack = graph.call_function(_act_pack, pack_args)
        vals = fake_run(_act_pack, pack_args)
        copy_meta(pack, first_y, vals)
        codes, nonfinite = (graph.call_function(operator.getitem, (pack, i)) for i in range(2))
        for node, val in zip((codes, nonfinite), vals):
            copy_meta(node, first_y, val)

    grad_args = (g, codes, nonfinite, list(tab.levels), cfg.bits, dx.meta["val"].dtype)
    with graph.inserting_before(dx):
        dx_new = graph.call_function(_code_grad, grad_args)
        copy_meta(dx_new, dx, fake_run(_code_grad, grad_args))
    dx.replace_all_uses_with(dx_new)
    _erase_dead(graph, [nodes[n] for n in site.grad_region])
    new = {pack, codes, nonfinite}
    return {n.name for n in new} | {v.name for n in new for v in pw.view_descendants(n)}


def predict(gm: fx.GraphModule, site: ActSite, base: Baseline, cfg: ApproxBPConfig) -> tuple[int, str]:
    """Bytes the site would keep saved after the rewrite, and why it would not pay."""
    nodes = {n.name: n for n in gm.graph.nodes}
    codes = hint(packed_numel(nodes[site.x].meta["val"].numel(), cfg.bits)) + 1  # + the non-finite flag
    dead = set(site.closure) | set(site.grad_region)

    def backward_users(node: fx.Node) -> list[fx.Node]:
        return [u for u in node.users if u.name not in dead and is_backward(u)]

    # y stays needed if backward reads it, or a view of it (GPT-2's Conv1D reads
    # y.view(-1, d)), for anything but the activation's own gradient; each form
    # of y backward reads costs its own bytes: under autocast a LoRA A reads
    # only the bf16 cast of the fp32 y (half the bytes of the first y).
    readers = {y: [u for v in [nodes[y], *pw.view_descendants(nodes[y])] for u in backward_users(v)] for y in site.ys}
    y_readers = [u for y in site.ys for u in readers[y]]
    y_bytes = sum(nbytes(nodes[y].meta["val"]) for y in site.ys if readers[y])
    # So does x, if backward reads it outside the activation.
    x_readers = backward_users(nodes[site.x])
    x_bytes = base.bytes_of(site.x_aliases) if x_readers else 0
    after = codes + y_bytes + x_bytes
    y_names = [n for y in site.ys for n in [y, *(v.name for v in pw.view_descendants(nodes[y]))]]
    if y_readers and not any(n in base.saved for n in y_names):
        why = (
            f"backward reads the {site.activation} output ({y_readers[0].target}), which inductor "
            f"recomputes from the input; saving it plus codes ({after} B) would exceed the "
            f"input it saves now"
        )
    elif x_readers:
        why = f"backward still reads the input elsewhere ({x_readers[0].target})"
    else:
        why = f"inductor saves only {base.bytes_of(site.tensors)} B here"
    return after, why


def _erase_dead(graph: fx.Graph, roots: list[fx.Node]) -> None:
    """Erase ``roots`` and their pointwise producers once nothing reads them."""
    stack, erased = list(roots), set()
    while stack:
        n = stack.pop()
        if n in erased or n.users or n.op != "call_function" or not pw.is_pointwise(n):
            continue
        args = pw.tensor_args(n)
        graph.erase_node(n)
        erased.add(n)
        stack.extend(args)


RULE = register(Rule("save_act_codes", find_sites=find_sites, predict=predict, apply_site=apply_site))
