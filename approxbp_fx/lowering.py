"""After the cut: ``approxbp::act_pack`` / ``approxbp::code_grad`` become aten ops inductor fuses.

The pipeline's third stage (:mod:`approxbp_fx.passes`). The joint-graph rule
(:mod:`approxbp_fx.passes.save_act_codes`) inserts the two custom ops
because the partitioner must see them whole: an opaque op that outputs the
codes cannot be recomputed from ``x``, so the partitioner saves the codes and
lets ``x`` die. Once the forward and backward graphs are cut, that job is done,
and keeping the ops opaque only costs speed:

* each call is an extern kernel launched through Python (tens of µs of host
  time per call on CUDA, measured in docs/kernels.md at small sizes);
* inductor cannot fuse across it: the bias add before the activation, the
  cast after it, and the bias-gradient reduction after ``dx`` each make an
  extra pass over memory.

So, post-partition, each call is replaced by the aten ops of its plain-torch
implementation (:func:`~approxbp_fx.kernels.act_codes.act_pack_torch` and
``code_grad_torch``, the very code the ops run on CPU), traced with
inductor's decompositions. Inductor then generates and fuses the kernels,
Triton on CUDA and C++ on CPU: the pack joins the kernel that computes the
activation from the same ``x``. The saved set is unchanged: the codes are
still a forward output consumed by backward, with the same bytes.

Maths (``bits = k``, ``per = 8 // k`` codes a byte, thresholds ``c``,
levels ``l``)::

    code_i  = #{j : x_i > c_j}                      (float32 compare, NaN -> 0)
    byte_b  = Σ_{s<per} code_{b·per+s} << (s·k)      (fields disjoint: Σ == OR)
    flag    = any_i(x_i is NaN or ±inf)              (a 0-d reduction)
    dx_i    = NaN if flag else g_i · l[(byte_{i // per} >> ((i % per)·k)) & (2^k − 1)]

identical, element for element, to the Triton kernels.
"""

from __future__ import annotations

import contextlib
import functools
import operator

import torch
import torch.fx as fx
from torch._dispatch.python import enable_python_dispatcher
from torch.fx.experimental.proxy_tensor import make_fx

from .kernels.act_codes import act_pack_torch, code_grad_torch
from .kernels.bit_masks import pack_bits_torch, unpack_bits_torch

__all__ = ["lower"]

_act_pack = torch.ops.approxbp.act_pack.default
_code_grad = torch.ops.approxbp.code_grad.default
_pack_bits = torch.ops.approxbp.pack_bits.default
_unpack_bits = torch.ops.approxbp.unpack_bits.default


@functools.lru_cache(maxsize=1)
def _decompositions() -> dict:
    # Inductor's own table, so aten.gelu & co. arrive as the primitives inductor lowers.
    from torch._inductor.decomposition import select_decomp_table

    return select_decomp_table()


def _trace(fn, vals) -> fx.GraphModule:
    """``fn`` traced to aten ops on the node's fake values (their fake mode and shape env)."""
    mode = torch._guards.detect_fake_mode(vals)
    # The python dispatcher runs the SymInt-aware decompositions, as inductor's
    # own pattern replacements trace (pattern_matcher.fwd_only).
    with mode if mode is not None else contextlib.nullcontext(), enable_python_dispatcher():
        return make_fx(fn, decomposition_table=_decompositions(), tracing_mode="real")(*vals)


class _Traces:
    """The traces of one graph's lowering, reused across calls with the same signature.

    A model calls each op with the same shapes once a layer, and tracing is
    most of the lowering's cost (about 75 ms a call on CPU), so the second
    call of a signature copies the first's graph instead. Only signatures
    with concrete sizes are kept: a SymInt is not hashable, and its trace
    holds the graph's symbols. A copy must not share the trace's fake values
    (alias analysis reads their storages), so it re-runs them (:meth:`inline`).
    """

    def __init__(self) -> None:
        self._cache: dict[tuple, fx.GraphModule] = {}

    @staticmethod
    def _signature(static: tuple | None, vals: list) -> tuple | None:
        if static is None:
            return None
        sig = [static]
        for v in vals:
            dims = (*v.shape, *v.stride())
            if not all(isinstance(d, int) for d in dims):
                return None
            sig.append((tuple(v.shape), v.stride(), v.dtype, v.device))
        return tuple(sig)

    def inline(self, graph: fx.Graph, node: fx.Node, fn, inputs: list[fx.Node], static: tuple | None):
        """``fn(*inputs)`` as aten ops before ``node``; returns the output value (node or nodes)."""
        vals = [n.meta["val"] for n in inputs]
        key = self._signature(static, vals)
        traced = self._cache.get(key) if key is not None else None
        reused = traced is not None
        if not reused:
            traced = _trace(fn, vals)
            if key is not None:
                self._cache[key] = traced
        placeholders = [n for n in traced.graph.nodes if n.op == "placeholder"]
        env = dict(zip(placeholders, inputs))
        with graph.inserting_before(node):
            out = graph.graph_copy(traced.graph, env)
        if reused:
            _refake([env[n] for n in traced.graph.nodes if n.op == "call_function"])
        return out


def _refake(nodes: list[fx.Node]) -> None:
    """Fresh fake values for copied nodes, in order: views alias their own bases, nothing else."""
    mode = torch._guards.detect_fake_mode([n.meta["val"] for n in nodes])
    with mode:
        for n in nodes:
            args, kwargs = fx.node.map_arg((n.args, n.kwargs), lambda a: a.meta["val"])
            n.meta["val"] = n.target(*args, **kwargs)


def _lower_act_pack(graph: fx.Graph, node: fx.Node, traces: _Traces) -> None:
    x, thresholds, bits = node.args
    fn = lambda t: act_pack_torch(t, thresholds, bits)  # noqa: E731
    outs = traces.inline(graph, node, fn, [x], ("act_pack", tuple(thresholds), bits))
    for user in list(node.users):
        # The rewrite reads the op's outputs only through getitem.
        assert user.target is operator.getitem, user
        user.replace_all_uses_with(outs[user.args[1]])
        graph.erase_node(user)
    graph.erase_node(node)


def _replace(graph: fx.Graph, node: fx.Node, traces: _Traces, fn, inputs: list[fx.Node], static: tuple | None) -> None:
    """``node`` (one output) replaced by ``fn(*inputs)`` traced to aten ops."""
    node.replace_all_uses_with(traces.inline(graph, node, fn, inputs, static))
    graph.erase_node(node)


def _lower_code_grad(graph: fx.Graph, node: fx.Node, traces: _Traces) -> None:
    g, codes, nonfinite, levels, bits, out_dtype = node.args
    fn = lambda a, c, f: code_grad_torch(a, c, f, levels, bits, out_dtype)  # noqa: E731
    _replace(graph, node, traces, fn, [g, codes, nonfinite], ("code_grad", tuple(levels), bits, out_dtype))


def _lower_pack_bits(graph: fx.Graph, node: fx.Node, traces: _Traces) -> None:
    _replace(graph, node, traces, pack_bits_torch, [node.args[0]], ("pack_bits",))


def _lower_unpack_bits(graph: fx.Graph, node: fx.Node, traces: _Traces) -> None:
    packed, shape = node.args
    static = ("unpack_bits", tuple(shape)) if all(isinstance(s, int) for s in shape) else None
    fn = lambda p: unpack_bits_torch(p, shape)  # noqa: E731
    _replace(graph, node, traces, fn, [packed], static)


_LOWERINGS = {
    _act_pack: _lower_act_pack,
    _code_grad: _lower_code_grad,
    _pack_bits: _lower_pack_bits,
    _unpack_bits: _lower_unpack_bits,
}


def lower(gm: fx.GraphModule) -> int:
    """Replace every call of our ops (act_pack, code_grad, pack_bits, unpack_bits) in ``gm`` in place; returns how many."""
    todo = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in _LOWERINGS]
    traces = _Traces()
    for node in todo:
        _LOWERINGS[node.target](gm.graph, node, traces)
    if todo:
        gm.graph.lint()
        gm.recompile()
    return len(todo)
