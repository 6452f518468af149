"""The pieces of benchmarks/gpu_suite.sh that are Python: its record, and the pages it renders.

    python -m benchmarks._gpu_suite start OUT [--tag T] [--dry-run] [--budget S] [--commit SHA] [--resume]
    python -m benchmarks._gpu_suite record OUT TAG STEP STATUS RC SECONDS TIMEOUT LOG [COMMAND]
    python -m benchmarks._gpu_suite render OUT TAG
    python -m benchmarks._gpu_suite entry-points SITE

``OUT`` mirrors the repository: everything lands under ``OUT/docs/``, so copying
``OUT`` over the checkout puts each file where it belongs.

* ``start`` writes ``docs/results/gpu_suite_<tag>.json`` (the environment:
  torch, triton, transformers, peft, GPU, CUDA, commit and a hash of the
  sources; the budget) and prints the tag. ``--resume`` first copies the
  checkout's ``train_step_<tag>.json`` into ``OUT`` if it was measured with
  this torch, transformers and device, so the suite measures only what is missing.
* ``record`` adds one step's outcome to that record (with the end of its log
  when it did not succeed, and the test counts of ``pytest -m gpu``).
* ``render`` writes ``docs/benchmarks.md``, ``docs/kernels.md`` and
  ``docs/performance.md``'s "gpu suite" section into ``OUT/docs/``, from this
  run's JSON over the checkout's (the checkout itself is not touched), with this
  run's chart in ``OUT/docs/images/``.
* ``entry-points`` registers ``backend="approxbp"`` where the package is not installed.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from ._render import markdown_table
from ._report import ROOT, replace_file

# The figures that matter most, in the order the suite measures them: (model, scenario, precision).
PRIORITY_CELLS = (("vit-b16", "lora_qv", "amp"), ("gpt2-124m", "full", "bf16"), ("llama-1b", "lora_qv", "bf16"))
MIB = 2**20
SOURCES = ("approxbp_fx", "benchmarks", "tests", "pyproject.toml")
LOG_TAIL = 3000  # characters of a failed step's log kept in the record


def record_path(out: Path, tag: str) -> Path:
    return out / "docs" / "results" / f"gpu_suite_{tag}.json"


def junit_path(out: Path, tag: str) -> Path:
    return out / "docs" / "results" / f"gpu_suite_{tag}_pytest.xml"


def default_tag(gpu: str | None) -> str:
    """``h100_suite`` for "NVIDIA H100 80GB HBM3": the first model number in the GPU's name."""
    match = re.search(r"\b([A-Za-z]{1,2}\d{2,4})\b", gpu or "")
    return f"{match.group(1).lower() if match else 'gpu'}_suite"


def source_hash(root: Path = ROOT) -> str:
    """sha256 over the checkout's source files (names and contents): the commit where git is absent."""
    h = hashlib.sha256()
    for top in SOURCES:
        base = root / top
        files = sorted(base.rglob("*")) if base.is_dir() else [base]
        for f in files:
            if f.is_file() and "__pycache__" not in f.parts and f.suffix not in (".pyc", ".so", ".o"):
                h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def environment(device: str, commit: str | None) -> dict:
    """Versions, GPU and source of the run. The transformers version decides the attention path."""
    import peft
    import torch
    import transformers

    from ._report import provenance

    meta, _ = provenance("gpu_suite", [], device)
    meta.update(transformers=transformers.__version__, peft=peft.__version__, device=device,
                cuda_available=torch.cuda.is_available(),
                git_commit=commit or _git("rev-parse", "HEAD"),
                git_dirty=bool(_git("status", "--porcelain", "--untracked-files=no")) if _git("rev-parse") is not None
                else None,
                source_sha256=source_hash())
    return meta


def register_entry_points(site: Path, groups=("torch_dynamo_backends",)) -> Path:
    """Make the checkout's ``backend="approxbp"`` findable by name without installing it.

    Writes a ``.dist-info`` with pyproject.toml's entry points of ``groups`` into ``site``,
    to go on ``PYTHONPATH``: no pip, no network, nothing written into the checkout. (The
    ``torch.backends`` autoload hook is left out: the suite does not use it.)
    """
    import tomllib  # Python 3.11+, as on the GPU machines

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    info = site / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
    (info / "entry_points.txt").write_text("".join(
        f"[{group}]\n" + "".join(f"{name} = {target}\n" for name, target in points.items()) + "\n"
        for group, points in project["entry-points"].items() if group in groups))
    return info


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def _save(path: Path, data: dict) -> None:
    replace_file(path, json.dumps(data, indent=1) + "\n")


def start(args) -> str:
    import torch

    device = "cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"
    env = environment(device, args.commit)
    tag = args.tag or ("dryrun" if args.dry_run else default_tag(env.get("gpu")))
    if args.resume:
        _seed(args.out, tag, env)
    _save(record_path(args.out, tag), {
        "meta": env, "tag": tag, "dry_run": args.dry_run, "budget_s": args.budget,
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "steps": [],
    })
    return tag


def _seed(out: Path, tag: str, env: dict) -> None:
    """Copy the checkout's train_step_<tag>.json into ``out``, where this run may add to it."""
    src = ROOT / "docs" / "results" / f"train_step_{tag}.json"
    dst = out / "docs" / "results" / src.name
    if not src.exists() or dst.exists():
        return
    old = _load(src)["meta"]
    changed = [k for k in ("device", "torch", "transformers") if old.get(k) != env[k]]
    if changed:
        print(f"--resume: not resuming {src.name}, measured with another {', '.join(changed)}", file=sys.stderr)
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)


def pytest_summary(xml_path: Path) -> dict | None:
    """Counts and failing test ids from a junit XML file (None if pytest wrote none)."""
    if not xml_path.exists():
        return None
    root = ET.parse(xml_path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["time_s"] = round(sum(float(s.get("time", 0)) for s in suites), 1)
    bad = [f"{c.get('classname')}::{c.get('name')}" for c in root.iter("testcase")
           if c.find("failure") is not None or c.find("error") is not None]
    counts["failed_tests"] = bad[:50]
    return counts


def record(args) -> None:
    path = record_path(args.out, args.tag)
    data = _load(path)
    step = {"step": args.step, "status": args.status, "rc": args.rc, "seconds": round(args.seconds, 1),
            "timeout_s": args.timeout, "command": args.command}
    if args.status != "ok" and args.log.exists():
        step["log_tail"] = args.log.read_text(errors="replace")[-LOG_TAIL:]
    if args.step == "pytest":
        step["pytest"] = pytest_summary(junit_path(args.out, args.tag))
    data["steps"].append(step)
    data["elapsed_s"] = round(sum(s["seconds"] for s in data["steps"]), 1)
    _save(path, data)


# ---------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------


def _status(step: dict) -> str:
    if step["step"] == "pytest" and step.get("pytest"):
        t = step["pytest"]
        counts = f"{t['passed']} passed, {t['failures'] + t['errors']} failed, {t['skipped']} skipped"
        return f"{step['status']}: {counts}"
    return step["status"]


def suite_section(suite: dict, train: dict | None) -> str:
    """performance.md's generated "gpu suite" section: where it ran, each step, the headline cells."""
    m = suite["meta"]
    commit = (m.get("git_commit") or "unknown")[:12] + (" (with uncommitted changes)" if m.get("git_dirty") else "")
    out = [
        f"Run `{suite['tag']}`{' (dry run: tiny models on the CPU, not figures)' if suite['dry_run'] else ''}: "
        f"`bash benchmarks/gpu_suite.sh` on {m['machine']}, started {suite['started']}; torch {m['torch']}, "
        f"triton {m.get('triton')}, transformers {m['transformers']}, peft {m['peft']}, CUDA {m.get('cuda')}; "
        f"commit {commit}, sources sha256 {m['source_sha256']}. Budget {suite['budget_s']} s; "
        f"the steps took {suite.get('elapsed_s', 0):.0f} s. Record: `docs/results/gpu_suite_{suite['tag']}.json`.",
        "",
        *markdown_table(["step", "status", "s", "limit s"], "llrr",
                        [[s["step"], _status(s), f"{s['seconds']:.0f}", s["timeout_s"]] for s in suite["steps"]]),
        "",
    ]
    if train:
        out += _headline(train)
    return "\n".join(out)


def _headline(train: dict) -> list[str]:
    """Per priority cell, one row per backend: what each would cost a user."""
    out = []
    by_cell: dict[tuple, list[dict]] = {}
    for c in train["cells"].values():
        by_cell.setdefault((c["model"], c["scenario"], c["precision"]), []).append(c)
    for key in PRIORITY_CELLS:
        cells = by_cell.get(key)
        if not cells:
            continue
        rows = []
        for c in cells:
            if "error" in c:
                rows.append([c["backend"], c["error"][:80], "", "", "", ""])
                continue
            rows.append([c["backend"], f"{c['saved_bytes'] / MIB:,.1f}", _fmt(c, "peak_bytes", MIB, "{:,.0f}"),
                         _fmt(c, "step_s", 1e-3, "{:.1f}"), _fmt(c, "throughput", 1, "{:,.0f}"),
                         _fmt(c, "compile_s", 1, "{:.1f}")])
        unit = cells[0].get("unit", "")
        out += [f"**{' / '.join(key)}**, batch {cells[0].get('batch')}:", "",
                *markdown_table(["backend", "saved MiB", "peak MiB", "step ms", unit or "throughput", "compile s"],
                                "lrrrrr", rows), ""]
    return out


def _fmt(cell: dict, field: str, scale: float, spec: str) -> str:
    return spec.format(cell[field] / scale) if field in cell else ""


def render(args) -> None:
    """Render the three pages from this run's JSON over the checkout's, into ``OUT/docs``."""
    from ._render_train_step import render_all
    from ._report import replace_section
    from .kernels import render as render_kernels

    out_docs = args.out / "docs"
    new = out_docs / "results"
    with tempfile.TemporaryDirectory() as tmp:
        docs = Path(tmp) / "docs"  # a scratch copy of the pages and results: the checkout stays as it is
        (docs / "results").mkdir(parents=True)
        shutil.copyfile(ROOT / "docs" / "performance.md", docs / "performance.md")
        for f in (ROOT / "docs" / "results").glob("train_step_*.json"):
            shutil.copyfile(f, docs / "results" / f.name)
        for f in new.glob("*.json"):
            shutil.copyfile(f, docs / "results" / f.name)
        render_all(docs / "results", docs)
        shutil.copyfile(docs / "benchmarks.md", out_docs / "benchmarks.md")
        png = docs / "images" / f"train_step_{args.tag}.png"
        if png.exists():
            (out_docs / "images").mkdir(exist_ok=True)
            shutil.copyfile(png, out_docs / "images" / png.name)
        kernels = new / f"kernels_{args.tag}.json"
        if kernels.exists():
            replace_file(out_docs / "kernels.md", render_kernels(_load(kernels)))
        suite = _load(record_path(args.out, args.tag))
        train = new / f"train_step_{args.tag}.json"
        replace_section(docs / "performance.md", "gpu suite",
                        suite_section(suite, _load(train) if train.exists() else None))
        shutil.copyfile(docs / "performance.md", out_docs / "performance.md")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="verb", required=True)
    s = sub.add_parser("start")
    s.add_argument("out", type=Path)
    s.add_argument("--tag")
    s.add_argument("--dry-run", action="store_true")
    s.add_argument("--budget", type=int, required=True)
    s.add_argument("--commit")
    s.add_argument("--resume", action="store_true")
    r = sub.add_parser("record")
    for name, kind in (("out", Path), ("tag", str), ("step", str), ("status", str), ("rc", int),
                       ("seconds", float), ("timeout", int), ("log", Path)):
        r.add_argument(name, type=kind)
    r.add_argument("command", nargs="?", default="")
    e = sub.add_parser("entry-points")
    e.add_argument("site", type=Path)
    d = sub.add_parser("render")
    d.add_argument("out", type=Path)
    d.add_argument("tag")
    args = p.parse_args(argv)
    if args.verb == "start":
        print(start(args))
    elif args.verb == "record":
        record(args)
    elif args.verb == "entry-points":
        register_entry_points(args.site)
    else:
        t0 = time.time()
        render(args)
        print(f"rendered into {args.out / 'docs'} in {time.time() - t0:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
