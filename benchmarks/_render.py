"""How the benchmark pages are drawn: one markdown table, one PNG figure, one provenance line.

Every page under docs/ that a script renders goes through these, so a table or
a figure is laid out the same way everywhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Sequence

# Column alignment, one letter per column: left (text), right (numbers), centred (yes/no).
_ALIGN = {"l": "---", "r": "---:", "c": ":-:"}


def markdown_table(header: Sequence[str], align: str, rows: Iterable[Sequence]) -> list[str]:
    """A markdown table's lines: the header, the alignment row, one line per row (cells through ``str``).

    >>> markdown_table(["block", "bytes"], "lr", [["GELU MLP", "1,024"]])
    ['| block | bytes |', '|---|---:|', '| GELU MLP | 1,024 |']
    """
    if len(align) != len(header):
        raise ValueError(f"{len(header)} columns but alignment {align!r}")
    lines = ["|" + "".join(_ALIGN[a] + "|" for a in align)]
    for row in rows:
        if len(row) != len(header):  # a short row would shift every cell after the gap
            raise ValueError(f"row {list(row)} has {len(row)} cells, the header {len(header)}")
        lines.append(_line(row))
    return [_line(header)] + lines


def _line(cells: Sequence) -> str:
    return "| " + " | ".join(map(str, cells)) + " |"


def produced_by(command: str, meta: dict) -> str:
    """The sentence that opens a page: the command, torch, the machine and the date of the run."""
    return f"Produced by `{command}` with torch {meta['torch']} on {meta['machine']} ({meta['date']})"


def figure(png: Path, draw: Callable, dpi: int, **subplots) -> bool:
    """Write one PNG: ``draw(fig, axes)`` on ``plt.subplots(**subplots)``, then a tight layout.

    Returns False, writing nothing, where matplotlib (the optional ``bench``
    extra) is not installed; the page then goes without its figure.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display on a benchmark machine
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(**subplots)
    try:
        draw(fig, axes)
        fig.tight_layout()
        png.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(png, dpi=dpi)
    finally:
        plt.close(fig)
    return True
