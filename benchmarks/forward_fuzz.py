"""The long forward-equivalence fuzz run: approxbp's forward against inductor's, bit for bit.

    python -m benchmarks.forward_fuzz --minutes 20 --seed 0   # docs/results/forward_fuzz.json + docs/fuzz.md

Every example is a random :class:`_forward_nets.ForwardSpec` (a pointwise chain
around GELU/SiLU/QuickGELU spellings and norms, with clamps, casts, dropout,
specials in the input), drawn by hypothesis from ``--seed``, compiled with
``backend="inductor"`` and with approxbp, and checked by
:func:`_forward_check.check`. A failure does not stop the run; after it, each
distinct failure (:func:`_failures.signature`) is shrunk greedily to a minimal
spec, and everything lands in the JSON and in the forward section of
docs/fuzz.md (the gradient fuzzer's section, benchmarks/fuzz.py, is left alone).
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
from ._forward_check import PeerFailed, check
from ._forward_nets import DTYPES, ForwardSpec, forward_specs, spec_from_repr
from ._render import markdown_table, produced_by
from ._report import ROOT, provenance, write_section


def attempt(spec: ForwardSpec) -> tuple[str, dict | str]:
    """``("ok", summary)``, ``("peer_fail", why)`` (inductor failed too) or ``("fail", signature + detail)``."""
    try:
        return "ok", check(spec)
    except PeerFailed as e:
        return "peer_fail", str(e)
    except Exception as e:  # a compile crash is as much a finding as a changed forward
        return "fail", failure_text(e)


# --------------------------------------------------------------------------- minimising


def _simpler_chains(ops: tuple):
    """Non-empty chains one step simpler than ``ops``."""
    for i, op in enumerate(ops):
        rest = lambda *new: ops[:i] + new + ops[i + 1 :]  # noqa: E731
        if len(ops) > 1:
            yield rest()
        if op[0] == "where":
            _, c, inner, other = op
            yield rest(*inner)
            if other != ():
                yield rest(("where", c, inner, ()))
            for smaller in _simpler_chains(inner):
                yield rest(("where", c, smaller, other))
            for smaller in _simpler_chains(other) if isinstance(other, tuple) else ():
                yield rest(("where", c, inner, smaller))
        elif op[0] == "act" and op[1] != "nn.GELU":
            yield rest(("act", "nn.GELU"))


def _fit(spec: ForwardSpec) -> ForwardSpec:
    """``spec`` with the specials that fall outside its input dropped."""
    numel = spec.tokens[0] * spec.tokens[1] * spec.d_in
    return dataclasses.replace(spec, specials=tuple(s for s in spec.specials if s[0] < numel))


def _simpler(spec: ForwardSpec):
    """Candidate specs one step simpler than ``spec``, the biggest steps first."""
    if spec.branch is not None:
        yield dataclasses.replace(spec, branch=None)
    for chain in _simpler_chains(spec.chain):
        yield dataclasses.replace(spec, chain=chain)
    for branch in _simpler_chains(spec.branch or ()):
        yield dataclasses.replace(spec, branch=branch)
    for field, plain in [("fc1", False), ("fc2", "none"), ("dtype", "float32"), ("recompute", "auto"),
                         ("bits", 2), ("combine", "add"), ("tokens", (1, 8)), ("width", 7), ("x_scale", 4.0)]:
        if getattr(spec, field) != plain:
            yield _fit(dataclasses.replace(spec, **{field: plain}))
    for i in range(len(spec.specials)):
        yield dataclasses.replace(spec, specials=spec.specials[:i] + spec.specials[i + 1 :])


# --------------------------------------------------------------------------- reading a spec

_TEXT = {
    "clamp": "{t}.clamp({0}, {1})", "clamp_min": "{t}.clamp(min={0})", "clamp_max": "{t}.clamp(max={0})",
    "clip": "clip({t}, {0}, {1})", "clip_min": "clip({t}, min={0})", "clip_max": "clip({t}, max={0})",
    "minimum": "minimum({t}, {0})", "maximum": "maximum({t}, {0})",
    "minimum_s": "minimum({t}, {s})", "maximum_s": "maximum({t}, {s})",
    "abs": "{t}.abs()", "scale": "({t} * {0})", "shift": "({t} + {0})", "cast": "{t}.to({0})",
    "dropout": "dropout({t}, {0})",
}


def _chain_text(ops: tuple, t: str, s: str) -> str:
    for op in ops:
        if op[0] in ("act", "norm"):
            t = f"{op[1]}({t})"
        elif op[0] == "where":
            _, c, inner, other = op
            other = _chain_text(other, t, s) if isinstance(other, tuple) else other
            t = f"where({t} > {c}, {_chain_text(inner, t, s)}, {other})"
        else:
            t = _TEXT[op[0]].format(*op[1:], t=t, s=s)
    return t


def describe(spec: ForwardSpec) -> str:
    """The model as one expression, e.g. ``fc2(clip(F.gelu(fc1(x)), -10.0, 10.0)) in float32``."""
    h = "fc1(x)" if spec.fc1 else "x"
    y = _chain_text(spec.chain, h, h)
    if spec.branch is not None:
        y = f"{y} {'+' if spec.combine == 'add' else '*'} {_chain_text(spec.branch, h, h)}"
    y = {"trainable": "fc2({})", "frozen": "frozen_fc2({})", "none": "{}"}[spec.fc2].format(y)
    specials = f"; x holds {', '.join(repr(v) for _, v in spec.specials)}" if spec.specials else ""
    return f"{y} in {spec.dtype}, |x| ~ {spec.x_scale}{specials}"


# --------------------------------------------------------------------------- the run and its report


def render(payload: dict) -> str:
    meta, s = payload["meta"], payload["summary"]
    out = [
        "## Forward equivalence: approxbp against inductor, bit for bit",
        "",
        f"{produced_by(payload['command'], meta)}, in {s['wall_s'] / 60:.1f} min "
        f"({s['fuzz_s'] / 60:.1f} min drawing examples, the rest shrinking failures). "
        "Raw results: `docs/results/forward_fuzz.json`.",
        "",
        "Each example is `fc2(chain(fc1(x)))`, optionally plus or times a second chain of `fc1(x)`, with `fc1`",
        "optional and `fc2` trainable, frozen or absent. A chain mixes GELU/SiLU/QuickGELU in every spelling",
        "(nn, F, tanh, Hugging Face's ACT2FN incl. `gelu_10`, GPT-2's formula, `x*sigmoid(x)`), norms (nn.LayerNorm,",
        "nn.RMSNorm, F.rms_norm, LlamaRMSNorm) and wrappers (clamp/clip with one or two bounds, minimum/maximum",
        "with a constant or the chain's input, abs, scale, shift, dtype casts, dropout, `torch.where(t > c, ...)`",
        "nesting chains), in float32, bfloat16, float16 or bf16 autocast, with ±1e4, ±1e30, ±inf and NaN in `x`",
        "(`benchmarks/_forward_nets.py`). The check (`benchmarks/_forward_check.py`): both compiles succeed,",
        "forward and backward, and approxbp's output equals inductor's bit for bit (NaN where inductor has NaN,",
        "`torch.equal` elsewhere). Examples inductor cannot run either are skipped.",
        "",
        *markdown_table(["examples", "passed", "skipped (inductor failed too)", "failed", "distinct failures",
                         "examples with a rewritten site"], "rrrrrr",
                        [[s["examples"], s["ok"], s["peer_fail"], s["fail"], len(payload["failures"]),
                          s["rewritten_examples"]]]),
        "",
        *markdown_table(["dtype", "examples", "failed"], "lrr",
                        [[dt, n, s["fail_by_dtype"][dt]] for dt, n in s["by_dtype"].items()]),
        "",
    ]
    if not payload["failures"]:
        out.append("No failures.")
    for i, f in enumerate(payload["failures"], 1):
        out += [f"### Forward failure {i}: `{f['signature']}`", "",
                f"Seen in {f['count']} example(s). Minimal example ({f['minimise_tries']} shrink attempts):", "",
                f"`{f['minimal_text']}`", "", "```python", f["minimal"], "```", "", "```", f["detail"], "```", ""]
    return "\n".join(out) + "\n"


def _summary(rows: list[dict], start: float) -> dict:
    ok = [r["summary"] for r in rows if r["status"] == "ok"]
    by_dtype = {dt: [r for r in rows if r["dtype"] == dt] for dt in DTYPES}
    return {
        "examples": len(rows),
        "ok": len(ok),
        "peer_fail": sum(r["status"] == "peer_fail" for r in rows),
        "fail": sum(r["status"] == "fail" for r in rows),
        "fuzz_s": round(time.monotonic() - start, 1),
        "rewritten_examples": sum(s["rewritten"] > 0 for s in ok),
        "by_dtype": {dt: len(rs) for dt, rs in by_dtype.items()},
        "fail_by_dtype": {dt: sum(r["status"] == "fail" for r in rs) for dt, rs in by_dtype.items()},
    }


def _minimise_all(rows: list[dict], budget_s: float) -> list[dict]:
    """One entry per distinct failure, its first spec shrunk within ``budget_s`` each."""
    failures = group(rows)
    for f in failures.values():
        small, tries = minimise(spec_from_repr(f["first"]), f["signature"], _simpler, attempt, budget_s)
        f.update(minimal=repr(small), minimal_text=describe(small), minimise_tries=tries)
        status, detail = attempt(small) if tries else ("fail", f["detail"])
        f["detail"] = (detail if status == "fail" else f["detail"]).partition("\n")[2]
    return list(failures.values())


class _TimeUp(Exception):
    """Ends hypothesis's generation when --minutes have passed (returning would draw on, idly)."""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=20.0,
                   help="draw no new example after this long (shrinking follows)")
    p.add_argument("--examples", type=int, default=100_000, help="at most this many examples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--minimise-s", type=float, default=120.0, help="time to shrink each distinct failure")
    p.add_argument("--json", type=Path, default=ROOT / "docs/results/forward_fuzz.json")
    p.add_argument("--md", type=Path, default=ROOT / "docs/fuzz.md")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    start, rows, seen = time.monotonic(), [], set()

    # Phase.generate only: every drawn example is tried once and recorded;
    # shrinking is ours (minimise), per distinct failure, after the run.
    @seed(args.seed)
    @settings(max_examples=args.examples, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(forward_specs())
    def run(spec):
        if time.monotonic() - start > 60 * args.minutes:
            raise _TimeUp
        # Hypothesis mutates earlier examples; an exact repeat (up to the seed) costs a compile and tells nothing.
        key = repr(dataclasses.replace(spec, seed=0))
        if key in seen:
            return
        seen.add(key)
        t = time.monotonic()
        status, detail = attempt(spec)
        rows.append({"spec": repr(spec), "text": describe(spec), "dtype": spec.dtype, "status": status,
                     "s": round(time.monotonic() - t, 2), ("summary" if status == "ok" else "detail"): detail})
        print(f"[{len(rows)}] {status} {rows[-1]['s']}s {rows[-1]['text']}", flush=True)
        if status == "fail":
            print("   ", detail.partition("\n")[0], flush=True)

    try:
        run()
    except _TimeUp:
        pass
    summary = _summary(rows, start)
    failures = _minimise_all(rows, args.minimise_s)
    summary["wall_s"] = round(time.monotonic() - start, 1)
    meta, command = provenance("forward_fuzz", argv)
    meta.update(seed=args.seed, minutes=args.minutes)
    payload = {"meta": meta, "command": command, "summary": summary, "failures": failures, "examples": rows}
    write_section(args.json, args.md, payload, "forward fuzz", render(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
