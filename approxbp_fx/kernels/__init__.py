"""Custom ops that carry the rewrites through inductor (Triton on CUDA, torch on CPU)."""

from .act_codes import act_pack, code_grad

__all__ = ["act_pack", "code_grad"]
