"""README's explain() sample, regenerated from the demo model.

    python -m benchmarks.readme_sample           # rewrites the sample in README.md
    python -m benchmarks.readme_sample --check   # exits 1, with a diff, if README's sample is stale

The sample is what ``python -m approxbp_fx.demo`` prints first
(``approxbp_fx.demo.report()``): the figures move whenever a rewrite changes
what is saved, so README holds them between two markers and this script owns
what lies between. tests/test_readme.py fails when they differ from a fresh run.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
BEGIN = "<!-- explain-sample: written by `python -m benchmarks.readme_sample`, do not edit -->"
END = "<!-- /explain-sample -->"


def render() -> str:
    """The block README should hold now: the demo's explain() output, fenced."""
    from approxbp_fx.demo import report

    return f"```\n{report()}\n```"


def _span(text: str) -> tuple[int, int]:
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"README has no {BEGIN!r} ... {END!r} block")
    return start + len(BEGIN) + 1, end  # the block starts on the line after BEGIN


def sample(text: str) -> str:
    """The block between README's markers."""
    start, end = _span(text)
    return text[start:end].rstrip("\n")


def with_sample(text: str, block: str) -> str:
    """``text`` with the block between the markers replaced by ``block``."""
    start, end = _span(text)
    return text[:start] + block + "\n" + text[end:]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="only compare; exit 1 if README's sample is stale")
    p.add_argument("--readme", type=Path, default=README)
    args = p.parse_args(argv)

    text = args.readme.read_text()
    old, new = sample(text), render()
    if args.check:
        diff = difflib.unified_diff(old.splitlines(), new.splitlines(), "README.md", "demo now", lineterm="")
        print("\n".join(diff) or "README's explain() sample is up to date")
        return int(old != new)
    args.readme.write_text(with_sample(text, new))
    print(f"{args.readme}: explain() sample {'rewritten' if old != new else 'already up to date'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
