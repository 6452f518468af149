"""Run inside the fake-CUDA child by tests/test_fakecuda.py: one attention call, four ways.

    python -m benchmarks._fakecuda tests.fakecuda_probe OUT.json

Attention with and without an all-True boolean mask expanded from [B, 1, L, 1]
(last-dim stride 0, the mask transformers 5.17 builds under torch.compile), on
real CPU tensors, on fake CUDA tensors eagerly, and on fake CUDA through
torch.compile's inductor. Writes the saved bytes and the SDPA kernels chosen.
"""

from __future__ import annotations

import contextlib
import json
import sys

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from approxbp_fx.measure import count_saved_bytes
from benchmarks._fakecuda import cell, device, sdpa

B, H, L, D = 2, 4, 64, 16  # fp32 probabilities: B*H*L*L*4 = 128 KiB; q, k, v, out: 16 KiB each


def attend(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _inputs(make):
    qkv = [make((B, H, L, D), torch.bfloat16).requires_grad_() for _ in range(3)]
    return qkv, make((B, 1, L, 1), torch.bool).expand(B, 1, L, L)


def on_cpu(masked: bool) -> int:
    (q, k, v), mask = _inputs(lambda shape, dtype: torch.ones(shape, dtype=dtype))
    with count_saved_bytes() as counter:
        out = attend(q, k, v, mask if masked else None)
    out.float().sum().backward()
    return counter.total


def on_fake_cuda(masked: bool, compiled: bool) -> tuple[int, list[str]]:
    mode = FakeTensorMode()
    with mode:
        (q, k, v), mask = _inputs(lambda shape, dtype: torch.empty(shape, dtype=dtype, device="cuda"))
    fn = torch.compile(attend, backend="inductor") if compiled else attend
    sdpa.CHOICES.clear()
    torch._dynamo.reset()
    # Eager runs inside the mode (constructors in the composite stay fake); dynamo does not trace
    # inside one, and the compiled graphs enter it themselves.
    with cell.count_fake_saved_bytes(torch.nn.Module()) as counter, (contextlib.nullcontext() if compiled else mode):
        out = fn(q, k, v, mask if masked else None)
    with mode:
        out.float().sum().backward()
    return counter.total, sorted(sdpa.CHOICES)


def main() -> None:
    device.install()
    result = {"cpu": {m: on_cpu(m == "mask") for m in ("mask", "none")}}
    for compiled in (False, True):
        name = "cuda_compiled" if compiled else "cuda_eager"
        result[name] = {m: on_fake_cuda(m == "mask", compiled) for m in ("mask", "none")}
    result["probs_fp32"] = B * H * L * L * 4
    with open(sys.argv[1], "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
