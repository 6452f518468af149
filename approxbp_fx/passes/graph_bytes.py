"""Sizes and sides of joint-graph nodes: what every rule's accounting needs."""

from __future__ import annotations

from typing import Iterable

import torch
import torch.fx as fx

from . import pointwise as pw

__all__ = ["hint", "nbytes", "is_backward", "saved_tensors", "saved_values_bytes"]


def hint(n) -> int:
    """A concrete size for a possibly symbolic one (its hint; 4096 if it has none)."""
    if isinstance(n, int):
        return n
    try:  # torch >= 2.12 names it optimization_hint; older ones expose the node hint.
        from torch.fx.experimental.symbolic_shapes import optimization_hint

        return int(optimization_hint(n, fallback=4096))
    except ImportError:
        h = n.node.hint
        return int(h) if h is not None else 4096


def nbytes(val) -> int:
    if not isinstance(val, torch.Tensor):
        return 0
    return hint(val.numel()) * val.element_size()


def is_backward(node: fx.Node) -> bool:
    """A node of the joint graph's backward half (AOTAutograd tags every node)."""
    return node.meta.get("partitioner_tag") in ("is_backward", "must_be_in_backward")


def saved_tensors(
    bw: fx.GraphModule,
    joint: fx.GraphModule | None = None,
    static_inputs: Iterable[int] | None = None,
) -> dict[str, int]:
    """Name -> bytes of the activations a backward graph receives from its forward.

    Parameters and buffers (``static_inputs``, the joint graph's
    ``static_lifetime_input_indices``) live all step anyway and are left out,
    with their views. Other graph inputs are activations of whoever called the
    graph, and saving one keeps it alive, so they count; a view counts as its
    base, once. Without ``static_inputs`` every graph input is taken as free.
    ``joint`` (the graph the partition came from) is needed to see views.
    """
    joint_nodes = {n.name: n for n in joint.graph.nodes} if joint is not None else {}
    inputs = [n for n in bw.graph.find_nodes(op="placeholder") if not n.name.startswith("tangents")]
    # A placeholder missing from the joint stands for itself (a graph input).
    return _bytes_by_base(((n.name, joint_nodes.get(n.name, n), n.meta.get("val")) for n in inputs), static_inputs)


def saved_values_bytes(values: Iterable[fx.Node], static_inputs: Iterable[int] | None = None) -> dict[str, int]:
    """:func:`saved_tensors` of a partition given as the joint-graph nodes it saves, before any graph is cut."""
    return _bytes_by_base(((n.name, n, n.meta.get("val")) for n in values), static_inputs)


def _bytes_by_base(saved, static_inputs: Iterable[int] | None) -> dict[str, int]:
    """``(name, joint node, value)`` of each saved tensor -> bytes by the name of what it keeps alive."""
    static = None if static_inputs is None else {f"primals_{i + 1}" for i in static_inputs}
    out: dict[str, int] = {}
    for name, src, val in saved:
        # A view counts as the tensor it views.
        base = [src, *pw.view_ancestors(src)][-1]
        if base.op == "placeholder" and (static is None or base.name in static):
            continue
        b = nbytes(val)
        if b:
            key = base.name if base.op == "placeholder" else name
            out[key] = max(out.get(key, 0), b)
    return out
