"""The printer of a shipped literal: the Python text pasted into coefficients.py."""

from __future__ import annotations

from typing import Callable, Iterable


def format_literal(variable: str, tables: Iterable, objective: Callable, with_a0: bool = False) -> str:
    """``variable: dict[...] = {...}`` for ``tables`` (StepTables), keyed
    ``(activation, bits)``, each entry ``(a, c)``, or ``(a, c, a0)`` with
    ``with_a0``, and ``objective(tab)`` in a comment.  ``repr`` floats
    round-trip, so the literal is exact."""
    entry = "tuple[tuple[float, ...], tuple[float, ...], float]" if with_a0 else (
        "tuple[tuple[float, ...], tuple[float, ...]]")
    lines = [f"{variable}: dict[tuple[str, int], {entry}] = {{"]
    for tab in tables:
        lines.append(f'    ("{tab.activation}", {tab.bits}): (  # J = {objective(tab):.12e}')
        lines.append(_floats(tab.a, " " * 8))
        lines.append(_floats(tab.c, " " * 8))
        if with_a0:
            lines.append(f"        {tab.a0!r},")
        lines.append("    ),")
    lines.append("}")
    return "\n".join(lines)


def _floats(values, indent: str) -> str:
    """A tuple of floats, four to a line."""
    if len(values) == 1:
        return f"{indent}({values[0]!r},),"
    lines = [f"{indent}("]
    for i in range(0, len(values), 4):
        lines.append(f"{indent}    " + ", ".join(repr(v) for v in values[i : i + 4]) + ",")
    lines.append(f"{indent}),")
    return "\n".join(lines)
