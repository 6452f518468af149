"""What keeps the partitioner's extra runs cheap: graph copies without codegen, and a frozen heap.

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
"""

from __future__ import annotations

import contextlib
import copy
import gc
from typing import Iterator

import torch.fx as fx

try:  # torch >= 2.3; inductor makes its own graph modules lazy the same way.
    from torch.fx._lazy_graph_module import _LazyGraphModule as _GraphModule
except ImportError:  # pragma: no cover
    _GraphModule = fx.GraphModule

__all__ = ["copy_graph", "frozen_heap"]


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
