"""Compile time of approxbp against inductor's, on CPU: what the partitioner trials cost.

    python -m benchmarks.compile_time --rounds 5      # docs/results/compile_time.json + a section of docs/performance.md

A 4-layer GPT-2 (published width, bf16, batch 2 x 128 tokens), one training
step (forward and backward) per fresh process, with inductor's FX graph cache
and AOTAutograd's cache off, so every step traces, partitions, lowers and
generates code from scratch. The compile time is the first step's time less
the second's. Two kernel caches, each process in one of them:

* ``cold``: an empty inductor cache directory per process, so every C++
  kernel is compiled too: no cache at all, what a first compile costs;
* ``warm``: one directory for the whole run, filled by an untimed compile of
  every backend first, so kernels whose source was seen before are loaded,
  not compiled. Nearly every kernel is then found, and the figure is the graph
  work alone: partitioning, lowering, scheduling, code generation. That is
  where approxbp's extra work lies, so this is the stricter ratio.

Backends run interleaved (inductor, approxbp, approxbp with recompute banned,
then again, in each setting), so a drift in the machine's speed hits them
alike; the ratio is taken round by round, and the medians are quoted.

The figure compared is CPU time (user + system, of the process and the C++
compilers it runs; inductor compiles in-process, ``compile_threads=1``, so
every compile is counted): on a shared machine, wall time also measures the
neighbours (ratios of 0.7x to 2.4x within one run), CPU time mostly does not.
Wall time is recorded too, and so is the CPU time spent partitioning (inductor's
``partition_fn``: its joint-graph passes and the partitioner, ours included),
which is the part of the difference approxbp's trials account for.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ._render import markdown_table, produced_by
from ._report import ROOT, provenance, write_section

BACKENDS = {
    "inductor": None,
    "approxbp": {},  # the default config: recompute="auto", a cut-only partition per mode, then a trial
    "approxbp_banned": {"recompute": "banned"},
}


def one_step(backend: str) -> dict:
    """In this (fresh) process: compile and run two training steps; seconds of each."""
    import torch
    from torch._functorch import config as functorch_config
    from torch._inductor import config as inductor_config

    from ._models import MODELS

    functorch_config.enable_autograd_cache = False
    inductor_config.fx_graph_cache = False
    inductor_config.compile_threads = 1  # no worker pool: its CPU time would escape getrusage
    spec = MODELS["gpt2-124m"]
    torch.manual_seed(0)
    model = spec.build(4, None, 1).bfloat16()
    inputs = spec.inputs(model.config, 2, 128, torch.bfloat16, torch.device("cpu"), torch.Generator().manual_seed(0))
    options = BACKENDS[backend]
    fn = torch.compile(model, backend="inductor") if options is None else torch.compile(
        model, backend="approxbp", options=options
    )
    partition_s = _time_partitions()
    wall, cpu = [], []
    for _ in range(2):
        t0, c0 = time.perf_counter(), _cpu_s()
        fn(**inputs).loss.backward()
        wall.append(time.perf_counter() - t0)
        cpu.append(_cpu_s() - c0)
    return {"first_s": wall[0], "step_s": wall[1], "compile_s": wall[0] - wall[1],
            "first_cpu_s": cpu[0], "step_cpu_s": cpu[1], "compile_cpu_s": cpu[0] - cpu[1],
            "partition_cpu_s": partition_s[0]}


def _time_partitions() -> list[float]:
    """A one-element list that accumulates the process CPU seconds spent in inductor's partition_fn."""
    from torch._inductor import compile_fx

    total, real = [0.0], compile_fx.partition_fn

    def timed(*args, **kwargs):
        t0 = time.process_time()
        try:
            return real(*args, **kwargs)
        finally:
            total[0] += time.process_time() - t0

    compile_fx.partition_fn = timed  # looked up at call time by compile_fx
    return total


def _cpu_s() -> float:
    """CPU seconds of this process and its finished children (the C++ compiler runs)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


CACHES = ("cold", "warm")


def _measure(backend: str, cache_dir: str) -> dict:
    code = f"import json; from benchmarks.compile_time import one_step; print(json.dumps(one_step({backend!r})))"
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache_dir}
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    if run.returncode != 0:
        raise RuntimeError(f"{backend}: {run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def _round(warm_dir: str) -> dict:
    """Every backend once in each kernel cache (see the module docstring)."""
    out = {"warm": {b: _measure(b, warm_dir) for b in BACKENDS}, "cold": {}}
    for b in BACKENDS:
        with tempfile.TemporaryDirectory(prefix="compile_time_cold_") as cold_dir:
            out["cold"][b] = _measure(b, cold_dir)
    return out


def _summary(rounds: list[dict]) -> dict:
    out = {}
    for cache in CACHES:
        runs = [r[cache] for r in rounds]
        for b in BACKENDS:
            s = out.setdefault(cache, {})[b] = {
                f"{f}_median": statistics.median(r[b][f] for r in runs) for f in ("compile_cpu_s", "compile_s", "partition_cpu_s")
            }
            if b != "inductor":
                for f in ("compile_cpu_s", "compile_s"):
                    ratios = [r[b][f] / r["inductor"][f] for r in runs]
                    s[f"{f}_ratio_median"] = statistics.median(ratios)
                    s[f"{f}_ratio_min_max"] = [min(ratios), max(ratios)]
    return out


def _ratio(s: dict, f: str) -> list[str]:
    if f"{f}_ratio_median" not in s:
        return ["1", ""]
    return [f"{s[f + '_ratio_median']:.3f}", "{:.3f} - {:.3f}".format(*s[f + "_ratio_min_max"])]


def render(data: dict) -> str:
    rows = [[cache, b, f"{s['compile_cpu_s_median']:.2f}", *_ratio(s, "compile_cpu_s"), f"{s['partition_cpu_s_median']:.2f}",
             f"{s['compile_s_median']:.2f}", *_ratio(s, "compile_s")]
            for cache, by_backend in data["summary"].items() for b, s in by_backend.items()]
    return "\n".join([
        "## Compile time on CPU (4-layer GPT-2, bf16, caches off)",
        "",
        produced_by(data["command"], data["meta"]) + ". Raw results: `docs/results/compile_time.json`. "
        "CPU seconds are the figure compared (the script's docstring says why); wall seconds on a shared machine are noisy. "
        "Kernel cache `cold`: every C++ kernel compiled (no cache at all); `warm`: kernels seen before are loaded, "
        "so the figure is the graph work alone.",
        "",
        *markdown_table(["kernel cache", "backend", "compile CPU s (median)", "/ inductor (median of rounds)", "(min - max)",
                         "of which partitioning", "compile wall s (median)", "/ inductor (median)", "(min - max)"],
                        "llrrrrrrr", rows),
    ])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", type=Path, default=ROOT / "docs/results/compile_time.json")
    p.add_argument("--md", type=Path, default=ROOT / "docs/performance.md")
    args = p.parse_args(argv)
    meta, command = provenance("compile_time", argv)
    rounds = []
    with tempfile.TemporaryDirectory(prefix="compile_time_warm_") as warm_dir:
        for b in BACKENDS:  # fill the warm cache: untimed
            _measure(b, warm_dir)
        for i in range(args.rounds):
            rounds.append(_round(warm_dir))
            print(f"round {i + 1}: " + "; ".join(
                f"{c} " + ", ".join(f"{b} {r['compile_cpu_s']:.2f}s" for b, r in rounds[-1][c].items()) for c in CACHES
            ), flush=True)
    data = {"meta": meta, "command": command, "rounds": rounds, "summary": _summary(rounds)}
    write_section(args.json, args.md, data, "compile time", render(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
