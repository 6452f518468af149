"""k-bit derivative codes of an activation's input, and the code-driven backward.

Two custom ops carry Approx-BP through inductor:

``approxbp::act_pack(x, thresholds, bits) -> (codes, nonfinite)``
    ``codes``: a 1-D uint8 tensor of ``ceil(numel / (8 // bits))`` bytes where
    element ``i`` of ``x`` (row-major logical order, any strides) holds
    ``#{j : x_i > thresholds[j]}`` at bit ``(i % per) * bits`` of byte ``i // per``;
    ``nonfinite``: a 0-d bool, whether any ``x_i`` is NaN or ±inf.
    NaN and -inf get code 0, +inf the top code (float32 compares); the flag is
    what carries them to backward.
    The activation's output is not computed here: the graph's own nodes keep
    computing it, so the forward is inductor's to the bit
    (:mod:`approxbp_fx.passes.save_act_codes`).

``approxbp::code_grad(grad, codes, nonfinite, levels, bits, out_dtype) -> dx``
    ``dx_i = grad_i * levels[code_i]``, the derivative of the piecewise-linear
    ``h~`` times the incoming gradient, or NaN everywhere if ``nonfinite``
    (where the exact ``h'`` would be NaN, so that GradScaler still skips the
    step; :mod:`approxbp_fx.codes`). It reads 1/4 byte per element at
    ``bits=2`` instead of the 2 or 4 bytes of ``x``, plus the flag's one byte.

All outputs are contiguous; the fake (meta) implementations promise exactly
that, which inductor relies on when it plans buffers around the fallback call.

On CPU the ops run :mod:`approxbp_fx.codes`' torch code; on CUDA they run
the Triton kernels below. The file reads top to bottom: kernels, launchers,
registration.
"""

from __future__ import annotations

import contextlib
import functools

import torch

from ..codes import code_grad_of, nonfinite_flag, pack_codes, packed_numel
from ..coefficients import BITS

try:  # The CPU path must work without Triton.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised on Triton-less installs
    HAS_TRITON = False

__all__ = ["act_pack", "code_grad", "HAS_TRITON"]


# ---------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _byte_tile(numel, PER: tl.constexpr, BLOCK_B: tl.constexpr, IDX64: tl.constexpr):
        """This program's elements as a [BLOCK_B, PER] row-major tile.

        Row r is byte ``pid * BLOCK_B + r``; column f is its field f
        (bits ``f*BITS .. f*BITS+BITS-1``). Returns rows, fields, element
        offsets and the in-bounds mask.
        """
        pid = tl.program_id(0)
        if IDX64:
            pid = pid.to(tl.int64)
        rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
        fields = tl.arange(0, PER)
        elem = rows[:, None] * PER + fields[None, :]
        return rows, fields, elem, elem < numel

    @triton.jit
    def _act_pack_kernel(
        x_ptr,  # contiguous input, fp32/fp16/bf16
        codes_ptr,  # uint8, n_bytes
        flag_ptr,  # bool, 1 element, zeroed by the launcher
        thr_ptr,  # fp32, N_THR ascending thresholds
        numel,
        n_bytes,
        BITS: tl.constexpr,
        PER: tl.constexpr,  # 8 // BITS codes per byte: 8, 4, 2 or 2 (a power of two)
        N_THR: tl.constexpr,  # 2**BITS - 1
        BLOCK_B: tl.constexpr,  # bytes per program; BLOCK_B * PER elements
        IDX64: tl.constexpr,  # int64 offsets (when numel is near/above 2**31)
    ):
        rows, fields, elem, mask = _byte_tile(numel, PER, BLOCK_B, IDX64)
        x = tl.load(x_ptr + elem, mask=mask, other=0.0).to(tl.float32)

        # code = #{j : x > t_j}; float32 compares, so NaN counts nothing (code 0).
        code = tl.zeros([BLOCK_B, PER], dtype=tl.int32)
        for j in tl.static_range(N_THR):
            t = tl.load(thr_ptr + j)
            code += (x > t).to(tl.int32)
        code = tl.where(mask, code, 0)  # the last byte's unused fields are 0
        # Fields do not overlap, so summing the shifted codes is their bitwise or.
        byte = tl.sum(code << (fields[None, :] * BITS), axis=1)
        tl.store(codes_ptr + rows, byte.to(tl.uint8), mask=rows < n_bytes)

        # |x| < inf is false for NaN and ±inf. Every program that sees one
        # stores the same 1, so the unordered stores need no atomics.
        bad = tl.sum((mask & ~(tl.abs(x) < float("inf"))).to(tl.int32), axis=None)
        tl.store(flag_ptr, bad > 0, mask=bad > 0)

    @triton.jit
    def _code_grad_kernel(
        grad_ptr,  # contiguous incoming gradient, any float dtype
        codes_ptr,  # uint8, n_bytes, contiguous
        flag_ptr,  # bool, 1 element: poison dx with NaN
        lvl_ptr,  # fp32, 2**BITS levels
        dx_ptr,  # contiguous output, out dtype
        numel,
        n_bytes,
        BITS: tl.constexpr,
        PER: tl.constexpr,
        N_LVL: tl.constexpr,  # 2**BITS
        BLOCK_B: tl.constexpr,
        IDX64: tl.constexpr,
    ):
        rows, fields, elem, mask = _byte_tile(numel, PER, BLOCK_B, IDX64)

        byte = tl.load(codes_ptr + rows, mask=rows < n_bytes, other=0).to(tl.int32)
        code = (byte[:, None] >> (fields[None, :] * BITS)) & (N_LVL - 1)
        # levels[code] as a chain of selects over the 2**BITS scalars: no
        # per-element memory traffic. (A gather from the 64-byte table is the
        # alternative, at BITS=4; docs/kernels.md has what was measured.)
        d = tl.zeros([BLOCK_B, PER], dtype=tl.float32)
        for j in tl.static_range(N_LVL):
            d = tl.where(code == j, tl.load(lvl_ptr + j), d)
        d = tl.where(tl.load(flag_ptr) != 0, float("nan"), d)

        g = tl.load(grad_ptr + elem, mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + elem, (g * d).to(dx_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------

# Elements per program: 1024, 8 per thread at 4 warps, the usual size for a
# memory-bound elementwise Triton kernel; each program writes 1024 / per whole
# code bytes. docs/kernels.md has the H100 figures at this size.
_ELEMS_PER_PROGRAM = 1024
# 4 warps = 128 threads: the Triton default for elementwise kernels.
_NUM_WARPS = 4
# Offsets are int32 unless the largest offset a launch computes (masked tail
# included) could pass this; then the kernel is specialised to int64.
INT32_INDEX_LIMIT = 2**31 - 1
# Float dtypes the kernels read and write; anything else goes to the torch code.
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=64)
def _cached_scalars(device: torch.device, hexes: tuple[str, ...]) -> torch.Tensor:
    return torch.tensor([float.fromhex(h) for h in hexes], dtype=torch.float32, device=device)


def _device_scalars(values, device: torch.device) -> torch.Tensor:
    """``values`` as an fp32 tensor on ``device``, made once per (device, table).

    A training step then makes no host->device copy after its first call (under
    CUDA-graph capture that first call must happen in warm-up, as it does with
    inductor's cudagraph trees). Keyed on float.hex so that -0.0 and 0.0 stay
    apart; bounded, since a process uses a handful of (activation, bits) tables.
    """
    return _cached_scalars(device, tuple(float(v).hex() for v in values))


def _launch_geometry(numel: int, bits: int, index_limit: int = INT32_INDEX_LIMIT) -> tuple[int, int, int, int, bool]:
    per = 8 // bits
    n_bytes = (numel + per - 1) // per
    block_b = _ELEMS_PER_PROGRAM // per  # a power of two: tl.arange needs one
    grid = (n_bytes + block_b - 1) // block_b
    idx64 = grid * block_b * per > index_limit
    return per, n_bytes, block_b, grid, idx64


def _on_device(t: torch.Tensor):
    # Triton launches on the current CUDA device; the dispatcher does not switch
    # to the argument's device for a custom op, so do it when they differ.
    if t.is_cuda and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def act_pack_torch(x: torch.Tensor, thresholds, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch ``approxbp::act_pack``: the CPU kernel, and the fallback for dtypes Triton skips."""
    return pack_codes(x, thresholds, bits), nonfinite_flag(x)


def code_grad_torch(
    grad: torch.Tensor, codes: torch.Tensor, nonfinite: torch.Tensor, levels, bits: int, out_dtype: torch.dtype
):
    """Plain-torch ``approxbp::code_grad``: the CPU kernel, and the fallback for dtypes Triton skips."""
    return code_grad_of(grad, codes, nonfinite, levels, bits, out_dtype).contiguous()


def launch_act_pack(
    x: torch.Tensor, thresholds, bits: int, *, index_limit: int = INT32_INDEX_LIMIT
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton ``approxbp::act_pack``: ``(packed codes, non-finite flag)``, contiguous.

    Runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1``.
    ``index_limit`` lowers the int64-offset switch, so tests reach that path on small inputs.
    """
    _check_args(bits, n_thresholds=len(thresholds))
    if x.dtype not in _KERNEL_DTYPES:
        # float64 (never rewritten by the backend) and exotic dtypes: the torch
        # code is exact and runs on any device.
        return act_pack_torch(x, thresholds, bits)
    x = x.contiguous()  # the contract is row-major logical order
    numel = x.numel()
    per, n_bytes, block_b, grid, idx64 = _launch_geometry(numel, bits, index_limit)
    codes = torch.empty((n_bytes,), dtype=torch.uint8, device=x.device)
    nonfinite = torch.zeros((), dtype=torch.bool, device=x.device)
    if numel == 0:
        return codes, nonfinite
    with _on_device(x):
        _act_pack_kernel[(grid,)](
            x,
            codes,
            nonfinite,
            _device_scalars(thresholds, x.device),
            numel,
            n_bytes,
            BITS=bits,
            PER=per,
            N_THR=len(thresholds),
            BLOCK_B=block_b,
            IDX64=idx64,
            num_warps=_NUM_WARPS,
        )
    return codes, nonfinite


def launch_code_grad(
    grad: torch.Tensor,
    codes: torch.Tensor,
    nonfinite: torch.Tensor,
    levels,
    bits: int,
    out_dtype: torch.dtype,
    *,
    index_limit: int = INT32_INDEX_LIMIT,
) -> torch.Tensor:
    """Triton ``approxbp::code_grad``: ``grad * levels[code]`` (NaN if ``nonfinite``) as ``out_dtype``, contiguous."""
    _check_args(bits, n_levels=len(levels))
    _check_codes(grad, codes, nonfinite, bits)
    if grad.dtype not in _KERNEL_DTYPES + (torch.float64,) or out_dtype not in _KERNEL_DTYPES + (torch.float64,):
        return code_grad_torch(grad, codes, nonfinite, levels, bits, out_dtype)
    # float64 is fine here: the maths is float32 either way (grad.float() * level).
    grad = grad.contiguous()
    codes = codes.contiguous()
    numel = grad.numel()
    per, n_bytes, block_b, grid, idx64 = _launch_geometry(numel, bits, index_limit)
    dx = torch.empty(grad.shape, dtype=out_dtype, device=grad.device)
    if numel == 0:
        return dx
    with _on_device(grad):
        _code_grad_kernel[(grid,)](
            grad,
            codes,
            nonfinite,
            _device_scalars(levels, grad.device),
            dx,
            numel,
            n_bytes,
            BITS=bits,
            PER=per,
            N_LVL=len(levels),
            BLOCK_B=block_b,
            IDX64=idx64,
            num_warps=_NUM_WARPS,
        )
    return dx


# ---------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------


def _check_args(bits: int, n_thresholds: int | None = None, n_levels: int | None = None) -> None:
    torch._check(bits in BITS, lambda: f"approxbp: bits must be in {BITS[0]}..{BITS[-1]}, got {bits}")
    if n_thresholds is not None:
        torch._check(
            n_thresholds == 2**bits - 1,
            lambda: f"approxbp: {bits}-bit codes need {2**bits - 1} thresholds, got {n_thresholds}",
        )
    if n_levels is not None:
        torch._check(
            n_levels == 2**bits, lambda: f"approxbp: {bits}-bit codes need {2**bits} levels, got {n_levels}"
        )


@torch.library.custom_op("approxbp::act_pack", mutates_args=())
def act_pack(x: torch.Tensor, thresholds: list[float], bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    _check_args(bits, n_thresholds=len(thresholds))
    return act_pack_torch(x, thresholds, bits)


@act_pack.register_fake
def _(x, thresholds, bits):
    _check_args(bits, n_thresholds=len(thresholds))
    codes = x.new_empty((packed_numel(x.numel(), bits),), dtype=torch.uint8)
    return codes, x.new_empty((), dtype=torch.bool)


@torch.library.custom_op("approxbp::code_grad", mutates_args=())
def code_grad(
    grad: torch.Tensor,
    codes: torch.Tensor,
    nonfinite: torch.Tensor,
    levels: list[float],
    bits: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    _check_args(bits, n_levels=len(levels))
    _check_codes(grad, codes, nonfinite, bits)
    return code_grad_torch(grad, codes, nonfinite, levels, bits, out_dtype)


@code_grad.register_fake
def _(grad, codes, nonfinite, levels, bits, out_dtype):
    _check_args(bits, n_levels=len(levels))
    _check_codes(grad, codes, nonfinite, bits)
    return grad.new_empty(grad.shape, dtype=out_dtype)


def _check_codes(grad: torch.Tensor, codes: torch.Tensor, nonfinite: torch.Tensor, bits: int) -> None:
    torch._check(codes.dtype == torch.uint8, lambda: f"approxbp: codes must be uint8, got {codes.dtype}")
    torch._check(
        codes.numel() == packed_numel(grad.numel(), bits),
        lambda: f"approxbp: {codes.numel()} code bytes do not cover a gradient of {grad.numel()} elements",
    )
    torch._check(
        nonfinite.dtype == torch.bool and nonfinite.dim() == 0,
        lambda: f"approxbp: the non-finite flag must be a 0-d bool, got {nonfinite.dtype} {tuple(nonfinite.shape)}",
    )


if HAS_TRITON:

    @act_pack.register_kernel("cuda")
    def _(x, thresholds, bits):
        return launch_act_pack(x, thresholds, bits)

    @code_grad.register_kernel("cuda")
    def _(grad, codes, nonfinite, levels, bits, out_dtype):
        return launch_code_grad(grad, codes, nonfinite, levels, bits, out_dtype)
