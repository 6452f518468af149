"""Fake CUDA's saved bytes against a real GPU's, cell by cell.

    python -m benchmarks.fakecuda_validate                    # h100 against fakecuda_tf517
    python -m benchmarks.fakecuda_validate --reference h100 --fake fakecuda_tf517 --tolerance 0.01

Reads ``docs/results/train_step_<tag>.json`` for both tags, prints one row per
cell of the reference run (cell, reference MiB, fake-cuda MiB, ratio), and
rewrites the table's section of docs/performance.md. Exits 1 if a reference
cell is missing from the fake run, ran at another batch or sequence length, or
differs by more than ``--tolerance``. Compare runs made with the same
transformers version: it decides the attention mask, hence the attention kernel.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ._render import markdown_table
from ._report import ROOT, write_section

MIB = 2**20
DEFAULT_REFERENCE, DEFAULT_FAKE = "h100", "fakecuda_tf517"


def load(results: Path, tag: str) -> dict:
    return json.loads((results / f"train_step_{tag}.json").read_text())


def compare(reference: dict, fake: dict) -> list[dict]:
    """One row per reference cell that has saved bytes: the same cell key on both sides.
    ``ratio`` is fake / reference, or None where the fake run lacks the cell or ran it at
    another shape (``problem`` says which)."""
    rows = []
    for key, ref in reference["cells"].items():
        if "saved_bytes" not in ref:
            continue
        ours = fake["cells"].get(key, {})
        row = {"cell": key.replace("|", " / "), "reference_MiB": ref["saved_bytes"] / MIB,
               "fake_MiB": None, "ratio": None, "problem": None}
        if "saved_bytes" not in ours:
            row["problem"] = ours.get("error", "not measured")
        elif (ours["batch"], ours["seq"]) != (ref["batch"], ref["seq"]):
            row["problem"] = f"batch x seq {ours['batch']}x{ours['seq']}, reference {ref['batch']}x{ref['seq']}"
        else:
            row.update(fake_MiB=ours["saved_bytes"] / MIB, ratio=ours["saved_bytes"] / ref["saved_bytes"])
        rows.append(row)
    return rows


def failures(rows: list[dict], tolerance: float) -> list[dict]:
    return [r for r in rows if r["ratio"] is None or abs(r["ratio"] - 1) > tolerance]


def table(rows: list[dict], reference_name: str) -> list[str]:
    lines = [[r["cell"], f"{r['reference_MiB']:,.1f}",
              f"{r['fake_MiB']:,.1f}" if r["fake_MiB"] is not None else r["problem"],
              f"{r['ratio']:.5f}" if r["ratio"] is not None else ""] for r in rows]
    return markdown_table(["cell", f"{reference_name} MiB", "fake-cuda MiB", "ratio (fake / reference)"], "lrrr", lines)


def summary(reference: dict, fake: dict, rows: list[dict], tolerance: float, names=("reference", "fake")) -> str:
    """The section's text: where each side ran, the table, and the verdict."""
    rm, fm = reference["meta"], fake["meta"]
    bad = failures(rows, tolerance)
    worst = max((abs(r["fake_MiB"] - r["reference_MiB"]) for r in rows if r["ratio"] is not None), default=0.0)
    verdict = (f"Every cell within {100 * tolerance:g}% (largest difference {worst:.2f} MiB)." if not bad else
               f"{len(bad)} of {len(rows)} cells outside {100 * tolerance:g}% or missing: "
               + ", ".join(r["cell"] for r in bad) + ".")
    head = (f"Reference: {rm['machine']}, torch {rm['torch']}, transformers {rm['transformers']} ({rm['date']}). "
            f"Fake CUDA: torch {fm['torch']}, transformers {fm['transformers']} ({fm['date']}). "
            "Saved activation bytes of one training step, same cells, same batch and sequence length.")
    return "\n".join([head, "", *table(rows, f"`{names[0]}`"), "", verdict, ""])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference", default=DEFAULT_REFERENCE, help="tag of the run on a real GPU")
    p.add_argument("--fake", default=DEFAULT_FAKE, help="tag of the fake-cuda run")
    p.add_argument("--tolerance", type=float, default=0.01, help="largest |ratio - 1| accepted")
    p.add_argument("--docs", type=Path, default=ROOT / "docs", help="results/ is read here; performance.md written")
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args(argv)
    reference, fake = load(args.docs / "results", args.reference), load(args.docs / "results", args.fake)
    rows = compare(reference, fake)
    text = summary(reference, fake, rows, args.tolerance, (args.reference, args.fake))
    if args.no_write:
        print(text)
    else:
        payload = {"reference": args.reference, "fake": args.fake, "tolerance": args.tolerance, "rows": rows}
        write_section(args.docs / "results" / "fakecuda_validation.json", args.docs / "performance.md", payload,
                      "fakecuda validation", text)
    return 1 if failures(rows, args.tolerance) else 0


if __name__ == "__main__":
    sys.exit(main())
