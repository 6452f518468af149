"""The packed-code format: what Approx-BP saves for an activation, and how backward reads it.

For an activation ``h`` and a :class:`~approxbp_fx.coefficients.StepTable`
with knots ``c_1 < ... < c_n`` (``n = 2**bits - 1``) and slopes ``a_i``:

* the code of an element is ``code(x) = #{i : x > c_i}`` in ``0..n``,
  compared in float32 (NaN and -inf get code 0, +inf the top code);
* backward is ``dx = dy * level[code(x)]`` with ``level[j] = a_1 + ... + a_j``,
  the derivative of ``h~(x) = sum_i a_i ReLU(x - c_i)``;
* if any element of ``x`` is NaN or ±inf, the whole ``dx`` is NaN. The exact
  backward is NaN at such an element (``inf * 0`` in ``h'``), and that NaN is
  what tells a GradScaler to skip the step; a code alone cannot carry it, so
  one flag per tensor, :func:`nonfinite_flag`, is saved beside the codes.
  Poisoning the whole tensor is coarser than the exact per-element NaN, never
  finite where it is not.

Only the packed codes are saved: ``8 // bits`` codes per byte, element ``i`` of
``x`` in row-major (logical) order in byte ``i // per`` at bit ``(i % per) * bits``.
This is the one definition of the format: the custom ops' CPU implementation
(:mod:`approxbp_fx.kernels.act_codes`), their lowering after the cut
(:mod:`approxbp_fx.lowering`) and the eager method (:mod:`approxbp_fx.eager`)
all call these functions, and the Triton kernels are tested byte for byte
against them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .coefficients import BITS, StepTable

__all__ = [
    "codes_per_byte",
    "packed_numel",
    "code_of",
    "pack_codes",
    "pack_fields",
    "unpack_fields",
    "nonfinite_flag",
    "unpack_levels",
    "code_grad_of",
    "step_derivative",
]


def codes_per_byte(bits: int) -> int:
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")
    return 8 // bits


def packed_numel(numel, bits: int):
    """Bytes holding ``numel`` codes (works on SymInts: no int() on purpose)."""
    per = codes_per_byte(bits)
    return (numel + per - 1) // per


def code_of(x: torch.Tensor, thresholds) -> torch.Tensor:
    """``#{i : x > c_i}`` per element as uint8 (float32 comparison; NaN -> 0).

    Functional (no in-place ops): :mod:`approxbp_fx.lowering`
    traces this very code into the graphs inductor compiles.
    """
    xf = x.float()
    # Explicit compares, not bucketize: they fix NaN's code at 0, as the kernels do.
    code = (xf > float(thresholds[0])).to(torch.uint8)
    for c in thresholds[1:]:
        code = code + (xf > float(c)).to(torch.uint8)
    return code


def pack_codes(x: torch.Tensor, thresholds, bits: int) -> torch.Tensor:
    """1-D uint8 tensor of ``packed_numel(x.numel(), bits)`` bytes."""
    if len(thresholds) != 2**bits - 1:
        raise ValueError(f"{bits}-bit codes need {2**bits - 1} thresholds, got {len(thresholds)}")
    return pack_fields(code_of(x.reshape(-1), thresholds).to(torch.int32), bits)


def pack_fields(flat: torch.Tensor, bits: int) -> torch.Tensor:
    """1-D int32 codes in ``0 .. 2**bits - 1``, packed ``8 // bits`` to a byte (the format above)."""
    per = codes_per_byte(bits)
    # Always pad, never branch on the pad or build a pad-sized tensor: traced on
    # symbolic sizes (approxbp_fx.lowering) either would guard on numel % per and
    # recompile as the length varies.
    flat = F.pad(flat, (0, (-flat.numel()) % per))
    shifts = torch.arange(per, device=flat.device, dtype=torch.int32) * bits
    # Bit fields do not overlap, so the sum is the bitwise or.
    return (flat.view(-1, per) << shifts).sum(dim=1).to(torch.uint8)


def unpack_fields(codes: torch.Tensor, bits: int, numel) -> torch.Tensor:
    """The first ``numel`` codes of packed bytes, as a 1-D int32 tensor (inverse of :func:`pack_fields`)."""
    per = codes_per_byte(bits)
    shifts = torch.arange(per, device=codes.device, dtype=torch.int32) * bits
    return ((codes.to(torch.int32).unsqueeze(-1) >> shifts) & (2**bits - 1)).reshape(-1)[:numel]


def nonfinite_flag(x: torch.Tensor) -> torch.Tensor:
    """0-d bool: does ``x`` hold a NaN or ±inf? Saved with the codes (1 byte)."""
    return torch.isfinite(x).logical_not().any()


def unpack_levels(codes: torch.Tensor, levels, bits: int, numel: int) -> torch.Tensor:
    """float32 tensor of ``numel`` derivative levels, in row-major order.

    The lookup is a ``where`` chain on Python floats rather than indexing a
    table tensor: traced into a compiled graph (approxbp_fx.lowering) it needs no
    constant buffer and stays one fusable pointwise expression.
    """
    if len(levels) != 2**bits:
        raise ValueError(f"{bits}-bit codes need {2**bits} levels, got {len(levels)}")
    idx = unpack_fields(codes, bits, numel)
    out = torch.full_like(idx, float(levels[-1]), dtype=torch.float32)
    for j in range(len(levels) - 2, -1, -1):
        out = torch.where(idx == j, float(levels[j]), out)
    return out


def code_grad_of(
    grad: torch.Tensor, codes: torch.Tensor, nonfinite: torch.Tensor, levels, bits: int, out_dtype: torch.dtype
) -> torch.Tensor:
    """``dx = grad * level[code]`` in float32, rounded once to ``out_dtype``; all NaN if ``nonfinite``.

    Functional, like :func:`code_of`: approxbp_fx.lowering traces it. The ``where``
    on the 0-d flag is one more select in the same pointwise kernel.
    """
    d = unpack_levels(codes, levels, bits, grad.numel()).view(grad.shape)
    dx = torch.where(nonfinite, float("nan"), grad.float() * d)
    return dx.to(out_dtype)


def step_derivative(x: torch.Tensor, tab: StepTable) -> torch.Tensor:
    """The approximate derivative straight from ``x`` (no packing), float32."""
    lut = torch.tensor(tab.levels, dtype=torch.float32, device=x.device)
    return lut[code_of(x, tab.thresholds).long()]
