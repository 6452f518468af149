"""Issue 14's saved-bytes targets, checked on the fake-CUDA grids (bytes only, published size).

    python -m benchmarks.fakecuda_targets      # prints the table; writes its section of docs/performance.md

For every (model, scenario, precision) cell of ``train_step_fakecuda_tf524.json``
and ``train_step_fakecuda_tf517.json``: approxbp against the best compiled peer,
min(inductor, inductor with pointwise recompute), and against eager. The bars:

* every cell: approxbp <= the best compiled peer;
* LoRA q,v of the GELU/LayerNorm models (ViT, GPT-2, RoBERTa): <= 0.80x of it;
* every autocast (``amp``) cell: strictly below it;
* the paper's setting (ViT-B/16, LoRA q,v, amp, batch 64): <= 0.50x eager.

Exits 1 if a bar is missed or a cell is missing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ._render import markdown_table
from ._report import ROOT, write_section

TAGS = ("fakecuda_tf524", "fakecuda_tf517")
GELU_LN = ("vit-b16", "gpt2-124m", "roberta-base")
PAPER = ("vit-b16", "lora_qv", "amp")


def bars(model: str, scenario: str, precision: str) -> list[tuple[str, float, bool]]:
    """``(name, bound on approxbp / best peer, strict)`` for a cell."""
    out = [("<= best peer", 1.0, False)]
    if scenario == "lora_qv" and model in GELU_LN:
        out.append(("<= 0.80x best peer", 0.80, False))
    if precision == "amp":
        out.append(("< best peer", 1.0, True))
    return out


def check(cells: dict) -> list[dict]:
    """One row per (model, scenario, precision) with the ratios and the bars it misses."""
    rows = []
    for key in sorted({k.rsplit("|", 1)[0] for k in cells}):
        get = lambda b: cells.get(f"{key}|{b}", {}).get("saved_bytes")  # noqa: E731
        ours, peers, eager = get("approxbp"), [get("inductor"), get("inductor_recompute")], get("eager")
        model, scenario, precision = key.split("|")
        if ours is None or None in peers or eager is None:
            rows.append({"cell": key, "missed": ["not measured"]})
            continue
        ratio = ours / min(peers)
        missed = [name for name, bound, strict in bars(model, scenario, precision)
                  if (ratio >= bound if strict else ratio > bound)]
        if (model, scenario, precision) == PAPER and ours / eager > 0.50:
            missed.append("<= 0.50x eager")
        rows.append({"cell": key, "best_peer": min(peers), "approxbp": ours, "eager": eager,
                     "over_best_peer": ratio, "over_eager": ours / eager, "missed": missed})
    return rows


def render(results: dict[str, list[dict]]) -> str:
    lines = ["### Saved-bytes targets on fake CUDA (issue 14)", "",
             "`python -m benchmarks.fakecuda_targets`, from the fake-CUDA grids above (bytes only; MiB).", ""]
    for tag, rows in results.items():
        lines += [f"#### {tag}", ""]
        table = [[r["cell"].replace("|", " / "), f"{r['best_peer'] / 2**20:,.1f}", f"{r['approxbp'] / 2**20:,.1f}",
                  f"{r['over_best_peer']:.3f}", f"{r['over_eager']:.3f}", ", ".join(r["missed"]) or "all met"]
                 if "best_peer" in r else [r["cell"], "", "", "", "", "not measured"] for r in rows]
        lines += markdown_table(["cell", "best compiled peer", "approxbp", "/ best peer", "/ eager", "bars"],
                                "lrrrrl", table)
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, default=ROOT / "docs/results")
    p.add_argument("--md", type=Path, default=ROOT / "docs/performance.md")
    args = p.parse_args(argv)
    results = {tag: check(json.loads((args.results / f"train_step_{tag}.json").read_text())["cells"]) for tag in TAGS}
    text = render(results)
    print(text)
    payload = {"command": "python -m benchmarks.fakecuda_targets", "results": results}
    write_section(args.results / "fakecuda_targets.json", args.md, payload, "fake-cuda targets", text)
    return int(any(r["missed"] for rows in results.values() for r in rows))


if __name__ == "__main__":
    sys.exit(main())
