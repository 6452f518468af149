"""What keeps the partitioner's extra runs cheap: graph copies without codegen, a frozen heap, cut-only runs.

:class:`approxbp_fx.partition.ApproxBPPartitioner` runs inductor's partitioner
more than once per graph (once per recompute mode on the untouched graph, then
on the rewritten copy), and each run needs a graph of its own, since the
partitioner edits what it is given. Two costs of that are not the partitioner's
work and are avoided here:

* **Codegen of every copy.** ``fx.GraphModule(root, graph)`` generates and
  ``exec``\\ s the module's Python source at once, about 0.1 s for a 4-layer
  GPT-2 joint graph, and the partitioner regenerates it first thing anyway.
  Copies are ``_LazyGraphModule``\\ s, as inductor's own graph modules are:
  the source is made if anyone reads it or calls the module, never otherwise.
* **Full garbage collections of the whole process.** Each run allocates
  hundreds of thousands of objects (nodes, their metadata, pytree nodes), so
  CPython's generational collector runs full collections during our runs, and
  each one walks every object of the process: the model, torch's modules, the
  fake tensors. Measured on the 4-layer GPT-2 of ``benchmarks.compile_time``,
  that was 0.6-0.8 s of a 4 s partitioner. :func:`frozen_heap` moves the
  objects that exist when the partitioner starts to CPython's permanent
  generation (``gc.freeze``) and back when it ends (``gc.unfreeze``), so a
  collection meanwhile walks only what the runs allocate, and the runs'
  garbage is still collected. Nothing is frozen if the process already froze
  objects (``gc.get_freeze_count()``): unfreezing would undo that.
* **Cutting graphs nobody uses.** Of inductor's partition of the untouched
  graph, in each recompute mode, only the saved set is needed unless that
  partition is returned: after a kept rewrite, none is. The min-cut
  partitioner chooses the saved nodes, then spends about 40% of its time
  building the forward and backward modules from them.
  :func:`saved_set_only` stops it at that hand-over
  (``partitioners._extract_fwd_bwd_modules``, whose first two arguments are
  the joint graph and the chosen nodes in every torch we read, 2.1 to 2.13)
  and derives the saved set from the joint graph, as the modules would have
  it (:func:`_read_by_backward`). If the hand-over is never reached, the run
  completes and its partition is returned instead; tests compare measured
  with built saved sets, so a torch that changes the hand-over fails them.
"""

from __future__ import annotations

import contextlib
import copy
import gc
from typing import Callable, Iterator

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from .passes.graph_bytes import is_backward

try:  # torch >= 2.3; inductor makes its own graph modules lazy the same way.
    from torch.fx._lazy_graph_module import _LazyGraphModule as _GraphModule
except ImportError:  # pragma: no cover
    _GraphModule = fx.GraphModule

__all__ = ["MODES", "recompute_mode", "copy_graph", "frozen_heap", "saved_set_only"]

# ApproxBPConfig.recompute -> the settings of ban_recompute_materialized_backward to partition with.
MODES = {"auto": ("banned", "allowed"), "banned": ("banned",), "allowed": ("allowed",)}


def recompute_mode(mode: str):
    """One recompute mode as functorch's config, for the baseline and every trial of that mode alike."""
    from torch._functorch import config as functorch_config

    return functorch_config.patch(ban_recompute_materialized_backward=mode == "banned")


def copy_graph(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy whose graph a trial may mutate (the partitioner DCEs and tags it).

    Only the graph is copied; attributes (lifted constants) are shared. A
    deepcopy of the module would clone real constant tensors while the
    partitioner's FakeTensorMode is active, which torch refuses (seen on GPT-2
    under PEFT: "set the storage of a tensor on device meta ... cpu").
    The graph is copied as ``Graph.__deepcopy__`` does, node by node, except
    that its pytree codegen is shared, not deep-copied: nothing here changes
    it, and deep-copying its TreeSpecs warns (a FutureWarning per compile on
    torch 2.13 that plain inductor never prints).
    """
    src = gm.graph
    graph = fx.Graph(tracer_cls=src._tracer_cls)
    output_vals = graph.graph_copy(src, {}, return_output_node=True)
    graph._codegen = copy.copy(src._codegen)
    if output_vals is not None:
        value, old_output = output_vals
        new_output = graph.output(value, type_expr=getattr(old_output, "type", None))
        new_output.meta = copy.copy(old_output.meta)
    out = _GraphModule(gm, graph, class_name=type(gm).__name__)
    out.meta = dict(getattr(gm, "meta", {}))
    return out


@contextlib.contextmanager
def frozen_heap() -> Iterator[None]:
    """Exclude the objects alive now from garbage collections until the block ends (see module docstring)."""
    if not gc.isenabled() or gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


_WAIT = getattr(getattr(torch.ops, "_c10d_functional", None), "wait_tensor", None)
_WAIT = getattr(_WAIT, "default", None)


class _Cut(Exception):
    """Raised at the min-cut partitioner's hand-over: the joint graph and the nodes it chose to save."""

    def __init__(self, joint: fx.GraphModule, saved_values: list) -> None:
        super().__init__("approxbp: the partition was measured, not built")
        self.joint, self.saved_values = joint, saved_values


def saved_set_only(partition: Callable[[], tuple], num_fwd_outputs: int) -> tuple | list[fx.Node]:
    """``partition()`` stopped once the min-cut partitioner has chosen what to save.

    Returns the joint-graph nodes the backward graph would receive, or, if the
    partitioner returned without reaching the hand-over (another torch, or a
    path that does not cut), its ``(forward, backward)`` modules.
    """
    from torch._functorch import partitioners

    extract = partitioners._extract_fwd_bwd_modules

    def stop(joint_module, saved_values, *args, **kwargs):
        raise _Cut(joint_module, list(saved_values))

    partitioners._extract_fwd_bwd_modules = stop
    try:
        return partition()
    except _Cut as cut:
        return _read_by_backward(cut.joint.graph, cut.saved_values, num_fwd_outputs)
    finally:
        partitioners._extract_fwd_bwd_modules = extract


def _read_by_backward(graph: fx.Graph, saved_values: list[fx.Node], num_fwd_outputs: int) -> list[fx.Node]:
    """The saved values backward reads: those on a path to a gradient output that no other saved value cuts.

    ``_extract_fwd_bwd_modules`` drops a saved value whose placeholder has no
    user in the extracted (dead-code-eliminated) backward graph; this is that
    rule on the joint graph.
    """
    (output,) = graph.find_nodes(op="output")
    roots = [a for a in pytree.arg_tree_leaves(*output.args)[num_fwd_outputs:] if isinstance(a, fx.Node)]
    # Dead-code elimination also keeps impure backward nodes, except a collective's unused wait.
    roots += [n for n in graph.nodes if is_backward(n) and n.is_impure() and n.target is not _WAIT]
    saved = set(saved_values)
    read, seen, stack = set(), set(), roots
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n in saved:
            read.add(n)
        elif n.op != "placeholder":
            stack.extend(n.all_input_nodes)
    return [n for n in saved_values if n in read]
