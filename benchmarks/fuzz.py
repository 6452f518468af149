"""The long fuzz run: many random networks through benchmarks/_fuzz_check.py's check.

    python -m benchmarks.fuzz --examples 40 --seed 0    # writes docs/results/fuzz.json + docs/fuzz.md

Every example is a random :class:`_fuzz_nets.NetSpec`, drawn by hypothesis
from ``--seed`` (the same seed draws the same networks), compiled with
``backend=approxbp`` and its peer, and checked against the eager reference
(forward, gradients, saved bytes, the report: see benchmarks/_fuzz_check.py). Unlike
the CI test, a failure does not stop the run: every example is tried, each
distinct failure (exception type and message head) is then shrunk greedily to
a minimal NetSpec, and everything lands in the JSON and a short docs page.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import warnings
from pathlib import Path

from hypothesis import HealthCheck, Phase, given, seed, settings

from ._failures import failure_text, group, minimise
from ._fuzz_check import Ambiguous, check
from ._fuzz_nets import Block, NetSpec, net_specs
from ._render import markdown_table, produced_by
from ._report import ROOT, provenance, write_section


def attempt(spec: NetSpec, tier: str) -> tuple[str, dict | str]:
    """``("ok", summary)``, ``("ambiguous", why)`` or ``("fail", signature)``."""
    try:
        return "ok", check(spec, tier)
    except Ambiguous as e:
        return "ambiguous", str(e)
    except Exception as e:  # a compile crash is as much a finding as a wrong gradient
        return "fail", failure_text(e)


def _simpler(spec: NetSpec):
    """Candidate specs one step simpler than ``spec``, the biggest steps first."""
    blocks = spec.blocks
    if len(blocks) > 1:
        for i in range(len(blocks)):
            yield dataclasses.replace(spec, blocks=blocks[:i] + blocks[i + 1 :])
    for field, plain in [("dtype", "float32"), ("recompute", "auto"), ("bits", 2), ("input_grad", True),
                         ("norm_share_dtype", "consumer"), ("tokens", (2, 33))]:
        if getattr(spec, field) != plain:
            yield dataclasses.replace(spec, **{field: plain})
    for i, b in enumerate(blocks):
        plain = Block(kind=b.kind, width=b.width, act=b.act, frozen=(False,) * len(b.frozen))
        for change in [dict(norm=None), dict(dropout=0.0), dict(residual=False), dict(frozen=plain.frozen),
                       dict(norm_frozen=False), dict(bias=True), dict(norm_at="pre"), dict(act="nn.GELU"),
                       dict(act=None) if b.kind == "dense" else {}]:
            if change and any(getattr(b, k) != v for k, v in change.items()):
                yield dataclasses.replace(spec, blocks=blocks[:i] + (dataclasses.replace(b, **change),) + blocks[i + 1 :])


def render(payload: dict) -> str:
    meta, s = payload["meta"], payload["summary"]
    out = [
        "# Fuzzing approxbp against inductor and the eager reference",
        "",
        f"{produced_by(payload['command'], meta)}, in {s['wall_s'] / 60:.1f} min. "
        "Raw results: `docs/results/fuzz.json`.",
        "",
        "Each example is a random network of Linear, GELU/SiLU (every spelling: nn, F, hand-written, Hugging Face),",
        "LayerNorm/RMSNorm (nn, F, Hugging Face), dropout and gating blocks, chained or residual, in fp32, bf16,",
        "fp64 or under bf16 autocast, with random frozen Linears, code bits and partitioner settings",
        "(`benchmarks/_fuzz_nets.py`). Each is checked (`benchmarks/_fuzz_check.py`) for: forward equal to the",
        "peer's; gradients equal to an eager",
        "reference in which exactly the activations the backend reported approximated use the step derivative;",
        "saved bytes at most the peer's; every activation reported once, as what it is.",
        "",
        *markdown_table(["tier", "examples", "passed", "ambiguous (code flips at a threshold)", "failed",
                         "distinct failures"], "lrrrrr",
                        [[meta["tier"], s["examples"], s["ok"], s["ambiguous"], s["fail"], len(payload["failures"])]]),
        "",
        f"Across the passing examples: {s['act_sites']} activation sites ({s['act_rewritten']} approximated), "
        f"{s['norm_sites']} norm sites ({s['norm_rewritten']} rewritten); saved bytes {s['saved_approxbp']:,} "
        f"against the peer's {s['saved_peer']:,} ({s['saved_approxbp'] / max(s['saved_peer'], 1):.3f}x).",
        "",
    ]
    if not payload["failures"]:
        out.append("No failures.")
    for i, f in enumerate(payload["failures"], 1):
        out += [
            f"## Failure {i}: `{f['signature']}`",
            "",
            f"Seen in {f['count']} example(s). Minimal example ({f['minimise_tries']} shrink attempts):",
            "",
            "```python",
            f["minimal"],
            "```",
            "",
            "```",
            f["detail"],
            "```",
            "",
        ]
    return "\n".join(out) + "\n"


def _summary(rows: list[dict], start: float) -> dict:
    ok = [r["summary"] for r in rows if r["status"] == "ok"]
    return {
        "examples": len(rows),
        "ok": len(ok),
        "ambiguous": sum(r["status"] == "ambiguous" for r in rows),
        "fail": sum(r["status"] == "fail" for r in rows),
        "wall_s": round(time.monotonic() - start, 1),
        **{k: sum(s[k] for s in ok) for k in ("act_sites", "act_rewritten", "norm_sites", "norm_rewritten",
                                              "saved_peer", "saved_approxbp")},
        "max_grad_error": {dt: max((r["summary"]["max_grad_error"] for r in rows
                                    if r["status"] == "ok" and f"dtype='{dt}'" in r["spec"]), default=None)
                           for dt in ("float32", "float64", "bfloat16", "autocast")},
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--examples", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tier", choices=("inductor", "aot_eager"), default="inductor")
    p.add_argument("--max-blocks", type=int, default=4)
    p.add_argument("--max-minutes", type=float, default=None,
                   help="try no new example after this long (the JSON records how many ran)")
    p.add_argument("--minimise-s", type=float, default=300.0, help="time to shrink each distinct failure")
    p.add_argument("--json", type=Path, default=ROOT / "docs/results/fuzz.json")
    p.add_argument("--md", type=Path, default=ROOT / "docs/fuzz.md")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")

    start = time.monotonic()
    rows: list[dict] = []

    # Phase.generate only: every drawn example is tried once and recorded;
    # shrinking is ours (minimise), per distinct failure, after the run.
    @seed(args.seed)
    @settings(max_examples=args.examples, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(net_specs(max_blocks=args.max_blocks))
    def run(spec):
        if args.max_minutes is not None and time.monotonic() - start > 60 * args.max_minutes:
            return
        t = time.monotonic()
        status, detail = attempt(spec, args.tier)
        rows.append({"spec": repr(spec), "status": status, "s": round(time.monotonic() - t, 2),
                     **({"summary": detail} if status == "ok" else {"detail": detail})})
        print(f"[{len(rows)}/{args.examples}] {status} {rows[-1]['s']}s", flush=True)

    run()
    failures = group(rows)
    for f in failures.values():
        spec = eval(f["first"], {"NetSpec": NetSpec, "Block": Block})  # repr of plain dataclasses
        small, tries = minimise(spec, f["signature"], _simpler, lambda s: attempt(s, args.tier), args.minimise_s)
        f["minimal"], f["minimise_tries"] = repr(small), tries
        status, detail = attempt(small, args.tier)
        f["detail"] = detail.partition("\n")[2] if status == "fail" else f["detail"]

    meta, command = provenance("fuzz", argv)
    meta.update(tier=args.tier, seed=args.seed, max_blocks=args.max_blocks)
    payload = {"meta": meta, "command": command, "summary": _summary(rows, start),
               "failures": list(failures.values()), "examples": rows}
    write_section(args.json, args.md, payload, "gradient fuzz", render(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
