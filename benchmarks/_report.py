"""What every benchmark script writes: raw JSON with its provenance, and a docs table."""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


# Run control that changes where and how long a run goes, not its figures: left out of the
# command a page cites (gpu_suite.sh passes an absolute deadline and a scratch output folder).
_RUN_CONTROL = ("--deadline", "--out-dir")


def _figure_args(args: list[str]) -> list[str]:
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a in _RUN_CONTROL:
            skip = True
        elif not a.startswith(tuple(f + "=" for f in _RUN_CONTROL)):
            out.append(a)
    return out


def provenance(script: str, argv: list[str] | None, device: str = "cpu") -> tuple[dict, str]:
    """``(meta, command)``: versions, machine and date, and the command line that reproduces the run.

    On a CUDA ``device`` the machine is the GPU's name, and the CUDA version is recorded.
    """
    import torch

    args = _figure_args(argv if argv is not None else sys.argv[1:])
    command = f"python -m benchmarks.{script}" + (" " + " ".join(args) if args else "")
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    meta = {
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "machine": f"{platform.machine()} CPU",
        "date": datetime.date.today().isoformat(),
    }
    if torch.device(device).type == "cuda":
        meta.update(machine=torch.cuda.get_device_name(device), gpu=torch.cuda.get_device_name(device),
                    cuda=torch.version.cuda)
    return meta, command


def replace_file(path: Path, text: str) -> None:
    """Write ``path`` whole through a temporary file: a run killed mid-write keeps the old file, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write(json_path: Path, md_path: Path, payload: dict, markdown: str) -> None:
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    md_path.write_text(markdown)
    print(markdown)


def write_section(json_path: Path, md_path: Path, payload: dict, section: str, markdown: str) -> None:
    """:func:`write`, but only the part of ``md_path`` between this section's markers is replaced
    (:func:`replace_section`), so several scripts render one page."""
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    replace_section(md_path, section, markdown)
    print(markdown)


def replace_section(md_path: Path, section: str, markdown: str) -> None:
    """Replace the part of ``md_path`` between this section's markers (appended if the page lacks it)."""
    begin, end = f"<!-- begin {section} (generated) -->\n", f"<!-- end {section} -->\n"
    body = begin + markdown.rstrip("\n") + "\n" + end
    page = md_path.read_text() if md_path.exists() else ""
    if begin in page and end in page:
        head, rest = page.split(begin, 1)
        page = head + body + rest.split(end, 1)[1]
    else:
        page = page + ("\n" if page and not page.endswith("\n\n") else "") + body
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(page)
