"""Custom ops that carry the rewrites through inductor (Triton on CUDA, torch on CPU)."""

from .act_codes import act_pack, code_grad
from .bit_masks import pack_bits, unpack_bits

__all__ = ["act_pack", "code_grad", "pack_bits", "unpack_bits"]
