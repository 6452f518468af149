"""Approx-BP in plain eager PyTorch: the oracle for the tests, usable on its own.

For an activation ``h`` and a :class:`~approxbp_fx.coefficients.StepTable`
with knots ``c_1 < ... < c_n`` (``n = 2**bits - 1``) and slopes ``a_i``:

* forward is exact: ``y = h(x)``;
* the code of an element is ``code(x) = #{i : x > c_i}`` in ``0..n``,
  compared in float32 (a NaN gets code 0);
* backward is ``dx = dy * level[code(x)]`` with ``level[j] = a_1 + ... + a_j``,
  the derivative of ``h~(x) = sum_i a_i ReLU(x - c_i)``.

Only the packed codes are saved: ``8 // bits`` codes per byte, element ``i`` of
``x`` in row-major (logical) order in byte ``i // per`` at bit ``(i % per) * bits``.
The CPU implementation of the custom ops uses :func:`pack_codes` and
:func:`unpack_levels` below; the Triton kernels must produce identical bytes.

Example::

    >>> x = torch.randn(4, 5, requires_grad=True)
    >>> y = approx_activation(x, "gelu", bits=2)   # y == F.gelu(x)
    >>> y.sum().backward()                        # x.grad is the step derivative
"""

from __future__ import annotations

import torch
from torch import nn

from .activations import exact_forward
from .coefficients import StepTable, table

__all__ = [
    "codes_per_byte",
    "packed_numel",
    "code_of",
    "pack_codes",
    "unpack_levels",
    "step_derivative",
    "approx_activation",
    "ApproxActivation",
]


def codes_per_byte(bits: int) -> int:
    if not 1 <= bits <= 4:
        raise ValueError(f"bits must be in 1..4, got {bits}")
    return 8 // bits


def packed_numel(numel, bits: int):
    """Bytes holding ``numel`` codes (works on SymInts: no int() on purpose)."""
    per = codes_per_byte(bits)
    return (numel + per - 1) // per


def code_of(x: torch.Tensor, thresholds) -> torch.Tensor:
    """``#{i : x > c_i}`` per element as uint8 (float32 comparison; NaN -> 0)."""
    xf = x.float()
    code = torch.zeros(x.shape, dtype=torch.uint8, device=x.device)
    for c in thresholds:
        # Explicit compares, not bucketize: they fix NaN's code at 0, as the kernels do.
        code += xf > float(c)
    return code


def pack_codes(x: torch.Tensor, thresholds, bits: int) -> torch.Tensor:
    """1-D uint8 tensor of ``packed_numel(x.numel(), bits)`` bytes."""
    if len(thresholds) != 2**bits - 1:
        raise ValueError(f"{bits}-bit codes need {2**bits - 1} thresholds, got {len(thresholds)}")
    per = codes_per_byte(bits)
    flat = code_of(x.reshape(-1), thresholds).to(torch.int32)
    pad = (-flat.numel()) % per
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    shifts = torch.arange(per, device=x.device, dtype=torch.int32) * bits
    # Bit fields do not overlap, so the sum is the bitwise or.
    return (flat.view(-1, per) << shifts).sum(dim=1).to(torch.uint8)


def unpack_levels(codes: torch.Tensor, levels, bits: int, numel: int) -> torch.Tensor:
    """float32 tensor of ``numel`` derivative levels, in row-major order."""
    if len(levels) != 2**bits:
        raise ValueError(f"{bits}-bit codes need {2**bits} levels, got {len(levels)}")
    per = codes_per_byte(bits)
    shifts = torch.arange(per, device=codes.device, dtype=torch.int32) * bits
    idx = ((codes.to(torch.int32).unsqueeze(-1) >> shifts) & (2**bits - 1)).reshape(-1)[:numel]
    lut = torch.tensor(levels, dtype=torch.float32, device=codes.device)
    return lut[idx.long()]


def step_derivative(x: torch.Tensor, tab: StepTable) -> torch.Tensor:
    """The approximate derivative straight from ``x`` (no packing), float32."""
    lut = torch.tensor(tab.levels, dtype=torch.float32, device=x.device)
    return lut[code_of(x, tab.thresholds).long()]


class _ApproxActivationFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, tab: StepTable) -> torch.Tensor:
        ctx.tab = tab
        ctx.shape = x.shape
        ctx.save_for_backward(pack_codes(x, tab.thresholds, tab.bits))
        return exact_forward(tab.activation, x)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        (codes,) = ctx.saved_tensors
        tab = ctx.tab
        d = unpack_levels(codes, tab.levels, tab.bits, grad.numel()).view(ctx.shape)
        return (grad.float() * d).to(grad.dtype), None


def approx_activation(x: torch.Tensor, activation: str = "gelu", bits: int = 2) -> torch.Tensor:
    """Exact ``activation(x)`` whose backward is the ``bits``-bit step derivative."""
    return _ApproxActivationFn.apply(x, table(activation, bits))


class ApproxActivation(nn.Module):
    """Drop-in module for eager use, e.g. ``ApproxActivation("gelu", bits=2)`` for ``nn.GELU()``."""

    def __init__(self, activation: str = "gelu", bits: int = 2) -> None:
        super().__init__()
        self.table = table(activation, bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ApproxActivationFn.apply(x, self.table)

    def extra_repr(self) -> str:
        return f"activation={self.table.activation!r}, bits={self.table.bits}"
