"""MS-BP: saved activation bytes and gradient fidelity for norm blocks and whole models.

    python -m benchmarks.norm_saved_bytes     # writes docs/results/norm_saved_bytes.json + docs/norm_saved_bytes.md

Rows: LayerNorm / RMSNorm / Hugging Face LlamaRMSNorm -> trainable Linear, and
2-layer GPT-2 and LLaMA models (real Hugging Face code, random init), with
full fine-tuning and LoRA (PEFT, r=16 on the attention q and v projections), in
bf16 weights and under autocast (bf16 compute, fp32 weights).

Backends: eager, inductor, approxbp (both rules), and approxbp with MS-BP
alone (save_act_codes=False), whose gradients are compared with inductor's
(cosine and relative error over all gradients). Autocast rows also measure
``norm_share_dtype="input"``, the exact-but-larger alternative.
Device-independent: runs on CPU. Needs transformers and peft (the ``hf`` extra).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

import approxbp_fx
from approxbp_fx import ApproxBPConfig, saved_activation_bytes
from approxbp_fx.backend import inductor_with_recompute

from ._render import markdown_table, produced_by
from ._report import ROOT, provenance, write


class NormLinear(nn.Module):
    """norm -> Linear (trainable, or frozen: nothing then saves x̂ for it); the input
    requires grad, as a hidden state would."""

    def __init__(self, norm: nn.Module, d: int, frozen: bool = False):
        super().__init__()
        self.norm, self.fc = norm, nn.Linear(d, d)
        self.fc.requires_grad_(not frozen)

    def forward(self, x):
        return self.fc(self.norm(x))


def _norm_block(kind: str, d: int) -> nn.Module:
    frozen = "frozen" in kind
    if kind.startswith("LayerNorm"):
        return NormLinear(nn.LayerNorm(d), d, frozen)
    if kind.startswith("RMSNorm"):
        return NormLinear(nn.RMSNorm(d), d, frozen)
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    return NormLinear(LlamaRMSNorm(d), d)


def _hf_model(kind: str, d: int, lora: bool) -> nn.Module:
    import transformers

    if kind == "GPT-2 (2 layers)":
        cfg = transformers.GPT2Config(n_layer=2, n_embd=d, n_head=4, vocab_size=1000, n_positions=256)
        model, targets = transformers.GPT2Model(cfg), ["c_attn"]
    else:
        cfg = transformers.LlamaConfig(
            num_hidden_layers=2, hidden_size=d, intermediate_size=int(d * 8 / 3), num_attention_heads=4,
            num_key_value_heads=2, vocab_size=1000, max_position_embeddings=256,
        )
        model, targets = transformers.LlamaModel(cfg), ["q_proj", "v_proj"]
    model.config.use_cache = False
    for m in model.modules():  # same graphs for every backend, apart from our rewrite
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    if lora:
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules=targets))
    return model


NORM_BLOCKS = ("LayerNorm -> Linear", "RMSNorm -> Linear", "LlamaRMSNorm -> Linear",
               "LayerNorm -> frozen Linear", "RMSNorm -> frozen Linear")
MODELS = ("GPT-2 (2 layers)", "LLaMA (2 layers)")


def _grads(model: nn.Module, x: torch.Tensor | None) -> list[torch.Tensor]:
    # Copies: later steps accumulate into .grad in place.
    out = [p.grad.float().flatten().clone() for p in model.parameters() if p.grad is not None]
    if x is not None and x.grad is not None:
        out.append(x.grad.float().flatten().clone())
    return out


def _step(fn, model, args, autocast: bool, weight: torch.Tensor) -> tuple[int, list[torch.Tensor]]:
    """Saved bytes of one step, then the gradients of a fixed random projection of the output."""
    model.zero_grad(set_to_none=True)
    x = args[0] if args[0].is_floating_point() else None

    def loss(out):
        h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out
        return (h.float() * weight).sum()

    if x is not None:
        x.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        nbytes = saved_activation_bytes(fn, *args, params=model, loss_fn=loss)
    return nbytes, _grads(model, x)


def _step_times(fns: dict, model, args, autocast: bool, weight: torch.Tensor, steps: int) -> dict[str, float]:
    """Median seconds of one compiled training step, the backends interleaved step by step
    so that load on the machine hits them alike."""
    import statistics
    import time

    def one(fn):
        model.zero_grad(set_to_none=True)
        for a in args:
            a.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = fn(*args)
            h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out
            loss = (h.float() * weight).sum()
        loss.backward()

    for fn in fns.values():  # compile and warm up
        one(fn)
        one(fn)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(steps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            one(fn)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def _compare(ours: list[torch.Tensor], ref: list[torch.Tensor]) -> tuple[float, float]:
    a, b = torch.cat(ours).double(), torch.cat(ref).double()
    cos = torch.nn.functional.cosine_similarity(a, b, dim=0).item()
    return cos, ((a - b).norm() / b.norm()).item()


def measure(kind: str, scenario: str, precision: str, d: int, tokens: tuple[int, int], steps: int = 0) -> dict:
    torch.manual_seed(0)
    lora = scenario == "LoRA"
    model = _norm_block(kind, d) if kind in NORM_BLOCKS else _hf_model(kind, d, lora)
    autocast = precision == "autocast"
    if not autocast:
        model = model.to(torch.bfloat16)
    dtype = torch.float32 if autocast else torch.bfloat16
    if kind in NORM_BLOCKS:
        args = (torch.randn(*tokens, d, dtype=dtype, requires_grad=True),)
    else:
        args = (torch.randint(0, 1000, tokens),)
    weight = torch.randn(*tokens, d, generator=torch.Generator().manual_seed(1))

    backends = {
        "eager": lambda: model,
        "inductor": lambda: torch.compile(model, backend="inductor"),
        "inductor_recompute": lambda: torch.compile(model, backend=inductor_with_recompute),
        "approxbp": lambda: torch.compile(model, backend=approxbp_fx.backend()),
        "approxbp_ms_only": lambda: torch.compile(model, backend=approxbp_fx.backend(ApproxBPConfig(save_act_codes=False))),
    }
    if autocast:
        backends["approxbp_ms_only_input_dtype"] = lambda: torch.compile(
            model, backend=approxbp_fx.backend(ApproxBPConfig(save_act_codes=False, norm_share_dtype="input"))
        )
    row = {"block": kind, "scenario": scenario, "precision": precision}
    grads = {}
    for name, make in backends.items():
        torch._dynamo.reset()
        row[name], grads[name] = _step(make(), model, args, autocast, weight)
    torch._dynamo.reset()
    row["approxbp_over_inductor"] = round(row["approxbp"] / row["inductor"], 4)
    row["approxbp_over_best_peer"] = round(row["approxbp"] / min(row["inductor"], row["inductor_recompute"]), 4)
    row["ms_only_over_inductor"] = round(row["approxbp_ms_only"] / row["inductor"], 4)
    row["ms_only_grad_cosine"], row["ms_only_grad_rel_err"] = _compare(grads["approxbp_ms_only"], grads["inductor"])
    if steps:
        t = _step_times(
            {"inductor": backends["inductor"](), "approxbp_ms_only": backends["approxbp_ms_only"]()},
            model, args, autocast, weight, steps,
        )
        torch._dynamo.reset()
        row["step_s_inductor"], row["step_s_ms_only"] = t["inductor"], t["approxbp_ms_only"]
        row["ms_only_step_time_ratio"] = round(t["approxbp_ms_only"] / t["inductor"], 3)
    if autocast:
        row["input_dtype_over_inductor"] = round(row["approxbp_ms_only_input_dtype"] / row["inductor"], 4)
        cos, rel = _compare(grads["approxbp_ms_only_input_dtype"], grads["inductor"])
        row["input_dtype_grad_cosine"], row["input_dtype_grad_rel_err"] = cos, rel
    print(row, flush=True)
    return row


# The page's three tables: columns, then one row function each.
_BYTES_COLUMNS = ["block", "scenario", "precision", "eager B", "inductor B", "inductor + recompute B", "approxbp B",
                  "approxbp / inductor", "approxbp / best compiled peer", "MS-BP only / inductor", "MS-BP grad cosine",
                  "MS-BP grad rel. err"]
_SHARE_DTYPE_COLUMNS = ["block", "scenario", '"consumer": B / inductor', "cosine", "rel. err",
                        '"input": B / inductor', "cosine", "rel. err"]
_TIME_COLUMNS = ["block", "scenario", "precision", "inductor ms", "MS-BP only ms", "ratio"]


def _bytes_row(r: dict) -> list[str]:
    return [r["block"], r["scenario"], r["precision"], f"{r['eager']:,}", f"{r['inductor']:,}",
            f"{r['inductor_recompute']:,}", f"{r['approxbp']:,}", f"{r['approxbp_over_inductor']:.3f}",
            f"{r['approxbp_over_best_peer']:.3f}", f"{r['ms_only_over_inductor']:.3f}",
            f"{r['ms_only_grad_cosine']:.6f}", f"{r['ms_only_grad_rel_err']:.1e}"]


def _share_dtype_row(r: dict) -> list[str]:
    return [r["block"], r["scenario"],
            f"{r['ms_only_over_inductor']:.3f}", f"{r['ms_only_grad_cosine']:.6f}", f"{r['ms_only_grad_rel_err']:.1e}",
            f"{r['input_dtype_over_inductor']:.3f}", f"{r['input_dtype_grad_cosine']:.6f}",
            f"{r['input_dtype_grad_rel_err']:.1e}"]


def _time_row(r: dict) -> list[str]:
    return [r["block"], r["scenario"], r["precision"], f"{1e3 * r['step_s_inductor']:.1f}",
            f"{1e3 * r['step_s_ms_only']:.1f}", f"{r['ms_only_step_time_ratio']:.3f}"]


def render(rows: list[dict], meta: dict, command: str) -> str:
    out = [
        "# MS-BP: saved activation bytes of norm blocks and whole models",
        "",
        f"{produced_by(command, meta)}; d = {meta['d']}, `{meta['tokens'][0]}x{meta['tokens'][1]}` tokens. "
        "Raw figures: `docs/results/norm_saved_bytes.json`. Bytes exclude parameters (see `approxbp_fx.measure`).",
        "",
        "*approxbp* runs both rules (Approx-BP for GELU/SiLU, MS-BP for norms); *MS-BP only* sets "
        "`save_act_codes=False`. Gradient cosine and relative error compare MS-BP only with inductor "
        "at the same precision, over every parameter gradient (and the input's, for the norm blocks).",
        "",
        *markdown_table(_BYTES_COLUMNS, "lllrrrrrrrrr", map(_bytes_row, rows)),
    ]
    amp = [r for r in rows if r["precision"] == "autocast"]
    if amp:
        out += [
            "",
            "## Under autocast: which copy to share (`norm_share_dtype`)",
            "",
            'The norm input is fp32, its consumers read bf16. `"consumer"` (the default) shares the bf16 copy, '
            'so the norm backward sees x̂ rounded to bf16; `"input"` shares fp32 x̂: exact, but the consumers '
            "then rebuild their bf16 input from it and the shared tensor is twice as large.",
            "",
            *markdown_table(_SHARE_DTYPE_COLUMNS, "llrrrrrr", map(_share_dtype_row, amp)),
        ]
    timed = [r for r in rows if "step_s_inductor" in r]
    if timed:
        out += [
            "",
            "## CPU step time (MS-BP only against inductor)",
            "",
            f"Median of {meta['steps']} forward+backward steps each, the two backends interleaved step by step, "
            f"{meta['threads']} CPU threads. The machine is shared, so read ratios within ±5% as equal. "
            "GPU timings belong to the performance benchmark.",
            "",
            *markdown_table(_TIME_COLUMNS, "lllrrr", map(_time_row, timed)),
        ]
    return "\n".join(out) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--tokens", type=int, nargs=2, default=(4, 127), help="batch, sequence (match no weight shape)")
    p.add_argument("--steps", type=int, default=20, help="timed CPU steps per backend (0: no timing)")
    p.add_argument("--json", type=Path, default=ROOT / "docs/results/norm_saved_bytes.json")
    p.add_argument("--md", type=Path, default=ROOT / "docs/norm_saved_bytes.md")
    args = p.parse_args(argv)

    cells = [(k, "full") for k in NORM_BLOCKS] + [(m, s) for m in MODELS for s in ("full", "LoRA")]
    rows = [
        measure(kind, scenario, precision, args.d, tuple(args.tokens), args.steps)
        for kind, scenario in cells
        for precision in ("bf16", "autocast")
    ]
    meta, command = provenance("norm_saved_bytes", argv)
    meta.update(d=args.d, tokens=list(args.tokens), steps=args.steps, threads=torch.get_num_threads())
    write(args.json, args.md, {"meta": meta, "command": command, "rows": rows}, render(rows, meta, command))


if __name__ == "__main__":
    main()
