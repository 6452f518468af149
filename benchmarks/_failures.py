"""What the fuzz scripts (fuzz.py, forward_fuzz.py) call one bug, and how they shrink it.

A failed example records ``failure_text(e)``: its :func:`signature`, a newline,
then the head of the message. Grouping and shrinking read the signature back
from that first line.
"""

from __future__ import annotations

import re
import time
from typing import Callable, Iterable, TypeVar

Spec = TypeVar("Spec")


def signature(e: BaseException) -> str:
    """What makes two failures the same bug: the exception type and the head of its
    message (up to the details: which tensors, how far off), numbers blanked;
    for a crash, also the first wrapped ``...Error:`` line (dynamo wraps what broke)."""
    lines = [line for line in str(e).strip().splitlines() if line.strip()] or [""]
    blank = lambda text: re.sub(r"\d[\d.e+-]*", "#", text)
    if isinstance(e, AssertionError):
        return f"{type(e).__name__}: " + blank(re.split(r": | \(", lines[0])[0])[:90]
    inner = [line for line in lines[1:] if re.match(r"\w+(Error|Exception): ", line)]
    tail = f" ... {blank(inner[0])[:90]}" if inner else ""
    return f"{type(e).__name__}: {blank(lines[0])[:90]}{tail}"


def failure_text(e: BaseException) -> str:
    """The ``detail`` a failed example records: its signature, then the first 2000 characters of the message."""
    return signature(e) + "\n" + str(e)[:2000]


def group(rows: list[dict]) -> dict[str, dict]:
    """The failed rows (``status == "fail"``) by signature, in order of first sight: each with
    how many rows failed so, and the first such row's ``spec`` and ``detail``."""
    failures: dict[str, dict] = {}
    for r in rows:
        if r["status"] == "fail":
            sig = r["detail"].partition("\n")[0]
            failures.setdefault(sig, {"signature": sig, "count": 0, "first": r["spec"], "detail": r["detail"]})
            failures[sig]["count"] += 1
    return failures


def minimise(spec: Spec, sig: str, simpler: Callable[[Spec], Iterable[Spec]],
             attempt: Callable[[Spec], tuple[str, object]], budget_s: float) -> tuple[Spec, int]:
    """Greedy shrink: take any one-step-simpler spec (``simpler``) that fails with the same
    signature (``attempt`` returns ``(status, detail)``), until none does or ``budget_s`` is spent.
    Returns the smallest spec found and how many candidates were tried."""
    deadline, tries = time.monotonic() + budget_s, 0
    improved = True
    while improved and time.monotonic() < deadline:
        improved = False
        for cand in simpler(spec):
            if time.monotonic() >= deadline:
                break
            tries += 1
            status, detail = attempt(cand)
            if status == "fail" and detail.split("\n", 1)[0] == sig:
                spec, improved = cand, True
                break
    return spec, tries
