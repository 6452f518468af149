"""Run inside the fake-CUDA child by tests/test_fakecuda.py: the fused_attention pass, end to end.

    python -m benchmarks._fakecuda tests.fakecuda_attention_probe OUT.json

Attention whose mask is built inside the compiled function, as transformers
5.17 builds it under torch.compile: all True (``arange >= 0``) or from a
padding input, expanded along the last dim (stride 0). Compiled with
inductor, with approxbp, and with approxbp's fused_attention off; writes the
saved bytes and the SDPA kernels each took on (fake) CUDA.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

import approxbp_fx
from benchmarks._fakecuda import cell, device, sdpa

B, H, L, D = 2, 4, 64, 16  # fp32 probabilities: B*H*L*L*4 = 128 KiB


def all_true(q, k, v, keep):
    mask = (torch.arange(L, device=q.device)[None, None, :, None] + 0 >= 0).expand(B, -1, L, L)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def padding(q, k, v, keep):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, :, None].expand(-1, -1, -1, L))


def run(fn, backend) -> tuple[int, list[str]]:
    mode = FakeTensorMode()
    with mode:
        q, k, v = (torch.empty(B, H, L, D, dtype=torch.bfloat16, device="cuda").requires_grad_() for _ in range(3))
        keep = torch.empty(B, L, dtype=torch.bool, device="cuda")
    sdpa.CHOICES.clear()
    torch._dynamo.reset()
    with cell.count_fake_saved_bytes(torch.nn.Module()) as counter:
        out = torch.compile(fn, backend=backend)(q, k, v, keep)
    with mode:
        out.float().sum().backward()
    return counter.total, sorted(sdpa.CHOICES)


def main() -> None:
    device.install()
    backends = {
        "inductor": "inductor",
        "approxbp": approxbp_fx.backend(),
        "approxbp_off": approxbp_fx.backend(approxbp_fx.ApproxBPConfig(fused_attention=False)),
    }
    result = {name: {b: run(fn, backend) for b, backend in backends.items()}
              for name, fn in (("all_true", all_true), ("padding", padding))}
    result["probs_fp32"] = B * H * L * L * 4
    with open(sys.argv[1], "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
