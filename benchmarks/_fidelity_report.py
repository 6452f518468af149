"""docs/fidelity.md and docs/images/fidelity_<task>.png from docs/results/fidelity.json.

Hand-written analysis lives between ``<!-- notes -->`` and ``<!-- /notes -->``
in docs/fidelity.md; re-rendering keeps it.
"""

from __future__ import annotations

import re
import statistics
from pathlib import Path

from ._render import figure, markdown_table

EXACT = "inductor"
NOTES = re.compile(r"<!-- notes -->.*?<!-- /notes -->", re.S)
MIB = 2**20
EARLY = 5  # steps before the arms' different updates have compounded: the loss should track closely there


def _fmt(metric: str, x: float) -> str:
    return f"{100 * x:.2f}%" if metric == "accuracy" else f"{x:.4f}"


def _diff(metric: str, x: float) -> str:
    return f"{100 * x:+.2f} pp" if metric == "accuracy" else f"{x:+.4f}"


def _rel_dev(arm: dict, exact: dict, steps: int | None = None) -> float:
    """Largest |loss - inductor loss| / inductor loss over seeds and the first ``steps`` steps."""
    return max(abs(a - e) / abs(e) for s, curve in arm["losses"].items()
               for a, e in list(zip(curve, exact["losses"][s]))[:steps])


def _ms(metric: str, m: dict) -> str:
    return f"{_fmt(metric, m['mean'])} ± {_fmt(metric, m['std'])}"


def _min_layer_cosine(arm: dict) -> tuple[float, str]:
    """The lowest per-layer gradient cosine over seeds, and its layer."""
    worst = min(((c, layer) for per_seed in arm["cosine"].values() for layer, c in per_seed["per_layer"].items()))
    return worst


def _approx_arms(task: dict) -> list[str]:
    return [a for a in task["arms"] if a != EXACT]


def _rewrites(arm: dict) -> str:
    return ", ".join(f"{op} {v['rewritten']}/{v['rewritten'] + v['kept_exact']}" for op, v in sorted(arm["rewrites"].items()))


def summary_table(tasks: dict) -> list[str]:
    rows = []
    for name, t in tasks.items():
        exact = t["arms"][EXACT]
        for arm in _approx_arms(t):
            a = t["arms"][arm]
            for metric in [t["metric"]] + [k for k in a["metrics"] if k != t["metric"]]:
                p = a["parity"][metric]
                cos, layer = _min_layer_cosine(a)
                rows.append([name, metric, arm, _ms(metric, exact["metrics"][metric]),
                             _ms(metric, a["metrics"][metric]), _diff(metric, p["diff"]), _fmt(metric, p["spread"]),
                             "yes" if p["holds"] else "**no**",
                             f"{a['saved_bytes'] / exact['saved_bytes']:.3f}", f"{cos:.4f} ({layer})", _rewrites(a)])
    header = ["task", "metric", "arm", "inductor", "approxbp", "Δ means", "seed spread", "parity",
              "saved bytes / inductor", "min layer grad cosine", "sites rewritten"]
    return markdown_table(header, "lllrrrrcrrl", rows) + [""]


def _arm_row(arm: str, a: dict, exact: dict) -> list[str]:
    """One arm's row of a task's table; the exact arm leaves the deviation columns empty."""
    final = statistics.fmean(v[-1] for v in a["losses"].values())
    dev = ["", ""] if arm == EXACT else [f"{100 * _rel_dev(a, exact, EARLY):.2f}%", f"{100 * _rel_dev(a, exact):.2f}%"]
    metrics = [_ms(k, m) for k, m in a["metrics"].items()]
    return [arm, *metrics, f"{final:.4f}", f"{a['saved_bytes'] / MIB:.2f} MiB", *dev]


def arm_commands(t: dict) -> list[str]:
    """The distinct commands behind a task's arms (a row without one came from the task's command)."""
    return list(dict.fromkeys(a.get("command", t["command"]) for a in t["arms"].values()))


def task_section(name: str, t: dict, png: str | None) -> list[str]:
    exact = t["arms"][EXACT]
    out = [
        f"## {name}",
        "",
        f"{t['params'] / 1e6:.1f}M parameters, {t['trainable'] / 1e6:.3f}M trainable; {t['steps']} steps, batch "
        f"{t['batch']}, AdamW lr {t['lr']}, seeds {', '.join(map(str, t['seeds']))}. What the rewrite can touch: "
        f"{t['rewritable']}. Produced by " + " and ".join(f"`{c}`" for c in arm_commands(t))
        + f", the last on {t['meta']['date']} ({t['meta']['machine']}, torch {t['meta']['torch']}), "
        f"which took {t['seconds'] / 60:.1f} min.",
        "",
        *markdown_table(["arm", *exact["metrics"], "final train loss (mean)", "saved bytes, step 1",
                         f"loss deviation from inductor, steps 1-{EARLY}", "all steps"],
                        "l" + "r" * (len(exact["metrics"]) + 4),
                        [_arm_row(arm, a, exact) for arm, a in t["arms"].items()]),
        "",
    ]
    for arm in _approx_arms(t):
        a = t["arms"][arm]
        layers = list(next(iter(a["cosine"].values()))["per_layer"])
        per_layer = {layer: [s["per_layer"][layer] for s in a["cosine"].values()] for layer in layers}
        out += [
            f"First-step gradient cosine, {arm} against inductor (same weights, same batch), per layer, "
            f"min over seeds: " + ", ".join(f"{layer} {min(v):.4f}" for layer, v in per_layer.items())
            + f". Sites ({arm}, rewritten/found over every compiled graph): {_rewrites(a)}.",
            "",
        ]
    if png:
        out += [f"![per-step training loss, {name}]({png})", ""]
    return out


def chart(name: str, t: dict, png: Path) -> bool:
    """Per-step loss (mean over seeds, min-max band) per arm, and each approx arm's deviation."""
    return figure(png, lambda fig, axes: _draw_losses(name, t, *axes), dpi=100, nrows=1, ncols=2, figsize=(11, 3.8))


def _draw_losses(name: str, t: dict, ax, dx) -> None:
    exact = t["arms"][EXACT]["losses"]
    for arm, a in t["arms"].items():
        curves = list(a["losses"].values())
        steps = range(1, len(curves[0]) + 1)
        mean = [statistics.fmean(c[i] for c in curves) for i in range(len(curves[0]))]
        line = ax.plot(steps, mean, label=arm, linewidth=1.2)[0]
        ax.fill_between(steps, [min(c[i] for c in curves) for i in range(len(mean))],
                        [max(c[i] for c in curves) for i in range(len(mean))], color=line.get_color(), alpha=0.15)
        if arm != EXACT:
            for i, (seed, c) in enumerate(a["losses"].items()):
                dx.plot(steps, [x - e for x, e in zip(c, exact[seed])], color=line.get_color(), linewidth=0.8,
                        alpha=0.8, label=f"{arm}, one line per seed" if i == 0 else None)
    ax.set(xlabel="step", ylabel="training loss", title=f"{name}: mean over seeds, band = min..max")
    dx.axhline(0.0, color="black", linewidth=0.6)
    dx.set(xlabel="step", ylabel="loss − inductor loss", title="same seed, same batch")
    ax.legend(fontsize=8)
    dx.legend(fontsize=7)


def render(record: dict, docs: Path) -> str:
    """Write docs/fidelity.md (keeping its notes block) and the PNGs; returns the text."""
    tasks = record["tasks"]
    md = docs / "fidelity.md"
    old = md.read_text() if md.exists() else ""
    kept = NOTES.search(old)
    notes = kept.group(0) if kept else "<!-- notes -->\n<!-- /notes -->"
    commands = list(dict.fromkeys(c for t in tasks.values() for c in arm_commands(t)))
    out = [
        "# Fine-tuning parity on real models and real data",
        "",
        "Exact training (`backend=\"inductor\"`) against approxbp on pretrained weights and real data, "
        "made by `benchmarks/fidelity.py` (its docstring says what each figure is). Every arm of a task "
        "starts each seed from the same weights and sees the same batches in the same order; dropout is off, "
        "so the forward passes agree and only the backward differs. **Parity** holds when the difference "
        "of the arms' mean final metric is within the seed spread (the larger of the two sample standard "
        "deviations over seeds). Raw figures: `docs/results/fidelity.json`.",
        "",
        "Commands:",
        "",
        "```bash",
        *(f"HF_HUB_OFFLINE=1 {c}" for c in commands),
        "```",
        "",
        "## Summary",
        "",
        *summary_table(tasks),
        notes,
        "",
    ]
    for name, t in tasks.items():
        png = docs / "images" / f"fidelity_{name}.png"
        out += task_section(name, t, f"images/{png.name}" if chart(name, t, png) else None)
    text = "\n".join(out)
    md.write_text(text)
    return text
