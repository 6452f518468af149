"""The benchmark scripts still run and write what docs/ is rendered from.

Not timed tests: tiny shapes, CPU, and assertions on the structure and the
one device-independent figure (saved bytes), never on speed.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest

from benchmarks import compile_time, forward_fuzz, fuzz, kernels, norm_saved_bytes, saved_bytes, train_step
from benchmarks._failures import failure_text, group, minimise
from benchmarks._render import markdown_table

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_train_step_harness_writes_results_and_renders(tmp_path):
    pytest.importorskip("peft")
    rc = train_step.main([
        "--tag", "t", "--device", "cpu", "--models", "gpt2-124m", "--scenarios", "lora_qv",
        "--precisions", "bf16", "--backends", "eager", "inductor", "reference_eager", "approxbp",
        "--layers", "1", "--vocab", "512", "--batch", "2", "--seq", "15", "--steps", "1", "--warmup", "1",
        "--out-dir", str(tmp_path),
    ])
    assert rc == 0
    cells = json.loads((tmp_path / "results" / "train_step_t.json").read_text())["cells"]
    by = {c["backend"]: c for c in cells.values()}
    assert set(by) == {"eager", "inductor", "reference_eager", "approxbp"}
    assert all("error" not in c for c in by.values())
    assert by["approxbp"]["saved_bytes"] < by["inductor"]["saved_bytes"] <= by["eager"]["saved_bytes"]
    assert by["approxbp"]["rewritten"]["save_act_codes"] == 1
    assert by["reference_eager"]["swapped"] == {"layer_norm": 3, "gelu_tanh": 1}
    assert by["reference_eager"]["saved_bytes"] < by["eager"]["saved_bytes"]
    md = (tmp_path / "benchmarks.md").read_text()
    assert "| gpt2-124m | lora_qv | bf16 |" in md and "Saved activation bytes" in md


def test_kernel_microbenchmark_runs_on_cpu(tmp_path):
    assert kernels.main(["--tag", "t", "--device", "cpu", "--sizes", "8192", "--iters", "1", "--out-dir", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "results" / "kernels_t.json").read_text())["rows"]
    assert {r["kernel"] for r in rows} == {"act_pack", "code_grad", "layer_norm_bwd", "rms_norm_bwd"}
    assert all(r["s"] > 0 and r["bytes"] > 0 for r in rows)
    # Both act lowerings are timed, each against inductor's own kernel.
    impls = {(r["kernel"], r["impl"]) for r in rows}
    for kernel in ("act_pack", "code_grad"):
        assert {(kernel, "approxbp kernels (Triton op)"), (kernel, "approxbp lowered (inductor)")} <= impls
    assert "| act_pack | approxbp lowered (inductor) |" in (tmp_path / "kernels.md").read_text()


def test_fuzz_script_runs_and_reports(tmp_path):
    out = tmp_path / "fuzz.json"
    rc = fuzz.main(["--examples", "2", "--seed", "1", "--tier", "aot_eager", "--max-blocks", "1",
                    "--json", str(out), "--md", str(tmp_path / "fuzz.md")])
    assert rc == 0
    payload = json.loads(out.read_text())
    assert payload["summary"]["examples"] == len(payload["examples"]) == 2
    assert payload["summary"]["fail"] == 0 and payload["failures"] == []
    assert payload["meta"]["tier"] == "aot_eager" and "torch" in payload["meta"]
    assert "| aot_eager | 2 |" in (tmp_path / "fuzz.md").read_text()


def test_forward_fuzz_script_runs_and_renders_its_own_section(tmp_path):
    md, out = tmp_path / "fuzz.md", tmp_path / "forward_fuzz.json"
    gradient = "<!-- begin gradient fuzz (generated) -->\n# the gradient fuzzer's page\n<!-- end gradient fuzz -->\n"
    md.write_text(gradient)
    args = ["--examples", "1", "--seed", "0", "--json", str(out), "--md", str(md)]
    for _ in range(2):  # the second run replaces its section rather than adding one
        assert forward_fuzz.main(args) == 0
    payload = json.loads(out.read_text())
    assert payload["summary"]["examples"] == len(payload["examples"]) == 1
    assert payload["summary"]["ok"] == 1 and payload["failures"] == []
    text = md.read_text()
    assert text.startswith(gradient)
    assert text.count("## Forward equivalence") == 1 and "| 1 | 1 | 0 | 0 | 0 |" in text


def test_forward_fuzz_describes_and_shrinks_specs():
    Spec = forward_fuzz.ForwardSpec
    spec = Spec(chain=(("clamp", -10.0, 10.0), ("where", 0.0, (("act", "F.gelu"),), ())), fc2="frozen",
                specials=((3, math.inf), (1000, math.nan)))
    h = "fc1(x).clamp(-10.0, 10.0)"
    expected = f"frozen_fc2(where({h} > 0.0, F.gelu({h}), {h})) in float32, |x| ~ 4.0; x holds inf, nan"
    assert forward_fuzz.describe(spec) == expected
    candidates = list(forward_fuzz._simpler(spec))
    assert Spec(chain=(("clamp", -10.0, 10.0), ("act", "F.gelu")), fc2="frozen", specials=spec.specials) in candidates
    assert forward_fuzz.spec_from_repr(repr(spec)) == spec
    # A smaller input drops the specials that no longer fit (index 1000 of 2*33*16), so every step builds.
    assert dataclasses.replace(spec, tokens=(1, 8), specials=((3, math.inf),)) in candidates
    for cand in candidates:
        cand.build()


def test_markdown_table_aligns_each_column_and_refuses_a_ragged_row():
    rows = [["GELU MLP", "yes", "1,024"], ["SwiGLU", "**no**", 7]]
    assert markdown_table(["block", "parity", "bytes"], "lcr", rows) == [
        "| block | parity | bytes |",
        "|---|:-:|---:|",
        "| GELU MLP | yes | 1,024 |",
        "| SwiGLU | **no** | 7 |",
    ]
    with pytest.raises(ValueError, match="2 cells, the header 3"):
        markdown_table(["block", "parity", "bytes"], "lcr", [["GELU MLP", "yes"]])


@pytest.mark.parametrize("script", [saved_bytes, norm_saved_bytes], ids=lambda m: m.__name__)
def test_committed_page_is_what_its_committed_json_renders_to(script):
    # Every figure on these pages comes from the JSON: re-rendering it must give the page byte for byte.
    name = script.__name__.rpartition(".")[2]
    data = json.loads((DOCS / "results" / f"{name}.json").read_text())
    assert script.render(data["rows"], data["meta"], data["command"]) == (DOCS / f"{name}.md").read_text()


def test_compile_time_section_is_what_its_committed_json_renders_to():
    data = json.loads((DOCS / "results" / "compile_time.json").read_text())
    page = (DOCS / "performance.md").read_text()
    section = page.split("<!-- begin compile time (generated) -->\n", 1)[1].split("<!-- end compile time -->", 1)[0]
    assert compile_time.render(data) == section.rstrip("\n")
    # The ratios quoted are the medians of the per-round ratios, in each kernel cache.
    assert data["summary"] == compile_time._summary(data["rounds"])
    assert set(data["summary"]) == set(compile_time.CACHES)


def test_failures_group_by_signature_and_shrink_to_the_smallest_spec_failing_alike():
    rows = [{"status": "ok", "spec": "1"}]
    rows += [{"status": "fail", "spec": spec, "detail": failure_text(AssertionError(msg))}
             for spec, msg in [("40", "too big: 40 elements"), ("9", "too big: 9 elements"), ("3", "odd (3)")]]
    failures = group(rows)
    # Numbers are blanked and the message is cut at the details, so 40 and 9 are one bug.
    assert list(failures) == ["AssertionError: too big", "AssertionError: odd"]
    assert failures["AssertionError: too big"] | {"detail": None} == {
        "signature": "AssertionError: too big", "count": 2, "first": "40", "detail": None}

    def attempt(n: int):
        return ("fail", failure_text(AssertionError(f"too big: {n}"))) if n >= 5 else ("ok", {})

    # The biggest steps come first; a candidate that passes (or fails otherwise) is skipped.
    small, tries = minimise(40, "AssertionError: too big", lambda n: [n // 2, n - 1], attempt, budget_s=60)
    assert small == 5 and tries == 5  # 40 -> 20 -> 10 -> 5, then 2 and 4 pass
