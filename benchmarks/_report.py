"""What every benchmark script writes: raw JSON with its provenance, and a docs table."""

from __future__ import annotations

import datetime
import json
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def provenance(script: str, argv: list[str] | None) -> tuple[dict, str]:
    """``(meta, command)``: versions, machine and date, and the command line that reproduces the run."""
    args = argv if argv is not None else sys.argv[1:]
    command = f"python benchmarks/{script}" + (" " + " ".join(args) if args else "")
    meta = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()} CPU",
        "date": datetime.date.today().isoformat(),
    }
    return meta, command


def write(json_path: Path, md_path: Path, payload: dict, markdown: str) -> None:
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    md_path.write_text(markdown)
    print(markdown)
