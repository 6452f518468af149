"""The fake-CUDA instrument (benchmarks/_fakecuda): CUDA semantics, not CPU's, and the harness path.

The patches are process-wide and cannot be undone, so everything that needs them
runs in a child process (``benchmarks._fakecuda.rerun``); this process only
checks the SDPA choice rules, which read shapes and strides, and the results.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from benchmarks import fakecuda_validate, train_step
from benchmarks._fakecuda import native, rerun, sdpa

needs_native = pytest.mark.skipif(
    native.compiler() is None and not native.library_path().exists(),
    reason="fake CUDA builds its native hooks (benchmarks/_fakecuda/hooks.cpp) with g++, which is not installed",
)


def _qkv(shape=(2, 4, 64, 16), dtype=torch.bfloat16, kv_heads=None):
    b, h, n, d = shape
    kv = (b, kv_heads or h, n, d)
    return torch.empty(shape, dtype=dtype), torch.empty(kv, dtype=dtype), torch.empty(kv, dtype=dtype)


def test_sdpa_choice_follows_cuda_rules():
    q, k, v = _qkv()
    expanded = torch.ones(2, 1, 64, 1, dtype=torch.bool).expand(2, 1, 64, 64)
    dense = torch.ones(2, 1, 64, 64, dtype=torch.bool)
    assert sdpa.can_use_flash(q, k, v, None, is_causal=True, enable_gqa=False)
    assert not sdpa.can_use_flash(q, k, v, dense, is_causal=False, enable_gqa=False)  # flash takes no mask
    assert sdpa.can_use_efficient(q, k, v, dense, enable_gqa=False)
    # On CUDA the mask's last stride must be 1 (CPU ignores it): the expanded mask goes to math.
    assert not sdpa.can_use_efficient(q, k, v, expanded, enable_gqa=False)
    fq, fk, fv = _qkv(dtype=torch.float32)
    assert not sdpa.can_use_flash(fq, fk, fv, None, is_causal=False, enable_gqa=False)  # flash: fp16/bf16 only
    assert sdpa.can_use_efficient(fq, fk, fv, None, enable_gqa=False)
    gq, gk, gv = _qkv(shape=(2, 8, 64, 16), kv_heads=2)
    assert sdpa.can_use_flash(gq, gk, gv, None, is_causal=True, enable_gqa=True)
    assert not sdpa.can_use_flash(gq, gk, gv, None, is_causal=True, enable_gqa=False)
    odd = torch.empty(2 * 4 * 64 * 16 + 3, dtype=torch.bfloat16)[3:].view(2, 4, 64, 16)  # misaligned data pointer
    assert not sdpa.can_use_efficient(odd, k, v, None, enable_gqa=False)


def test_native_hooks_refuse_to_load_after_torch():
    with pytest.raises(RuntimeError, match="before torch"):
        native.load()


@needs_native
def test_fake_cuda_runs_cuda_attention_not_cpu(tmp_path):
    """An all-True mask expanded from [B, 1, L, 1] has last stride 0: CUDA's fused kernels refuse it
    and the math path saves fp32 probabilities; CPU's flash kernel takes it. A fake device that
    silently ran CPU semantics would save about the same with and without the mask, as CPU does."""
    out = tmp_path / "probe.json"
    assert rerun("tests.fakecuda_probe", [str(out)]) == 0
    r = json.loads(out.read_text())
    probs = r["probs_fp32"]
    assert r["cpu"]["mask"] - r["cpu"]["none"] < probs / 2
    for path in ("cuda_eager", "cuda_compiled"):
        (masked, masked_kernels), (plain, plain_kernels) = r[path]["mask"], r[path]["none"]
        assert (masked_kernels, plain_kernels) == (["math"], ["flash"]), path
        assert masked - plain >= probs, path
        assert plain == pytest.approx(r["cpu"]["none"], abs=64), path  # flash saves what CPU's flash saves


@needs_native
def test_train_step_fake_cuda_cells_end_to_end(tmp_path):
    rc = train_step.main([
        "--tag", "t", "--device", "fake-cuda", "--models", "vit-b16", "llama-1b", "--scenarios", "lora_qv",
        "--precisions", "amp", "--backends", "eager", "inductor", "--layers", "1", "--width-div", "4",
        "--vocab", "1024", "--batch", "2", "--seq", "64", "--out-dir", str(tmp_path), "--no-render",
    ])
    assert rc == 0
    data = json.loads((tmp_path / "results" / "train_step_t.json").read_text())
    meta, cells = data["meta"], data["cells"]
    assert meta["device"] == "fake-cuda" and "fake CUDA" in meta["machine"] and "fake CUDA" in meta["note"]
    assert meta["transformers"] == transformers.__version__
    for c in cells.values():
        assert c["saved_bytes"] > 0
        assert not {"step_s", "peak_bytes", "throughput", "compile_s"} & c.keys()  # bytes only, nothing invented
    vit = {b: cells[f"vit-b16|lora_qv|amp|{b}"] for b in ("eager", "inductor")}
    llama = {b: cells[f"llama-1b|lora_qv|amp|{b}"] for b in ("eager", "inductor")}
    # Attention as on the H100: ViT passes no mask (transformers 5.24), so flash; LLaMA eager runs
    # flash with GQA, while under compile transformers materialises its causal mask (it cannot
    # check for packed sequences while tracing), which rules flash out.
    assert vit["eager"]["sdpa"] == vit["inductor"]["sdpa"] == ["flash"]
    assert (llama["eager"]["sdpa"], llama["inductor"]["sdpa"]) == (["flash"], ["efficient"])
    # One ViT layer at hidden 192, batch 2: eager saves 2.09 MiB (the same run on 2026-11-26).
    assert vit["eager"]["saved_bytes"] == pytest.approx(2_194_804, rel=1e-3)
    assert vit["inductor"]["saved_bytes"] < vit["eager"]["saved_bytes"]


@needs_native
def test_gpt2_lora_all_under_autocast_rewrites_its_gelus_on_cuda(tmp_path):
    # On CUDA autocast GPT-2's GELU runs in fp32 and backward reads its output
    # only through the bf16 cast LoRA A takes. The prediction counted the fp32
    # output, saw no gain, and kept every GELU exact: 528 MB more than the
    # grid's figure at published size. One layer here: codes save 16% of it.
    rc = train_step.main([
        "--tag", "g", "--device", "fake-cuda", "--models", "gpt2-124m", "--scenarios", "lora_all",
        "--precisions", "amp", "--backends", "approxbp", "--layers", "1", "--width-div", "4",
        "--vocab", "512", "--batch", "2", "--seq", "64", "--out-dir", str(tmp_path), "--no-render",
    ])
    assert rc == 0
    (cell,) = json.loads((tmp_path / "results" / "train_step_g.json").read_text())["cells"].values()
    assert cell["rewritten"].get("save_act_codes") == 1, cell["rewritten"]
    assert cell["saved_bytes"] == 871_981  # 1_044_012 with the GELU kept exact (2026-11-26)


def test_validation_compares_every_reference_cell():
    ref = {"cells": {"m|s|p|a": {"batch": 8, "seq": 16, "saved_bytes": 1000}, "m|s|p|b": {"batch": 8, "seq": 16,
           "saved_bytes": 2000}, "m|s|p|c": {"batch": 8, "seq": 16, "saved_bytes": 3000}, "m|s|p|oom": {"error": "x"}}}
    fake = {"cells": {"m|s|p|a": {"batch": 8, "seq": 16, "saved_bytes": 1005},
                      "m|s|p|b": {"batch": 4, "seq": 16, "saved_bytes": 1000}}}
    rows = fakecuda_validate.compare(ref, fake)
    assert [r["cell"] for r in rows] == ["m / s / p / a", "m / s / p / b", "m / s / p / c"]
    assert rows[0]["ratio"] == pytest.approx(1.005)
    assert rows[1]["ratio"] is None and "batch" in rows[1]["problem"]
    assert rows[2]["problem"] == "not measured"
    assert [r["cell"] for r in fakecuda_validate.failures(rows, 0.01)] == ["m / s / p / b", "m / s / p / c"]
    assert fakecuda_validate.failures(rows[:1], 0.001) == rows[:1]


@needs_native
def test_fused_attention_keeps_compiled_cuda_attention_off_the_math_path(tmp_path):
    """approxbp_fx/passes/fused_attention.py on fake CUDA: without it (inductor, or the pass
    switched off) the compiled attention runs the math path and saves fp32 probabilities."""
    out = tmp_path / "attention.json"
    assert rerun("tests.fakecuda_attention_probe", [str(out)]) == 0
    r = json.loads(out.read_text())
    probs = r["probs_fp32"]
    for name, fused in (("all_true", "flash"), ("padding", "efficient")):
        (theirs, their_kernels), (ours, our_kernels), (off, off_kernels) = (
            r[name][b] for b in ("inductor", "approxbp", "approxbp_off")
        )
        # Ours may list "math" too: dynamo traces the original graph, mask and all, before the pass.
        assert their_kernels == off_kernels == ["math"] and fused in our_kernels, (name, our_kernels)
        assert off - ours >= probs * 3 // 4 and theirs - ours >= probs * 3 // 4, (name, theirs, off, ours)


def test_targets_flag_each_bar_a_cell_misses():
    from benchmarks import fakecuda_targets as targets

    def cell(key, **bytes_):
        return {f"{key}|{b}": {"saved_bytes": v} for b, v in bytes_.items()}

    cells = {
        **cell("vit-b16|lora_qv|amp", eager=1000, inductor=900, inductor_recompute=800, approxbp=480),  # all met
        **cell("gpt2-124m|lora_qv|bf16", eager=1000, inductor=700, inductor_recompute=600, approxbp=500),  # 0.833 > 0.80
        **cell("llama-1b|full|amp", eager=1000, inductor=700, inductor_recompute=600, approxbp=600),  # not strictly below
        **cell("vit-b16|full|bf16", eager=1000, inductor=700, inductor_recompute=600),  # approxbp missing
    }
    missed = {r["cell"]: r["missed"] for r in targets.check(cells)}
    assert missed == {
        "vit-b16|lora_qv|amp": [],
        "gpt2-124m|lora_qv|bf16": ["<= 0.80x best peer"],
        "llama-1b|full|amp": ["< best peer"],
        "vit-b16|full|bf16": ["not measured"],
    }
    cells["vit-b16|lora_qv|amp|approxbp"]["saved_bytes"] = 520  # 0.65x the peer, but 0.52x eager
    assert {r["cell"]: r["missed"] for r in targets.check(cells)}["vit-b16|lora_qv|amp"] == ["<= 0.50x eager"]
