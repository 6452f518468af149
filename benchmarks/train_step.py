"""End-to-end training steps: every model x scenario x precision x backend.

    python -m benchmarks.train_step --tag h100                  # the GPU grid (CUDA)
    python -m benchmarks.train_step --tag cpu --device cpu --layers 2 --width-div 4 --vocab 4096 \
        --batch 2 --seq 63 --steps 0 --warmup 1                 # saved bytes only, on CPU
    python -m benchmarks.train_step --tag fakecuda_tf524 --device fake-cuda   # CUDA's saved bytes, no GPU

A step is forward, backward and an AdamW step over the trainable parameters.
Each cell measures:

* saved activation bytes of one step (``approxbp_fx.measure``). They depend on the
  device (autocast's op lists, the attention kernel, inductor's choices):
  ``--device fake-cuda`` measures CUDA's on any machine (``benchmarks/_fakecuda``;
  needs g++ once), and only them: its cells have no time, throughput or peak;
* on CUDA: peak memory (``torch.cuda.max_memory_allocated``, reset after
  warm-up), the median of ``--steps`` CUDA-synchronised steps, tokens or images
  per second, and compile time (the first step's time less a median step).

Backends are the peers a user could pick instead: eager; inductor default;
inductor with pointwise recompute (``ban_recompute_materialized_backward=False``);
inductor with ``activation_memory_budget=0.5``; the paper's method applied eagerly
by module swaps (``approxbp_fx.eager.swap_modules``); and approxbp.

Results go to ``docs/results/train_step_<tag>.json`` after every cell, replaced
whole (a killed run keeps what it measured; ``--resume`` skips cells already
there; ``--deadline`` starts no cell that would end past it), and
``docs/benchmarks.md`` is rendered from every ``train_step_*.json`` present,
with a PNG chart per tag when matplotlib is installed (the ``bench`` extra).
Caches are off, so every backend pays a cold compile. Exits 1 if a cell failed
with anything but running out of memory.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

from approxbp_fx.measure import saved_activation_bytes
from approxbp_fx.eager import swap_modules

from . import _fakecuda as fakecuda
from ._fakecuda import FAKE_CUDA
from ._models import MODELS, SCENARIOS, apply_scenario
from ._report import ROOT, provenance, replace_file
from .kernels import copy_bandwidth

PRECISIONS = ("bf16", "amp")
BACKENDS = ("eager", "inductor", "inductor_recompute", "inductor_budget0.5", "reference_eager", "approxbp",
            "approxbp_kernels", "approxbp_recompute")
FAKE_NOTE = ("Saved activation bytes measured on fake CUDA (benchmarks/_fakecuda): FakeTensors on device 'cuda' "
             "through the unchanged torch.compile pipeline, inductor's code generation replaced by running the "
             "partitioned graphs on fake tensors. No time, throughput or peak memory is measured.")
# Peers that recompute no matmul: approxbp's peak must beat each of them.
NO_MATMUL_RECOMPUTE = ("eager", "inductor", "inductor_recompute")


def _functorch_patches(backend: str):
    from torch._functorch import config as fc

    if backend == "inductor_recompute":
        return fc.patch(ban_recompute_materialized_backward=False)
    if backend == "inductor_budget0.5":
        return fc.patch(activation_memory_budget=0.5)
    return contextlib.nullcontext()


def _compile(model, backend: str):
    if backend in ("eager", "reference_eager"):
        return model
    if backend == "approxbp":
        return torch.compile(model, backend="approxbp")  # by name: the entry point users rely on
    if backend == "approxbp_kernels":  # our Triton custom ops instead of inductor-generated pack/unpack
        return torch.compile(model, backend="approxbp", options={"act_lowering": "kernels"})
    if backend == "approxbp_recompute":
        return torch.compile(model, backend="approxbp", options={"recompute": "allowed"})
    return torch.compile(model, backend="inductor")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _model(spec, scenario: str, precision: str, args) -> torch.nn.Module:
    """The cell's model, in train mode: bf16 weights, or fp32 weights for autocast."""
    torch.manual_seed(0)
    model = apply_scenario(spec.build(args.layers, args.vocab, args.width_div), spec, scenario)
    return (model if precision == "amp" else model.to(torch.bfloat16)).train()


def _prepare(model, backend: str, row: dict):
    """The module swaps (reference_eager) and the compile the backend needs."""
    if backend == "reference_eager":
        row["swapped"] = swap_modules(model)
    return _compile(model, backend)


def _fake_cuda_cell(spec, scenario: str, precision: str, backend: str, args, batch: int, seq: int) -> dict:
    """Saved bytes only, on fake CUDA (benchmarks/_fakecuda): nothing is timed, nothing peaks."""
    from torch._dynamo.utils import counters

    from ._fakecuda import cell

    amp = precision == "amp"
    row: dict = {"batch": batch, "seq": seq}
    gen = torch.Generator().manual_seed(1)
    counters.clear()
    with _functorch_patches(backend):
        row.update(cell.measure(
            build=lambda: _model(spec, scenario, precision, args),
            prepare=lambda model: _prepare(model, backend, row),
            inputs=lambda model: spec.inputs(model.config, batch, seq, torch.float32 if amp else torch.bfloat16,
                                             torch.device("meta"), gen),
            amp=amp, compiled=backend not in ("eager", "reference_eager")))
    if backend.startswith("approxbp"):
        row["rewritten"] = {k: v for k, v in counters["approxbp"].items() if v}
    return row


def run_cell(model_name: str, scenario: str, precision: str, backend: str, args) -> dict:
    """One cell, measured; raises on failure (the caller records it)."""
    from torch._dynamo.utils import counters

    spec = MODELS[model_name]
    batch = args.batch or spec.batch
    seq = spec.seq if spec.unit == "images" else (args.seq or spec.seq)
    if args.device == FAKE_CUDA:
        return _fake_cuda_cell(spec, scenario, precision, backend, args, batch, seq)
    device = torch.device(args.device)
    # Built where it runs: LLaMA-1B's random init takes seconds a backend on the CPU, and
    # nothing measured depends on the weights' values.
    with torch.device(device) if device.type == "cuda" else contextlib.nullcontext():
        model = _model(spec, scenario, precision, args).to(device)
    amp = precision == "amp"
    row: dict = {"batch": batch, "seq": seq}
    fn = _prepare(model, backend, row)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-5)
    inputs = spec.inputs(model.config, batch, seq, torch.float32 if amp else torch.bfloat16, device,
                         torch.Generator().manual_seed(1))
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)  # noqa: E731

    def step() -> None:
        with autocast():
            loss = fn(**inputs).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    counters.clear()
    with _functorch_patches(backend):
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        first = time.perf_counter() - t0
        for _ in range(args.warmup - 1):
            step()
        with autocast():
            row["saved_bytes"] = saved_activation_bytes(fn, params=model, loss_fn=lambda out: out.loss, **inputs)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if backend.startswith("approxbp"):
            row["rewritten"] = {k: v for k, v in counters["approxbp"].items() if v}
        if args.steps:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                row["static_bytes"] = torch.cuda.memory_allocated(device)  # weights, grads-free, optimiser state
            times = []
            for _ in range(args.steps):
                _sync(device)
                t0 = time.perf_counter()
                step()
                _sync(device)
                times.append(time.perf_counter() - t0)
            row["step_s"] = statistics.median(times)
            row["throughput"] = batch * (1 if spec.unit == "images" else seq) / row["step_s"]
            row["unit"] = f"{spec.unit}/s"
            row["compile_s"] = max(first - row["step_s"], 0.0)
            if device.type == "cuda":
                row["peak_bytes"] = torch.cuda.max_memory_allocated(device)
    return row


def _cell_key(m, s, p, b) -> str:
    return f"{m}|{s}|{p}|{b}"


def _meta(args, argv) -> tuple[dict, str]:
    import peft
    import transformers

    fake = args.device == FAKE_CUDA
    meta, command = provenance("train_step", argv, "cpu" if fake else args.device)
    meta.update(transformers=transformers.__version__, peft=peft.__version__, device=args.device,
                layers=args.layers, vocab=args.vocab, width_div=args.width_div, steps=args.steps,
                warmup=args.warmup, threads=torch.get_num_threads())
    if fake:
        meta.update(machine=f"fake CUDA (H100, sm90) on {meta['machine']}", steps=None, warmup=None, note=FAKE_NOTE)
    elif torch.device(args.device).type == "cuda":
        meta["copy_bandwidth_GBps"] = round(copy_bandwidth(torch.device(args.device), 1 << 28, 20), 1)
    return meta, command


def _run_grid(args, cells: dict, path: Path, meta: dict, commands: list[str]) -> bool:
    """Measure every requested cell not already in ``cells``, saving after each; True if one failed.

    Stops early after ``args.max_cells`` new cells, or before a cell expected to end past
    ``args.deadline``: one as long as the longest of this run so far (so the first starts
    unless the deadline has passed; the caller's timeout stops one that overruns).
    """
    failed, done, longest = False, 0, 0.0
    for m, s, prec, b in itertools.product(args.models, args.scenarios, args.precisions, args.backends):
        key = _cell_key(m, s, prec, b)
        if key in cells and "error" not in cells[key]:
            continue
        if args.max_cells is not None and done >= args.max_cells:
            print(f"stopping: --max-cells {args.max_cells} reached", flush=True)
            break
        if args.deadline is not None and time.time() + longest > args.deadline:
            print(f"stopping before {key}: the deadline is {args.deadline - time.time():.0f} s away, "
                  f"the longest cell so far took {longest:.0f} s", flush=True)
            break
        t_cell = time.time()
        torch._dynamo.reset()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        try:
            row = run_cell(m, s, prec, b, args)
        except torch.OutOfMemoryError:
            row = {"error": "out of memory"}
        except Exception as e:  # noqa: BLE001  (recorded, printed, and the exit code says so)
            traceback.print_exc()
            row = {"error": f"{type(e).__name__}: {e}"[:500]}
            failed = True
        cells[key] = {"model": m, "scenario": s, "precision": prec, "backend": b, **row}
        print(json.dumps(cells[key]), flush=True)
        record = {"meta": meta, "command": commands[-1], "commands": commands, "cells": cells}
        replace_file(path, json.dumps(record, indent=1) + "\n")
        done, longest = done + 1, max(longest, time.time() - t_cell)
    return failed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tag", required=True, help="names the results file, e.g. h100, cpu")
    p.add_argument("--device", default="cuda", help=f"cuda, cpu, or {FAKE_CUDA} (CUDA saved bytes, no GPU needed)")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=SCENARIOS)
    p.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    p.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    p.add_argument("--layers", type=int, default=None, help="override the depth (default: the published one)")
    p.add_argument("--vocab", type=int, default=None, help="override the text models' vocabulary (default: theirs)")
    p.add_argument("--width-div", type=int, default=1, help="divide every width by this (CPU runs; default 1)")
    p.add_argument("--batch", type=int, default=None, help="override every model's batch")
    p.add_argument("--seq", type=int, default=None, help="override the text models' sequence length")
    p.add_argument("--steps", type=int, default=20, help="timed steps per cell (0: saved bytes only)")
    p.add_argument("--warmup", type=int, default=3, help="steps before measuring (the first compiles)")
    p.add_argument("--resume", action="store_true", help="keep cells already in the results file")
    p.add_argument("--deadline", type=float, default=None,
                   help="Unix time: start no cell expected to end after it (benchmarks/gpu_suite.sh sets it)")
    p.add_argument("--max-cells", type=int, default=None, help="measure at most this many new cells")
    p.add_argument("--no-render", action="store_true")
    p.add_argument("--out-dir", type=Path, default=ROOT / "docs", help="results/ and benchmarks.md go here")
    args = p.parse_args(argv)
    if args.warmup < 1:
        p.error("--warmup must be at least 1: the first step compiles")
    if args.device == FAKE_CUDA:
        if not fakecuda.native.active():  # the hooks must load before torch: measure in a child
            return fakecuda.rerun("benchmarks.train_step", sys.argv[1:] if argv is None else list(argv))
        from ._fakecuda import device

        device.install()
    elif torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but no CUDA device; pass --device cpu or fake-cuda (saved bytes only)")

    from torch._functorch import config as fc
    from torch._inductor import config as ic

    path = args.out_dir / "results" / f"train_step_{args.tag}.json"
    meta, command = _meta(args, argv)
    cells: dict[str, dict] = {}
    commands = [command]
    if args.resume and path.exists():
        old = json.loads(path.read_text())
        changed = [k for k in ("device", "torch", "transformers") if old["meta"].get(k) != meta[k]]
        if changed:  # one file, one setting: cells measured under another would be mislabelled
            p.error(f"--resume: {path.name} was measured with another {', '.join(changed)}; use another --tag")
        cells = old["cells"]
        # A resumed run repeats its command: cite each command once, in first-run order.
        commands = list(dict.fromkeys(old.get("commands", [old["command"]]) + commands))
    # Cold compiles for every backend, and no cached graph crossing between backends.
    with ic.patch(fx_graph_cache=False), fc.patch(enable_autograd_cache=False), \
            torch._dynamo.config.patch(cache_size_limit=64):
        failed = _run_grid(args, cells, path, meta, commands)
    if not args.no_render:
        from ._render_train_step import render_all

        render_all(args.out_dir / "results", args.out_dir)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
