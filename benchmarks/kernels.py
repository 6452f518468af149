"""Kernel microbenchmarks: GB/s of each kernel against inductor's code for the same job
and against the device's measured copy bandwidth.

    python -m benchmarks.kernels --tag h100                     # CUDA: writes docs/results/kernels_h100.json, docs/kernels.md
    python -m benchmarks.kernels --tag smoke --device cpu --sizes 65536 --out-dir /tmp/k   # does the script run?

Rows, each at several sizes (elements of a bf16 tensor, rows of 4096 for norms):

* ``act_pack``: activation forward + 2-bit pack (reads x; writes y and the codes).
  With ``act_lowering="kernels"`` ("Triton op" rows) that is inductor's ``gelu(x)`` beside our Triton
  pack op (which reads x again); with ``"inductor"`` it is one kernel that inductor
  generates from the graph's own gelu and the op's torch code. Against inductor's
  ``gelu(x)`` alone (reads x, writes y; x itself is saved).
* ``code_grad``: unpack + gradient (reads dy and the codes, writes dx), both ways,
  against inductor's ``gelu_backward(dy, x)`` (reads dy and x, writes dx).
* ``layer_norm_bwd`` / ``rms_norm_bwd``: inductor's generated norm backward as
  inductor partitions it (reads dy and x) and as approxbp's MS-BP rewrite feeds
  it (reads dy and the shared bf16 x̂, rebuilds x = x̂/r + μ in registers).

GB/s counts the bytes a kernel must move (each tensor read or written once);
"% copy" divides by the measured device-to-device copy bandwidth.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from approxbp_fx import table  # (importing approxbp_fx registers the approxbp:: ops)
from approxbp_fx.kernels.act_codes import act_pack_torch, code_grad_torch

from ._render import markdown_table
from ._report import ROOT, provenance, replace_file

BF16 = torch.bfloat16
HIDDEN = 4096  # norm rows


def _time(fn, device: torch.device, iters: int) -> float:
    """Median seconds of ``fn()``."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
    fn()
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2]


def copy_bandwidth(device: torch.device, nbytes: int, iters: int) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / _time(lambda: dst.copy_(src), device, iters) / 1e9


def _act_rows(n: int, device: torch.device, iters: int) -> list[dict]:
    tab = table("gelu", 2)
    thr, lvl = list(tab.thresholds), list(tab.levels)
    x = torch.randn(n, device=device, dtype=BF16)
    dy = torch.randn_like(x)
    ops = torch.ops.approxbp
    codes, flag = ops.act_pack(x, thr, 2)
    ind_fwd = torch.compile(lambda t: F.gelu(t), backend="inductor")
    ind_bwd = torch.compile(lambda g, t: torch.ops.aten.gelu_backward(g, t), backend="inductor")
    # What act_lowering="inductor" hands inductor: the graph's gelu and the op's torch code, fused by it.
    low_fwd = torch.compile(lambda t: (F.gelu(t), *act_pack_torch(t, thr, 2)), backend="inductor")
    low_bwd = torch.compile(lambda g, c, f: code_grad_torch(g, c, f, lvl, 2, BF16), backend="inductor")
    e, c = 2 * n, codes.numel() + 1  # + the non-finite flag's byte
    return [
        {"kernel": "act_pack", "impl": "approxbp kernels (Triton op)", "numel": n, "bytes": 2 * e + c,
         "s": _time(lambda: (ind_fwd(x), ops.act_pack(x, thr, 2)), device, iters)},
        {"kernel": "act_pack", "impl": "approxbp lowered (inductor)", "numel": n, "bytes": 2 * e + c,
         "s": _time(lambda: low_fwd(x), device, iters)},
        {"kernel": "act_pack", "impl": "inductor gelu(x)", "numel": n, "bytes": 2 * e,
         "s": _time(lambda: ind_fwd(x), device, iters)},
        {"kernel": "code_grad", "impl": "approxbp kernels (Triton op)", "numel": n, "bytes": 2 * e + c,
         "s": _time(lambda: ops.code_grad(dy, codes, flag, lvl, 2, BF16), device, iters)},
        {"kernel": "code_grad", "impl": "approxbp lowered (inductor)", "numel": n, "bytes": 2 * e + c,
         "s": _time(lambda: low_bwd(dy, codes, flag), device, iters)},
        {"kernel": "code_grad", "impl": "inductor gelu_backward", "numel": n, "bytes": 3 * e,
         "s": _time(lambda: ind_bwd(dy, x), device, iters)},
    ]


def _ln_bwd_from_input(dy, x, mean, rstd, w, b):
    return torch.ops.aten.native_layer_norm_backward(dy, x, [x.shape[-1]], mean, rstd, w, b, [True, True, True])


def _ln_bwd_from_shared(dy, s, mean, rstd, w, b):
    # What MS-BP hands inductor: x rebuilt from the shared x̂ (bf16) and the fp32 statistics.
    # (The rewrite keeps x' in fp32; it is rounded here only for the aten op's dtype check,
    # and inductor fuses the rebuild into the reduction either way.)
    x = (s.float() / rstd + mean).to(dy.dtype)
    return _ln_bwd_from_input(dy, x, mean, rstd, w, b)


def _rms_bwd(dy, xhat, rstd, w):
    g = dy.float() * w.float()
    dx = rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True))
    return dx.to(dy.dtype), (dy.float() * xhat).sum(0).to(w.dtype)


def _rms_bwd_from_input(dy, x, rstd, w):
    return _rms_bwd(dy, x.float() * rstd, rstd, w)


def _rms_bwd_from_shared(dy, s, rstd, w):
    return _rms_bwd(dy, s.float(), rstd, w)


def _norm_rows(n: int, device: torch.device, iters: int) -> list[dict]:
    rows_ = max(n // HIDDEN, 1)
    x = torch.randn(rows_, HIDDEN, device=device, dtype=BF16)
    dy = torch.randn_like(x)
    w = torch.rand(HIDDEN, device=device, dtype=BF16) + 0.5
    b = torch.randn(HIDDEN, device=device, dtype=BF16)
    xf = x.float()
    mean = xf.mean(-1, keepdim=True)
    rstd = torch.rsqrt(xf.var(-1, unbiased=False, keepdim=True) + 1e-5)
    s = ((xf - mean) * rstd).to(BF16)
    rms_r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)
    s_rms = (xf * rms_r).to(BF16)
    e = 2 * x.numel()  # one bf16 pass over the activations
    stats = 4 * rows_
    out = []
    for kernel, impl, fn, args, nbytes in (
        ("layer_norm_bwd", "inductor (reads x)", _ln_bwd_from_input, (dy, x, mean, rstd, w, b), 3 * e + 2 * stats),
        ("layer_norm_bwd", "approxbp MS-BP (reads x̂)", _ln_bwd_from_shared, (dy, s, mean, rstd, w, b), 3 * e + 2 * stats),
        ("rms_norm_bwd", "inductor (reads x)", _rms_bwd_from_input, (dy, x, rms_r, w), 3 * e + stats),
        ("rms_norm_bwd", "approxbp MS-BP (reads x̂)", _rms_bwd_from_shared, (dy, s_rms, rms_r, w), 3 * e + stats),
    ):
        cfn = torch.compile(fn, backend="inductor")
        out.append({"kernel": kernel, "impl": impl, "numel": x.numel(), "bytes": nbytes,
                    "s": _time(lambda: cfn(*args), device, iters)})
    return out


def render(data: dict) -> str:
    meta = data["meta"]
    out = [
        "# Kernel microbenchmarks",
        "",
        f"Produced by `{data['command']}` on {meta['machine']} ({meta['date']}, torch {meta['torch']}, "
        f"triton {meta.get('triton')}). Raw figures: `docs/results/kernels_{meta['tag']}.json`. "
        f"Measured copy bandwidth: {meta['copy_GBps']:.0f} GB/s (read + write).",
        "",
        *markdown_table(["kernel", "implementation", "elements", "µs", "GB/s", "% copy"], "llrrrr",
                        [[r["kernel"], r["impl"], f"{r['numel']:,}", f"{1e6 * r['s']:.1f}", f"{_gbps(r):.0f}",
                          f"{100 * _gbps(r) / meta['copy_GBps']:.0f}%"] for r in data["rows"]]),
    ]
    return "\n".join(out) + "\n"


def _gbps(row: dict) -> float:
    return row["bytes"] / row["s"] / 1e9


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tag", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--sizes", type=int, nargs="+", default=[1 << 20, 1 << 24, 1 << 27])
    p.add_argument("--iters", type=int, default=20, help="CPU only; CUDA uses triton.testing.do_bench")
    p.add_argument("--out-dir", type=Path, default=ROOT / "docs")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but no CUDA device")
    meta, command = provenance("kernels", argv, args.device)
    meta["tag"] = args.tag
    meta["copy_GBps"] = copy_bandwidth(device, max(args.sizes) * 2, args.iters)
    data = {"meta": meta, "command": command, "rows": []}
    for n in args.sizes:  # the JSON and the page after every size: a killed run keeps the sizes it finished
        rows = _act_rows(n, device, args.iters) + _norm_rows(n, device, args.iters)
        data["rows"] += rows
        print(json.dumps(rows), flush=True)
        _write(args.out_dir, args.tag, data)
    print(render(data))
    return 0


def _write(out_dir: Path, tag: str, data: dict) -> None:
    """docs/results/kernels_<tag>.json and docs/kernels.md, each replaced whole."""
    replace_file(out_dir / "results" / f"kernels_{tag}.json", json.dumps(data, indent=1) + "\n")
    replace_file(out_dir / "kernels.md", render(data))


if __name__ == "__main__":
    sys.exit(main())
