"""Sizes and sides of joint-graph nodes: what every rule's accounting needs."""

from __future__ import annotations

import torch
import torch.fx as fx

from . import pointwise as pw

__all__ = ["hint", "nbytes", "is_backward", "saved_tensors"]


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


def _views_of_inputs(joint: fx.GraphModule) -> set[str]:
    names = set()
    for n in joint.graph.nodes:
        base = n
        while pw.is_view(base) and isinstance(base.args[0], fx.Node):
            base = base.args[0]
        if base is not n and base.op == "placeholder":
            names.add(n.name)
    return names


def saved_tensors(bw: fx.GraphModule, joint: fx.GraphModule | None = None) -> dict[str, int]:
    """Name -> bytes of the activations a backward graph receives from its forward.

    Primals (parameters and inputs) are left out: they are alive anyway. So
    are views of them, when the ``joint`` graph the partition came from is given.
    """
    free = _views_of_inputs(joint) if joint is not None else set()
    out = {}
    for n in bw.graph.find_nodes(op="placeholder"):
        if n.name.startswith(("tangents", "primals")) or n.name in free:
            continue
        b = nbytes(n.meta.get("val"))
        if b:
            out[n.name] = b
    return out
