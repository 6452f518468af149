"""Saved activation bytes per training step, the project's first number.

Measured with ``torch.autograd.graph.saved_tensors_hooks``: every tensor that
eager autograd or a compiled graph saves for backward passes through ``pack``.
Storages are de-duplicated (views of one buffer count once); parameters and
tensors shaped like a parameter (autocast's low-precision weight copies) are
left out, since they live for the whole step regardless of activations.
Choose token counts that match no weight shape, or the rule drops activations.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

__all__ = ["saved_activation_bytes", "default_loss"]


def default_loss(out: Any) -> torch.Tensor:
    """Sum of every floating tensor in ``out`` (tuples, dicts, HF ModelOutput)."""
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    leaves = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad]
    if not leaves:
        raise ValueError("the model returned no floating tensor that requires grad; pass loss_fn=")
    return sum(t.float().sum() for t in leaves)


def saved_activation_bytes(
    fn: Callable[..., Any],
    *args: Any,
    params: nn.Module | None = None,
    loss_fn: Callable[[Any], torch.Tensor] = default_loss,
    backward: bool = True,
    **kwargs: Any,
) -> int:
    """Bytes saved for backward by one ``fn(*args, **kwargs)``, then runs backward.

    Args:
        fn: a module, compiled module or function.
        params: the module whose parameters to exclude; ``fn`` itself if it is a module.
        loss_fn: turns the output into a scalar for backward.
        backward: run backward afterwards (frees the graph and proves it works).
    """
    module = params if params is not None else (fn if isinstance(fn, nn.Module) else None)
    plist = list(module.parameters()) if module is not None else []
    param_ptrs = {p.untyped_storage().data_ptr() for p in plist}
    param_shapes = {tuple(p.shape) for p in plist}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in param_ptrs or tuple(t.shape) in param_shapes or ptr == 0:
            return t
        seen[ptr] = max(seen.get(ptr, 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args, **kwargs)
    if backward:
        loss_fn(out).backward()
    return sum(seen.values())
