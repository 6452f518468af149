"""``approxbp_fx.explain(model, *args)``: what the backend did to a model, and what it saved.

Compiles ``model`` three ways (eager, ``backend="inductor"``, ``approxbp``),
runs one forward+backward each, and reports every activation site the rule
found: op, shape, dtype, rewritten or kept exact and why, the site's saved
bytes before and after, and the total saved activation bytes of each backend.
Gradients already on the parameters are restored afterwards.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from .backend import backend
from .config import ApproxBPConfig
from .measure import default_loss, saved_activation_bytes
from .partition import GraphReport

__all__ = ["explain", "Explanation", "SiteRow"]


@dataclass(frozen=True)
class SiteRow:
    op: str
    shape: tuple
    dtype: torch.dtype
    rewritten: bool
    reason: str
    bytes_before: int
    bytes_after: int


@dataclass
class Explanation:
    sites: list[SiteRow] = field(default_factory=list)
    eager_bytes: int = 0
    inductor_bytes: int = 0
    approxbp_bytes: int = 0

    @property
    def ratio(self) -> float:
        """approxbp's saved activation bytes over inductor's."""
        return self.approxbp_bytes / self.inductor_bytes if self.inductor_bytes else 1.0

    def __str__(self) -> str:
        lines = [f"{'op':<11} {'shape':<18} {'dtype':<9} {'action':<10} {'before B':>10} {'after B':>10}  reason"]
        for s in self.sites:
            action = "rewritten" if s.rewritten else "exact"
            dt = str(s.dtype).replace("torch.", "")
            shape = "x".join(str(d) for d in s.shape)
            reason = "" if s.rewritten else s.reason
            lines.append(
                f"{s.op:<11} {shape:<18} {dt:<9} {action:<10} {s.bytes_before:>10} {s.bytes_after:>10}  {reason}"
            )
        if not self.sites:
            lines.append("(no activation sites found)")
        lines.append(
            f"saved activation bytes: eager {self.eager_bytes}, inductor {self.inductor_bytes}, "
            f"approxbp {self.approxbp_bytes} ({self.ratio:.3f}x inductor)"
        )
        return "\n".join(lines)


@contextlib.contextmanager
def _fresh_compiles():
    # A cache hit would skip the partitioner, and with it the report.
    from torch._functorch import config as functorch_config
    from torch._inductor import config as inductor_config

    with inductor_config.patch(fx_graph_cache=False), functorch_config.patch(enable_autograd_cache=False):
        yield


@contextlib.contextmanager
def _grads_restored(model: nn.Module):
    before = {p: p.grad for p in model.parameters()}
    try:
        yield
    finally:
        for p, g in before.items():
            p.grad = g


def explain(
    model: nn.Module,
    *example_args: Any,
    config: ApproxBPConfig | None = None,
    loss_fn: Callable[[Any], torch.Tensor] = default_loss,
    **example_kwargs: Any,
) -> Explanation:
    """Report what ``torch.compile(model, backend="approxbp")`` does on these inputs.

    Example::

        >>> print(approxbp_fx.explain(mlp, torch.randn(512, 256)))
    """
    reports: list[GraphReport] = []
    exp = Explanation()
    with _grads_restored(model), _fresh_compiles():
        run = lambda f: saved_activation_bytes(f, *example_args, params=model, loss_fn=loss_fn, **example_kwargs)
        exp.eager_bytes = run(model)
        exp.inductor_bytes = run(torch.compile(model, backend="inductor"))
        exp.approxbp_bytes = run(torch.compile(model, backend=backend(config, on_report=reports.append)))
    for r in reports:
        for d in r.sites:
            s = d.site
            exp.sites.append(SiteRow(s.op, s.shape, s.dtype, d.rewritten, d.reason, d.saved_before, d.saved_after))
    return exp
