"""Saved activation bytes per training step: eager vs inductor vs approxbp.

    python -m benchmarks.saved_bytes                # writes docs/results/saved_bytes.json + docs/saved_bytes.md

Blocks: linear -> activation -> linear (GELU and SiLU), second linear trainable
or frozen, bf16 and fp32 weights, plus SwiGLU as the case that must stay exact.
Device-independent: runs on CPU. Every figure in docs/saved_bytes.md comes
from the JSON this script writes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import approxbp_fx
from approxbp_fx import saved_activation_bytes
from approxbp_fx.backend import inductor_with_recompute

from ._render import markdown_table, produced_by
from ._report import ROOT, provenance, write


class MLP(nn.Module):
    def __init__(self, act, d, hidden, frozen):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(d, hidden), act, nn.Linear(hidden, d)
        self.fc2.requires_grad_(not frozen)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class SwiGLU(nn.Module):
    def __init__(self, d, hidden, frozen):
        super().__init__()
        self.gate, self.up = nn.Linear(d, hidden, bias=False), nn.Linear(d, hidden, bias=False)
        self.down = nn.Linear(hidden, d, bias=False)
        self.down.requires_grad_(not frozen)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


BLOCKS = {
    "GELU MLP": lambda d, h, frozen: MLP(nn.GELU(), d, h, frozen),
    "SiLU MLP": lambda d, h, frozen: MLP(nn.SiLU(), d, h, frozen),
    "SwiGLU": lambda d, h, frozen: SwiGLU(d, h, frozen),
}


def measure(block: str, frozen: bool, dtype: torch.dtype, d: int, hidden: int, tokens: tuple[int, int]) -> dict:
    torch.manual_seed(0)
    model = BLOCKS[block](d, hidden, frozen).to(dtype)
    x = torch.randn(*tokens, d, dtype=dtype)
    row = {"block": block, "second_linear": "frozen" if frozen else "trainable", "dtype": str(dtype)[6:]}
    for name, fn in [
        ("eager", model),
        ("inductor", torch.compile(model, backend="inductor")),
        ("inductor_recompute", torch.compile(model, backend=inductor_with_recompute)),
        ("approxbp", torch.compile(model, backend="approxbp")),
    ]:
        torch._dynamo.reset()
        row[name] = saved_activation_bytes(fn, x, params=model)
    row["approxbp_over_inductor"] = round(row["approxbp"] / row["inductor"], 4)
    row["approxbp_over_best_peer"] = round(row["approxbp"] / min(row["inductor"], row["inductor_recompute"]), 4)
    return row


_COLUMNS = ["block", "2nd linear", "dtype", "eager B", "inductor B", "inductor + recompute B", "approxbp B",
            "approxbp / inductor", "approxbp / best compiled peer"]


def _row(r: dict) -> list[str]:
    return [r["block"], r["second_linear"], r["dtype"], f"{r['eager']:,}", f"{r['inductor']:,}",
            f"{r['inductor_recompute']:,}", f"{r['approxbp']:,}", f"{r['approxbp_over_inductor']:.3f}",
            f"{r['approxbp_over_best_peer']:.3f}"]


def render(rows: list[dict], meta: dict, command: str) -> str:
    out = [
        "# Saved activation bytes per training step",
        "",
        f"{produced_by(command, meta)}.",
        f"Block: `x[{meta['tokens'][0]}x{meta['tokens'][1]}x{meta['d']}]` -> Linear({meta['d']}, {meta['hidden']}) -> act -> "
        f"Linear({meta['hidden']}, {meta['d']}); 2-bit codes. Raw figures: `docs/results/saved_bytes.json`.",
        "Bytes exclude parameters (see `approxbp_fx.measure`).",
        "",
        "Peers: eager; inductor; inductor with pointwise recompute (`ban_recompute_materialized_backward=False`,"
        " `approxbp_fx.backend.inductor_with_recompute`). approxbp runs its default config (`recompute=\"auto\"`).",
        "",
        *markdown_table(_COLUMNS, "lllrrrrrr", map(_row, rows)),
    ]
    return "\n".join(out) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--tokens", type=int, nargs=2, default=(4, 127), help="batch, sequence (match no weight shape)")
    p.add_argument("--json", type=Path, default=ROOT / "docs/results/saved_bytes.json")
    p.add_argument("--md", type=Path, default=ROOT / "docs/saved_bytes.md")
    args = p.parse_args(argv)

    rows = [
        measure(block, frozen, dtype, args.d, args.hidden, tuple(args.tokens))
        for block in BLOCKS
        for frozen in (False, True)
        for dtype in (torch.bfloat16, torch.float32)
    ]
    meta, command = provenance("saved_bytes", argv)
    meta.update(d=args.d, hidden=args.hidden, tokens=list(args.tokens), bits=approxbp_fx.ApproxBPConfig().bits)
    write(args.json, args.md, {"meta": meta, "command": command, "rows": rows}, render(rows, meta, command))


if __name__ == "__main__":
    main()
