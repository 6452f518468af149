"""Editing joint graphs the way every rule must (docs/invariants.md)."""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

__all__ = ["copy_meta", "fake_run"]

# AC tags describe the node they were put on; a replacement decides its own.
_NOT_COPIED = ("val", "tensor_meta", "recompute", "ac_graph_id")


def copy_meta(dst: fx.Node, src: fx.Node, val, tag: str | None = None) -> None:
    """Give ``dst`` the provenance of ``src`` and the fake value ``val``.

    The partitioner reads ``partitioner_tag`` (forward/backward); stack trace,
    seq_nr and module stack keep debuggers and profilers pointing at user code.
    ``tag`` overrides the partitioner tag (e.g. ``"must_be_in_backward"``).
    """
    for k, v in src.meta.items():
        if k not in _NOT_COPIED:
            dst.meta[k] = v
    dst.meta["val"] = val
    if tag is not None:
        dst.meta["partitioner_tag"] = tag


def fake_run(op, args, kwargs=None):
    """``op`` on the fake values of its node arguments, under the graph's fake mode."""
    vals, kvals = fx.node.map_arg((args, kwargs or {}), lambda n: n.meta["val"])
    fake_mode = torch._guards.detect_fake_mode(pytree.tree_leaves((vals, kvals)))
    with fake_mode:
        return op(*vals, **kvals)
