"""benchmarks/gpu_suite.sh: its order, its budget, its record and the pages it renders, on the CPU.

The fast tests run the script with no time left (every step skipped, the pages
still rendered) and render committed GPU JSON as if a run had returned it; the
full dry run (tiny models through every step) is ``slow``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import _gpu_suite, train_step

ROOT = Path(__file__).resolve().parent.parent
STEPS = ["pytest", "paper", "gpt2", "llama", "kernels", "grid"]
CORE = {"eager", "inductor", "inductor_recompute", "approxbp"}
# What the device tool returns from $OUT: at most 8 files, none more than 2 folders down.
DEVICE_MAX_FILES, DEVICE_MAX_DEPTH = 8, 2


def _suite(out: Path, *args: str, timeout: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable)
    return subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), "--dry-run", *args, str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _returned_files(out: Path) -> list[Path]:
    files = [p.relative_to(out) for p in out.rglob("*") if p.is_file()]
    assert len(files) <= DEVICE_MAX_FILES, files
    assert all(len(f.parts) - 1 <= DEVICE_MAX_DEPTH for f in files), files
    return files


def _pages() -> dict[str, str]:
    return {p.name: p.read_text() for p in (ROOT / "docs").glob("*.md")}


def test_with_no_time_left_every_step_is_skipped_in_order_and_the_pages_still_render(tmp_path):
    before = _pages()
    run = _suite(tmp_path, "--budget", "0", timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    record = json.loads((tmp_path / "docs" / "results" / "gpu_suite_dryrun.json").read_text())
    assert [s["step"] for s in record["steps"]] == STEPS
    assert {s["status"] for s in record["steps"]} == {"skipped: no time left"}
    meta = record["meta"]
    for key in ("torch", "triton", "transformers", "peft", "machine", "source_sha256"):
        assert meta[key], key
    assert meta["git_commit"] or meta["source_sha256"]
    performance = (tmp_path / "docs" / "performance.md").read_text()
    assert "<!-- begin gpu suite (generated) -->" in performance
    assert "| pytest | skipped: no time left | 0 | 0 |" in performance
    assert (tmp_path / "docs" / "benchmarks.md").read_text().startswith("# End-to-end benchmarks")
    _returned_files(tmp_path)
    assert _pages() == before  # rendered into OUT only: the checkout is untouched


def test_render_of_returned_gpu_json(tmp_path):
    """A run's JSON (here the committed H100 figures under another tag) becomes the three pages."""
    results = tmp_path / "docs" / "results"
    results.mkdir(parents=True)
    shutil.copyfile(ROOT / "docs" / "results" / "train_step_h100.json", results / "train_step_t.json")
    kernels = json.loads((ROOT / "docs" / "results" / "kernels_h100.json").read_text())
    kernels["meta"]["tag"] = "t"
    (results / "kernels_t.json").write_text(json.dumps(kernels))
    assert _gpu_suite.main(["start", str(tmp_path), "--tag", "t", "--budget", "540", "--commit", "abc123"]) == 0
    log = tmp_path / "llama.log"
    log.write_text("compiling...\n" * 1000 + "killed at its limit\n")
    for step, status, rc in (("paper", "ok", 0), ("llama", "timed out", 124), ("grid", "skipped: no time left", 0)):
        _gpu_suite.main(["record", str(tmp_path), "t", step, status, str(rc), "12.5", "270", str(log), "cmd"])
    _gpu_suite.main(["render", str(tmp_path), "t"])

    record = json.loads((results / "gpu_suite_t.json").read_text())
    assert record["meta"]["git_commit"] == "abc123"
    paper, llama, _ = record["steps"]
    assert "log_tail" not in paper and llama["log_tail"].endswith("killed at its limit\n")
    assert len(llama["log_tail"]) == _gpu_suite.LOG_TAIL
    docs = tmp_path / "docs"
    performance = (docs / "performance.md").read_text()
    assert "| llama | timed out | 12 | 270 |" in performance
    # The headline: the paper's cell, one row per backend, peak and step time from the JSON.
    assert "**vit-b16 / lora_qv / amp**, batch 64:" in performance
    assert "| eager | 3,121.5 | 3,882 | 37.5 | 1,706 | 1.7 |" in performance
    # Every run's section in benchmarks.md: the checkout's runs, and this one.
    bench = (docs / "benchmarks.md").read_text()
    assert "## Run `t`: NVIDIA H100 80GB HBM3" in bench and "## Run `fakecuda_tf524`" in bench
    assert "docs/results/kernels_t.json" in (docs / "kernels.md").read_text()
    files = _returned_files(tmp_path)
    pytest.importorskip("matplotlib")
    assert Path("docs/images/train_step_t.png") in files


def test_default_tag_and_pytest_summary(tmp_path):
    assert _gpu_suite.default_tag("NVIDIA H100 80GB HBM3") == "h100_suite"
    assert _gpu_suite.default_tag("NVIDIA H200") == "h200_suite"
    assert _gpu_suite.default_tag("NVIDIA A100-SXM4-80GB") == "a100_suite"
    assert _gpu_suite.default_tag(None) == "gpu_suite"
    xml = tmp_path / "j.xml"
    xml.write_text('<testsuites><testsuite tests="4" failures="1" errors="0" skipped="1" time="3.25">'
                   '<testcase classname="t.A" name="ok"/><testcase classname="t.A" name="bad"><failure/></testcase>'
                   '</testsuite></testsuites>')
    assert _gpu_suite.pytest_summary(xml) == {"tests": 4, "failures": 1, "errors": 0, "skipped": 1, "passed": 2,
                                              "time_s": 3.2, "failed_tests": ["t.A::bad"]}
    assert _gpu_suite.pytest_summary(tmp_path / "none.xml") is None


def test_entry_point_registered_without_installing(tmp_path):
    # The GPU machines have no approxbp-fx installed: the suite puts this dist-info on PYTHONPATH.
    # Here it is installed, so hide it as there: -S leaves site-packages off sys.path, and the
    # cwd (sys.path[0]) is not a checkout, whose pip-made egg-info would be found first.
    info = _gpu_suite.register_entry_points(tmp_path)
    code = ("from importlib.metadata import entry_points as e; "
            "print([p.value for p in e(group='torch_dynamo_backends', name='approxbp')])")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    out = subprocess.run([sys.executable, "-S", "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "['approxbp_fx.backend:approxbp']"
    assert "torch.backends" not in (info / "entry_points.txt").read_text()


def test_train_step_stops_at_the_deadline_and_after_max_cells(tmp_path):
    pytest.importorskip("peft")
    common = ["--tag", "t", "--device", "cpu", "--models", "gpt2-124m", "--scenarios", "lora_qv",
              "--precisions", "bf16", "--backends", "eager", "reference_eager", "--layers", "1", "--vocab", "512",
              "--batch", "2", "--seq", "15", "--steps", "1", "--warmup", "1", "--out-dir", str(tmp_path),
              "--no-render", "--resume"]
    path = tmp_path / "results" / "train_step_t.json"
    assert train_step.main(common + ["--deadline", str(time.time() - 1)]) == 0
    assert not path.exists()  # past the deadline: no cell starts
    assert train_step.main(common + ["--max-cells", "1"]) == 0
    assert [c["backend"] for c in json.loads(path.read_text())["cells"].values()] == ["eager"]
    assert train_step.main(common) == 0  # --resume: only the cell still missing
    data = json.loads(path.read_text())
    assert [c["backend"] for c in data["cells"].values()] == ["eager", "reference_eager"]
    assert len(data["commands"]) == 2 and not list(path.parent.glob("*.tmp"))


@pytest.mark.slow
def test_dry_run_measures_every_step_on_tiny_models(tmp_path):
    run = _suite(tmp_path, "--budget", "1500", timeout=1800)
    assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-5000:]
    results = tmp_path / "docs" / "results"
    record = json.loads((results / "gpu_suite_dryrun.json").read_text())
    assert [(s["step"], s["status"]) for s in record["steps"]] == [(s, "ok") for s in STEPS]
    assert record["steps"][0]["pytest"]["failures"] == 0
    cells = json.loads((results / "train_step_dryrun.json").read_text())["cells"].values()
    for model, scenario, precision in _gpu_suite.PRIORITY_CELLS:
        ran = {c["backend"] for c in cells if (c["model"], c["scenario"], c["precision"]) == (model, scenario, precision)}
        assert CORE <= ran, (model, ran)
    assert all("error" not in c and c["step_s"] > 0 for c in cells)
    assert len(cells) == 3 * len(CORE) + 2  # the grid step stops after --max-cells 2 in a dry run
    kernels = {r["kernel"] for r in json.loads((results / "kernels_dryrun.json").read_text())["rows"]}
    assert kernels == {"act_pack", "code_grad", "layer_norm_bwd", "rms_norm_bwd"}
    files = _returned_files(tmp_path)
    for f in ("benchmarks.md", "kernels.md", "performance.md", "results/gpu_suite_dryrun_pytest.xml"):
        assert Path("docs", f) in files, f
    assert "**llama-1b / lora_qv / bf16**" in (tmp_path / "docs" / "performance.md").read_text()
