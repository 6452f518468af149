"""How well each table family's step derivative follows h', per activation, bits and input scale.

    python -m benchmarks.table_cosines

For every shipped table (coefficients.TABLES x ACTIVATIONS x BITS), the
per-element cosine ``E[h'(X) s(X)] / sqrt(E[h'^2] E[s^2])`` and the relative
error ``E[(h' - s)^2] / E[h'^2]`` under ``X ~ N(0, sigma^2)``, by mpmath
quadrature (approxbp_fx.derivation.fitted.cosine / objective): exact numbers,
no sampling.  Draws the 2-bit step derivatives against h' for each activation.

Writes docs/results/table_cosines.json, docs/tables.md and docs/images/tables_2bit.png.
"""

from __future__ import annotations

import sys

import torch

from approxbp_fx.activations import ACTIVATIONS, exact_derivative
from approxbp_fx.coefficients import BITS, TABLES, table
from approxbp_fx.derivation import fitted

from ._render import figure, markdown_table, produced_by
from ._report import ROOT, provenance, write

SIGMAS = (0.25, 0.5, 1.0, 2.0, 3.0)  # 0.25: random-init transformers' MLP inputs (docs/grad_cosine.md)


def measure() -> list[dict]:
    rows = []
    for name in ACTIVATIONS:
        for bits in BITS:
            for family in TABLES:
                tab = table(name, bits, family)
                rows.append({
                    "activation": name, "bits": bits, "table": family, "knots": list(tab.c), "levels": list(tab.levels),
                    "cosine": {str(s): fitted.cosine(tab, s) for s in SIGMAS},
                    "rel_error_n01": fitted.relative_error(tab),
                })
    return rows


def _draw(fig, axes) -> None:
    x = torch.linspace(-4, 4, 2001, dtype=torch.float64)
    for ax, name in zip(axes.flat, ACTIVATIONS):
        ax.plot(x, exact_derivative(name, x), color="black", linewidth=1.4, label="h' (exact)")
        for family in TABLES:
            tab = table(name, 2, family)
            code = torch.bucketize(x, torch.tensor(tab.c, dtype=torch.float64))
            ax.plot(x, torch.tensor(tab.levels, dtype=torch.float64)[code], linewidth=1.2, label=f"2-bit {family}")
        ax.plot(x, torch.exp(-x * x / 2) * 0.4, color="grey", linestyle=":", linewidth=1, label="N(0,1) density (x0.4)")
        ax.set(title=name, xlabel="x")
    axes.flat[0].legend(fontsize=7)


def render(rows: list[dict], command: str, meta: dict) -> str:
    head = ["activation", "bits", "table", *(f"cos, σ={s:g}" for s in SIGMAS), "E[(h'-s)²]/E[h'²], N(0,1)"]
    body = [[r["activation"], r["bits"], r["table"], *(f"{r['cosine'][str(s)]:.4f}" for s in SIGMAS),
             f"{r['rel_error_n01']:.4f}"] for r in rows]
    two = [[r["activation"], r["table"], ", ".join(f"{v:+.3f}" for v in r["knots"]),
            ", ".join(f"{v:+.3f}" for v in r["levels"])] for r in rows if r["bits"] == 2]
    png = ROOT / "docs" / "images" / "tables_2bit.png"
    drawn = figure(png, _draw, dpi=100, nrows=2, ncols=2, figsize=(10, 7))
    return "\n".join([
        "# The step tables: how closely each family's derivative follows h'",
        "",
        produced_by(command, meta) + "; raw figures in `docs/results/table_cosines.json`. Per-element cosine "
        "between h' and the step derivative s, and the relative squared error, under X ~ N(0, σ²) (exact "
        "quadrature). `paper`: h~ fitted to h over the whole line (the paper's ReGELU2/ReSiLU2 at 2 bits); "
        "`fitted`: s fitted to h' under N(0, 1) (approxbp_fx/derivation/fitted.py).",
        "",
        "## 2-bit tables",
        "",
        *markdown_table(["activation", "table", "knots", "levels (derivative per code)"], "llll", two),
        "",
        *([f"![2-bit step derivatives against h'](images/{png.name})", ""] if drawn else []),
        "## Every table",
        "",
        *markdown_table(head, "lrl" + "r" * (len(SIGMAS) + 1), body),
        "",
    ])


def main(argv=None) -> int:
    meta, command = provenance("table_cosines", argv)
    rows = measure()
    write(ROOT / "docs" / "results" / "table_cosines.json", ROOT / "docs" / "tables.md",
          {"command": command, "meta": meta, "rows": rows}, render(rows, command, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
