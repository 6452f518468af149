"""Boolean masks packed 8 to a byte, and unpacked: the ops of passes/pack_bool_masks.py.

``approxbp::pack_bits(mask) -> packed``
    ``packed``: a 1-D uint8 tensor of ``ceil(numel / 8)`` bytes; element ``i``
    of ``mask`` (row-major logical order, any strides) at bit ``i % 8`` of byte
    ``i // 8``: the 1-bit case of the packed-code format (:mod:`approxbp_fx.codes`).
``approxbp::unpack_bits(packed, shape) -> mask``
    the contiguous boolean tensor of ``shape`` that was packed.

Opaque to the partitioner for the same reason as ``act_pack``: it cannot
recompute what it cannot see into, so it saves ``packed`` and lets the mask
die. After the cut they are lowered to the aten ops of the functions below
(:mod:`approxbp_fx.lowering`), which inductor fuses; with
``act_lowering="kernels"`` they stay calls of the same torch code (no Triton
kernel of their own: a mask is a small share of a step's traffic).
"""

from __future__ import annotations

import math

import torch

from ..codes import pack_fields, packed_numel, unpack_fields

__all__ = ["pack_bits", "unpack_bits", "pack_bits_torch", "unpack_bits_torch"]


def pack_bits_torch(mask: torch.Tensor) -> torch.Tensor:
    """Plain-torch ``approxbp::pack_bits`` (every device).

    The 1-bit case of :func:`~approxbp_fx.codes.pack_codes`, byte for byte,
    written for the bool it is: no float compare, as
    ``code_of(mask, (0.5,))`` would trace. :mod:`approxbp_fx.lowering` traces
    this into every graph with a packed mask, and each op it saves is one
    fewer for inductor to lower, schedule and generate, once per mask.
    """
    return pack_fields(mask.reshape(-1).to(torch.int32), 1)


def unpack_bits_torch(packed: torch.Tensor, shape) -> torch.Tensor:
    """Plain-torch ``approxbp::unpack_bits`` (every device): bit ``i % 8`` of byte ``i // 8``, as bool."""
    return (unpack_fields(packed, 1, math.prod(shape)) != 0).view(shape)


@torch.library.custom_op("approxbp::pack_bits", mutates_args=())
def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    _check_mask(mask)
    return pack_bits_torch(mask)


@pack_bits.register_fake
def _(mask):
    _check_mask(mask)
    return mask.new_empty((packed_numel(mask.numel(), 1),), dtype=torch.uint8)


@torch.library.custom_op("approxbp::unpack_bits", mutates_args=())
def unpack_bits(packed: torch.Tensor, shape: list[int]) -> torch.Tensor:
    _check_packed(packed, shape)
    return unpack_bits_torch(packed, shape)


@unpack_bits.register_fake
def _(packed, shape):
    _check_packed(packed, shape)
    return packed.new_empty(shape, dtype=torch.bool)


def _check_mask(mask: torch.Tensor) -> None:
    torch._check(mask.dtype == torch.bool, lambda: f"approxbp: pack_bits takes a bool mask, got {mask.dtype}")


def _check_packed(packed: torch.Tensor, shape) -> None:
    torch._check(packed.dtype == torch.uint8, lambda: f"approxbp: packed bits must be uint8, got {packed.dtype}")
    torch._check(
        packed.numel() == packed_numel(math.prod(shape), 1),
        lambda: f"approxbp: {packed.numel()} bytes do not hold a mask of shape {list(shape)}",
    )
