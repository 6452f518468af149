"""Keep attention on a fused kernel: the pipeline's first stage, on the graph before AOTAutograd.

CUDA's ``scaled_dot_product_attention`` picks a kernel per call: flash
attention when there is no mask, the memory-efficient kernel when every
input's last dimension is contiguous, else the math path. The math path
upcasts to fp32 and its backward reads the attention probabilities, which
the partitioner then saves: ``B·H·Lq·Lk`` fp32 values per layer (113.7 MiB
for ViT-B/16 at batch 64), against ``B·H·Lq`` for flash's logsumexp.

Hugging Face (transformers 5.17, and 5.24 on torch 2.11) builds, under
``torch.compile``, an all-True boolean mask as an expanded view with strides
``(0, L, 1, 0)``: a mask that changes nothing, and whose last-dim stride alone
sends CUDA to the math path, while eager passes no mask and runs flash. So,
for every SDPA call of a CUDA graph::

    mask provably all True       ->  attn_mask=None            (flash, as eager)
    mask last-dim stride != 1    ->  attn_mask=mask.contiguous() (memory-efficient)

Both are exact: an all-True boolean mask adds 0 to every score, and a
contiguous copy holds the same values. On CPU the check is waived (its
kernels take any layout), so CPU graphs are left alone.

"Provably all True" means: the mask is computed from constants only (no
graph input, parameter or buffer, nothing random or in place), so its value is
the same on every call of this graph; it is evaluated once, on the CPU, and
checked. A mask that depends on an input (real padding) is never dropped.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..config import ApproxBPConfig
from ..report import SiteDecision
from .rule import SiteFields

__all__ = ["AttentionSite", "keep_fused_attention"]

# The report's rule name, and the ApproxBPConfig switch (passes/__init__.py runs it only when on).
RULE_NAME = "fused_attention"
_SDPA = {torch._C._nn.scaled_dot_product_attention, F.scaled_dot_product_attention}
# Masks larger than this (elements) are not evaluated: 64 MiB of bool.
_MAX_EVAL_NUMEL = 2**26
# Names of random or stateful functions: their value is not a constant of the graph.
_NOT_CONSTANT = ("rand", "dropout", "bernoulli", "normal", "multinomial", "poisson", "exponential", "seed")


@dataclass(frozen=True, kw_only=True)
class AttentionSite(SiteFields):
    """One SDPA call of a CUDA graph whose mask would send it to the math path.

    ``x`` is the mask node; ``shape`` is the query's ``(B, H, Lq, E)``.
    """

    sdpa: str  # the attention call
    action: str  # "drop the mask" or "make the mask contiguous"

    key = property(lambda self: self.sdpa)
    op = property(lambda self: "sdpa")
    tensors = property(lambda self: set())
    reads = writes = property(lambda self: {self.sdpa, self.x})
    must_leave_backward = property(lambda self: ())


def keep_fused_attention(graph: fx.Graph, cfg: ApproxBPConfig, *, devices=("cuda",)) -> list[SiteDecision]:
    """Rewrite the masks of ``graph``'s SDPA calls on ``devices`` (see the module docstring).

    Returns a decision per call whose mask stood in the fused kernels' way,
    with the attention bytes the backward would save before and after
    (predicted: the math path's fp32 probabilities against the fused kernels'
    logsumexp, plus a materialised mask).
    """
    decisions = []
    for node in [n for n in graph.nodes if n.op == "call_function" and n.target in _SDPA]:
        mask, q = _mask_of(node), _val(node.args[0])
        if not isinstance(mask, fx.Node) or q is None or q.device.type not in devices or q.dim() != 4:
            continue
        mask_val = _val(mask)
        if mask_val is None:
            continue
        value = _constant_value(mask)
        all_true = value is not None and value.dtype == torch.bool and bool(value.all())
        if not all_true and mask_val.stride(-1) == 1:
            continue  # fused kernels take it as it is
        site = _site(node, mask, q, "drop the mask" if all_true else "make the mask contiguous")
        before, after = _predicted_bytes(q, _val(node.args[1]), mask_val, kept=not all_true)
        if all_true:
            _set_mask(node, None)
            reason = "rewritten: the mask is all True; without it CUDA runs flash attention, as eager does"
        else:
            with graph.inserting_before(node):
                dense = graph.call_method("contiguous", (mask,))
            dense.meta = {**mask.meta, "example_value": mask_val.contiguous()} if "example_value" in mask.meta else {}
            _set_mask(node, dense)
            reason = "rewritten: the mask's last dim was strided; contiguous, CUDA runs memory-efficient attention"
        decisions.append(SiteDecision(site, RULE_NAME, True, reason, before, after))
    if any(d.rewritten for d in decisions):
        graph.eliminate_dead_code()
        graph.lint()
    return decisions


def _val(node) -> torch.Tensor | None:
    if not isinstance(node, fx.Node):
        return None
    v = node.meta.get("example_value", node.meta.get("val"))
    return v if isinstance(v, torch.Tensor) else None


def _mask_of(node: fx.Node):
    return node.kwargs["attn_mask"] if "attn_mask" in node.kwargs else (node.args[3] if len(node.args) > 3 else None)


def _set_mask(node: fx.Node, mask) -> None:
    if "attn_mask" in node.kwargs:
        node.kwargs = {**node.kwargs, "attn_mask": mask}
    else:
        node.args = (*node.args[:3], mask, *node.args[4:])


def _site(node: fx.Node, mask: fx.Node, q: torch.Tensor, action: str) -> AttentionSite:
    return AttentionSite(
        x=mask.name, x_aliases=(mask.name,), aliases=(), shape=tuple(q.shape), dtype=q.dtype,
        sdpa=node.name, action=action,
    )


def _predicted_bytes(q: torch.Tensor, k: torch.Tensor | None, mask: torch.Tensor, kept: bool) -> tuple[int, int]:
    """(math path's fp32 probabilities, fused kernel's fp32 logsumexp + a materialised mask) in bytes."""
    b, h, lq, _ = (int(s) for s in q.shape)
    lk = int(k.shape[-2]) if k is not None else lq
    before = b * h * lq * lk * 4
    mask_bytes = int(mask.numel()) * mask.element_size() if kept else 0
    return before, b * h * lq * 4 + mask_bytes


def _constant_value(mask: fx.Node) -> torch.Tensor | None:
    """``mask``'s value if it is computed from constants alone (evaluated on the CPU), else None."""
    cone, stack = {}, [mask]
    while stack:
        n = stack.pop()
        if n in cone:
            continue
        if not _is_constant_op(n):
            return None
        cone[n] = None
        stack.extend(n.all_input_nodes)
    order = {n: i for i, n in enumerate(mask.graph.nodes)}
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    env: dict[fx.Node, object] = {}
    with unset_fake_temporarily(), torch.no_grad():
        for n in sorted(cone, key=order.__getitem__):
            args, kwargs = fx.node.map_arg((n.args, n.kwargs), env.__getitem__)
            args, kwargs = _on_cpu(args), _on_cpu(kwargs)
            env[n] = getattr(args[0], n.target)(*args[1:], **kwargs) if n.op == "call_method" else n.target(*args, **kwargs)
    value = env[mask]
    return value if isinstance(value, torch.Tensor) else None


def _is_constant_op(n: fx.Node) -> bool:
    if n.op not in ("call_function", "call_method"):
        return False  # placeholders, parameters, buffers, submodules: not constants of the graph
    v = _val(n)
    if v is not None and int(v.numel()) > _MAX_EVAL_NUMEL:
        return False
    name = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))
    if name.endswith("_") and not name.startswith("__") or any(s in name for s in _NOT_CONSTANT):
        return False  # in place, or random
    if isinstance(n.target, torch._ops.OpOverload) and (
        n.target._schema.is_mutable or torch.Tag.nondeterministic_seeded in n.target.tags
    ):
        return False
    return n.op == "call_method" or callable(n.target) and (n.target in vars(operator).values() or _is_torch(n.target))


def _is_torch(fn) -> bool:
    module = getattr(fn, "__module__", "") or ""
    return module.startswith("torch") or isinstance(fn, (torch._ops.OpOverload, torch._ops.OpOverloadPacket))


def _on_cpu(tree):
    """Device arguments mapped to the CPU: the mask's value does not depend on where it is built."""
    import torch.utils._pytree as pytree

    def cpu(a):
        if isinstance(a, torch.device) or (isinstance(a, str) and a.split(":")[0] in ("cuda", "cpu", "meta")):
            return torch.device("cpu")
        return a

    return pytree.tree_map(cpu, tree)
