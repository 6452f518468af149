"""Which attention kernel CUDA would run, and so what it saves: the patch that decides attention bytes.

``aten::scaled_dot_product_attention`` is a composite: it asks a per-device stub which
backend to use, then calls that backend's op, whose autograd formula decides what is
saved for backward. A CPU build has no CUDA stub, so fake CUDA tensors would always
take the math path (fp32 attention probabilities, about 50x what flash saves at ViT
size). :func:`install` registers :func:`attention` for CUDA tensors instead: it makes
the choice ``sdp::select_sdp_backend`` makes on an H100 (sm90) with the default
priority (flash, then memory-efficient, then math), prepares the mask as the
composite does, and calls the chosen op.

Modelled from PyTorch's ``aten/src/ATen/native/transformers/cuda/sdp_utils.cpp`` and
``attention.cpp``. Not modelled: cuDNN attention (its saved set, output plus a
row of fp32 statistics, equals flash's), nested tensors, fp8, and flash's padding of
head dims that are not a multiple of 8 (refused with an error, never guessed).
:data:`CHOICES` counts the choices, so every figure says which kernels it assumed.
"""

from __future__ import annotations

import math
from collections import Counter

import torch

aten = torch.ops.aten
CHOICES: Counter = Counter()  # "flash" / "efficient" / "math" -> calls, since the last clear()
_LOW = (torch.float16, torch.bfloat16)
_libraries: list = []  # a torch.library.Library unregisters its kernels when collected


def _stride_ok(t: torch.Tensor, ignore_singleton: bool) -> bool:
    return t.stride(-1) == 1 or (ignore_singleton and t.size(-1) == 1)


def _heads_ok(q, k, v, enable_gqa: bool) -> bool:
    """check_batch_size_and_num_heads_dense with GQA/MQA support (flash; efficient on sm80+ CUDA).
    Efficient's GQA only matters where flash was refused with enable_gqa set, which Hugging Face
    never asks for (it sets enable_gqa only when there is no mask)."""
    if not (q.size(0) == k.size(0) == v.size(0)):
        return False
    if q.size(1) == k.size(1) == v.size(1):
        return True
    return enable_gqa and k.size(1) == v.size(1) and q.size(1) % k.size(1) == 0


def can_use_flash(q, k, v, mask, is_causal: bool, enable_gqa: bool) -> bool:
    dims_ok = q.dim() == k.dim() == v.dim() == 4
    return (dims_ok and mask is None and q.dtype in _LOW
            and q.size(-1) == k.size(-1) == v.size(-1) and q.size(-1) <= 256
            and (not is_causal or q.size(-2) == k.size(-2))
            and _heads_ok(q, k, v, enable_gqa) and min(q.size(-2), k.size(-2)) > 0
            and all(_stride_ok(t, ignore_singleton=True) for t in (q, k, v)))


def can_use_efficient(q, k, v, mask, enable_gqa: bool) -> bool:
    if not (q.dim() == k.dim() == v.dim() == 4 and q.dtype in (*_LOW, torch.float32)):
        return False
    align = 8 if q.dtype in _LOW else 4  # minimum_gemm_alignment on sm80+: 128 bits of tensor-core input
    dims_ok = q.size(-1) == k.size(-1) and q.size(-1) % align == 0 and v.size(-1) % align == 0
    offsets_ok = all(t.storage_offset() % align == 0 for t in (q, k, v))  # check_data_ptr_alignment
    strides_ok = all(_stride_ok(t, ignore_singleton=False) for t in (q, k, v)) and (
        mask is None or mask.stride(-1) == 1)  # on CUDA the mask's last stride counts too; on CPU it does not
    return (dims_ok and offsets_ok and strides_ok and _heads_ok(q, k, v, enable_gqa)
            and min(q.size(-2), k.size(-2)) > 0)


def _additive(mask, dtype):
    """convert_boolean_attn_mask: True keeps a score, False adds -inf; a float mask passes through."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.where(mask, 0.0, torch.full((), -math.inf, dtype=dtype, device=mask.device))


def _efficient_bias(mask, q, k):
    """preprocess_mask: the bias's outer strides must be multiples of 8 elements and its last stride 1,
    else its last dim is padded to a multiple of 8 (then sliced back); expanded to [B, H, L, S]."""
    aligned = all(mask.stride(i) % 8 == 0 for i in range(mask.dim() - 1)) and mask.stride(-1) == 1
    if not aligned:
        n = mask.size(-1)
        mask = torch.nn.functional.pad(mask, (0, 8 - n % 8))[..., :n]
    return mask.expand(q.size(0), q.size(1), q.size(2), k.size(2))


def attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """The CUDA composite's body: choose, prepare, call. Saved tensors are then the chosen op's."""
    if can_use_flash(query, key, value, attn_mask, is_causal, enable_gqa):
        if query.size(-1) % 8:
            raise NotImplementedError(f"fake CUDA: flash attention pads head dim {query.size(-1)}; not modelled")
        CHOICES["flash"] += 1
        sc = scale if scale is not None else 1.0 / math.sqrt(query.size(-1))
        return aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal, False, scale=sc)[0]
    bias = _additive(attn_mask, query.dtype)
    if can_use_efficient(query, key, value, attn_mask, enable_gqa):
        CHOICES["efficient"] += 1
        bias = _efficient_bias(bias, query, key) if bias is not None else None
        lse = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
        return aten._scaled_dot_product_efficient_attention(
            query, key, value, bias, lse, dropout_p, is_causal, scale=scale)[0]
    CHOICES["math"] += 1
    return aten._scaled_dot_product_attention_math(
        query, key, value, bias, dropout_p, is_causal, None, scale=scale, enable_gqa=enable_gqa)[0]


def install() -> None:
    """Route CUDA tensors' scaled_dot_product_attention to :func:`attention` (at AutogradCUDA,
    before the composite would decompose it, so autograd records the chosen op)."""
    lib = torch.library.Library("aten", "IMPL")
    lib.impl("scaled_dot_product_attention", attention, "AutogradCUDA")
    _libraries.append(lib)
