"""What the fuzz scripts (fuzz.py, forward_fuzz.py) call one bug: a failure's signature."""

from __future__ import annotations

import re


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
