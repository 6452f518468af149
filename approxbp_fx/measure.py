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

__all__ = ["saved_activation_bytes", "count_saved_bytes", "default_loss"]


def default_loss(out: Any) -> torch.Tensor:
    """Sum of every floating tensor in ``out`` (tuples, dicts, HF ModelOutput)."""
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    leaves = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad]
    if not leaves:
        raise ValueError("the model returned no floating tensor that requires grad; pass loss_fn=")
    return sum(t.float().sum() for t in leaves)


class count_saved_bytes:
    """Context manager: bytes saved for backward by everything run inside it.

    For code that runs forward and backward itself (a Trainer's
    ``training_step``); :func:`saved_activation_bytes` wraps one call.

    Example::

        with count_saved_bytes(model) as counter:
            loss = model(**batch).loss
        loss.backward()
        print(counter.total)
    """

    def __init__(self, params: nn.Module | None = None) -> None:
        plist = list(params.parameters()) if params is not None else []
        self._param_ptrs = {p.untyped_storage().data_ptr() for p in plist}
        self._param_shapes = {tuple(p.shape) for p in plist}
        self._seen: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in self._param_ptrs or tuple(t.shape) in self._param_shapes or ptr == 0:
            return t
        self._seen[ptr] = max(self._seen.get(ptr, 0), storage.nbytes())
        return t

    @property
    def total(self) -> int:
        return sum(self._seen.values())

    def __enter__(self) -> "count_saved_bytes":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


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
    with count_saved_bytes(module) as counter:
        out = fn(*args, **kwargs)
    if backward:
        loss_fn(out).backward()
    return counter.total
