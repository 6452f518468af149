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

__all__ = ["lower"]

_act_pack = torch.ops.approxbp.act_pack.default
_code_grad = torch.ops.approxbp.code_grad.default


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


def _inline(graph: fx.Graph, node: fx.Node, traced: fx.GraphModule, inputs: list[fx.Node]):
    """Copy ``traced``'s nodes before ``node``, fed by ``inputs``; returns its output value."""
    placeholders = [n for n in traced.graph.nodes if n.op == "placeholder"]
    env = dict(zip(placeholders, inputs))
    with graph.inserting_before(node):
        return graph.graph_copy(traced.graph, env)


def _lower_act_pack(graph: fx.Graph, node: fx.Node) -> None:
    x, thresholds, bits = node.args
    fn = lambda t: act_pack_torch(t, thresholds, bits)  # noqa: E731
    outs = _inline(graph, node, _trace(fn, [x.meta["val"]]), [x])
    for user in list(node.users):
        # The rewrite reads the op's outputs only through getitem.
        assert user.target is operator.getitem, user
        user.replace_all_uses_with(outs[user.args[1]])
        graph.erase_node(user)
    graph.erase_node(node)


def _lower_code_grad(graph: fx.Graph, node: fx.Node) -> None:
    g, codes, nonfinite, levels, bits, out_dtype = node.args
    fn = lambda a, c, f: code_grad_torch(a, c, f, levels, bits, out_dtype)  # noqa: E731
    inputs = [g, codes, nonfinite]
    dx = _inline(graph, node, _trace(fn, [n.meta["val"] for n in inputs]), inputs)
    node.replace_all_uses_with(dx)
    graph.erase_node(node)


_LOWERINGS = {_act_pack: _lower_act_pack, _code_grad: _lower_code_grad}


def lower(gm: fx.GraphModule) -> int:
    """Replace every ``act_pack`` / ``code_grad`` call in ``gm`` in place; returns how many."""
    todo = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in _LOWERINGS]
    for node in todo:
        _LOWERINGS[node.target](gm.graph, node)
    if todo:
        gm.graph.lint()
        gm.recompile()
    return len(todo)
