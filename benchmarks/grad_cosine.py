"""Whole-model gradient cosine, approxbp against exact, per table family, on several model families.

    python -m benchmarks.grad_cosine --threads 1                     # every model, 3 seeds, 2 bits
    python -m benchmarks.grad_cosine --models bert vit --bits 2 3

For each model (small Hugging Face configs at random init, plus the pretrained
MiniLM of the fidelity tasks), fp32 and dropout off (``eval()``), each arm is
compiled once: ``backend="inductor"`` (exact) and approxbp at each ``--bits``
with each table family (ApproxBPConfig.table).  Every seed loads its own
initial weights (pretrained MiniLM: its weights plus a seeded classifier head)
and its own inputs into the compiled modules; one forward+backward per arm
gives the gradients of every parameter, flattened into one float64 vector, and
the figure is the cosine of approxbp's vector with inductor's.

It also records, from an eager forward per seed, the inputs of every rewritable
activation: their mean and standard deviation, and the per-element cosine
``E[h'(x) s(x)] / sqrt(E[h'^2] E[s^2])`` of each family's step derivative ``s``
over them (what the table families are fitted to, measured where the inputs fall).

Writes docs/results/grad_cosine.json and docs/grad_cosine.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

import approxbp_fx
from approxbp_fx import ApproxBPConfig
from approxbp_fx.activations import exact_derivative
from approxbp_fx.codes import step_derivative
from approxbp_fx.coefficients import TABLES, table
from approxbp_fx.eager import _activation_name

from ._grad_cosine_models import MODELS, Bench
from ._render import markdown_table
from ._report import ROOT, provenance

EXACT = "inductor"


def arm_name(bits: int, family: str) -> str:
    return f"approxbp_b{bits}_{family}"


def flat_grad(model: nn.Module, fn, inputs: dict, loss) -> torch.Tensor:
    """One forward+backward of ``fn``; every parameter's gradient, flattened, float64."""
    model.zero_grad(set_to_none=True)
    loss(fn(**inputs)).backward()
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).double().flatten()
                      for p in model.parameters() if p.requires_grad])


def preactivations(bench: Bench, inputs: dict, families: list[str], bits: list[int]) -> dict:
    """Per activation kind: mean, std and per-element cosines of each table over its inputs (eager)."""
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for m in bench.model.modules():
        kind = _activation_name(m)
        if kind is not None:
            hooks.append(m.register_forward_pre_hook(lambda _m, args, kind=kind: seen.setdefault(kind, []).append(
                args[0].detach().double().flatten())))
    try:
        with torch.no_grad():
            bench.model(**inputs)
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for kind, xs in seen.items():
        x = torch.cat(xs)
        d = exact_derivative(kind, x)
        row = {"n": x.numel(), "mean": x.mean().item(), "std": x.std().item()}
        for b in bits:
            for fam in families:
                s = step_derivative(x.float(), table(kind, b, fam)).double()
                row[arm_name(b, fam)] = ((d * s).sum() / (d.norm() * s.norm())).item()
        out[kind] = row
    return out


def run_model(name: str, args) -> dict:
    t0 = time.perf_counter()
    bench = MODELS[name]()
    arms = [EXACT] + [arm_name(b, f) for b in args.bits for f in args.tables]
    compiled, rewrites = {}, {}
    for arm in arms:
        if arm == EXACT:
            compiled[arm] = torch.compile(bench.model, backend="inductor")
            continue
        bits, family = arm.removeprefix("approxbp_b").split("_", 1)
        reports: list = []
        cfg = ApproxBPConfig(bits=int(bits), table=family)
        compiled[arm] = torch.compile(bench.model, backend=approxbp_fx.backend(cfg, on_report=reports.append))
        rewrites[arm] = reports
    per_seed = {}
    for seed in args.seeds:
        inputs = bench.load(seed)
        grads = {arm: flat_grad(bench.model, fn, inputs, bench.loss) for arm, fn in compiled.items()}
        exact = grads[EXACT]
        per_seed[str(seed)] = {
            "cosine": {arm: torch.nn.functional.cosine_similarity(g, exact, dim=0).item()
                       for arm, g in grads.items() if arm != EXACT},
            "preactivations": preactivations(bench, inputs, args.tables, args.bits),
        }
        print(f"[{name}] seed {seed}: " + ", ".join(f"{a} {c:.4f}" for a, c in per_seed[str(seed)]["cosine"].items()),
              flush=True)
    sites = {arm: sorted({f"{d.site.op} {'rewritten' if d.rewritten else 'exact'}" for r in reps for d in r.sites})
             for arm, reps in rewrites.items()}
    cos = {arm: [per_seed[s]["cosine"][arm] for s in per_seed] for arm in arms if arm != EXACT}
    return {"describe": bench.describe, "params": sum(p.numel() for p in bench.model.parameters()),
            "seeds": args.seeds, "per_seed": per_seed, "sites": sites,
            "cosine": {arm: {"mean": statistics.fmean(v), "min": min(v)} for arm, v in cos.items()},
            "seconds": round(time.perf_counter() - t0, 1)}


def render(record: dict, path: Path) -> str:
    models = record["models"]
    arms = list(dict.fromkeys(a for m in models.values() for a in m["cosine"]))
    rows = [[name, m["describe"], *(f"{m['cosine'][a]['mean']:.4f} ({m['cosine'][a]['min']:.4f})" if a in m["cosine"]
                                    else "" for a in arms)] for name, m in models.items()]
    random = [m for m in models.values() if "random init" in m["describe"]]
    means = [f"{statistics.fmean(m['cosine'][a]['mean'] for m in random):.4f}" if all(a in m["cosine"] for m in random)
             else "" for a in arms]
    rows.append(["**mean, random init**", "", *means])
    pre = []
    for name, m in models.items():
        kinds = {k for s in m["per_seed"].values() for k in s["preactivations"]}
        for kind in sorted(kinds):
            vals = [s["preactivations"][kind] for s in m["per_seed"].values()]
            pre.append([name, kind, f"{statistics.fmean(v['mean'] for v in vals):+.2f}",
                        f"{statistics.fmean(v['std'] for v in vals):.2f}",
                        *(f"{statistics.fmean(v[a] for v in vals):.4f}" for a in arms)])
    text = "\n".join([
        "# Whole-model gradient cosine against exact",
        "",
        "Made by `benchmarks/grad_cosine.py` (its docstring says what is measured); raw figures in "
        f"`docs/results/grad_cosine.json`. Command: `{record['command']}` on {record['meta']['date']} "
        f"({record['meta']['machine']}, torch {record['meta']['torch']}).",
        "",
        "Cosine between approxbp's and inductor's gradient of every parameter, one flattened fp32 vector, "
        "mean over seeds (min in brackets):",
        "",
        *markdown_table(["model", "what", *arms], "ll" + "r" * len(arms), rows),
        "",
        "Inputs of the rewritable activations (eager forward, pooled over sites and seeds): mean, std, and the "
        "per-element cosine of each table's step derivative with h' over them:",
        "",
        *markdown_table(["model", "activation", "mean", "std", *arms], "llrr" + "r" * len(arms), pre),
        "",
    ])
    path.write_text(text)
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--bits", nargs="+", type=int, default=[2])
    p.add_argument("--tables", nargs="+", default=list(TABLES), choices=TABLES)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 on a shared machine)")
    p.add_argument("--out-dir", type=Path, default=ROOT / "docs")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    meta, command = provenance("grad_cosine", argv, "cpu")
    path = args.out_dir / "results" / "grad_cosine.json"
    record = json.loads(path.read_text()) if path.exists() else {"models": {}}
    record.update(command=command, meta=meta)
    from torch._functorch import config as fc

    # A cached graph skips the partitioner, so the site reports would be empty.
    with fc.patch(enable_autograd_cache=False), torch._dynamo.config.patch(cache_size_limit=64):
        for name in args.models:
            torch._dynamo.reset()
            record["models"][name] = {"command": command, **run_model(name, args)}
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(record, indent=1) + "\n")
    render(record, args.out_dir / "grad_cosine.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
