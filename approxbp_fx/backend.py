"""The ``approxbp`` torch.compile backend: inductor plus our joint-graph rewrites.

``torch.compile(model, backend="approxbp")`` finds this module through the
``torch_dynamo_backends`` entry point, so user scripts import nothing.
The backend is inductor with one change: its partitioner is
:class:`~approxbp_fx.partition.ApproxBPPartitioner`, which rewrites the joint
forward+backward graph where that shrinks what forward saves, then partitions
as inductor would. Forward outputs are inductor's, up to rounding.
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, Any, Callable

import torch

from .config import ApproxBPConfig
from .report import log

if TYPE_CHECKING:
    from .report import GraphReport

__all__ = ["backend", "approxbp", "inductor_with_recompute"]


def backend(
    config: ApproxBPConfig | None = None,
    *,
    mode: str | None = None,
    on_report: Callable[[GraphReport], None] | None = None,
    compiler: str = "inductor",
) -> Callable[..., Any]:
    """A torch.compile backend with ``config``.

    Args:
        config: what to rewrite; ``ApproxBPConfig()`` when None.
        mode: an inductor mode ("max-autotune", ...), as ``torch.compile(mode=...)``.
        on_report: receives a :class:`~approxbp_fx.report.GraphReport` per
            compiled joint graph (what was rewritten and the saved bytes).
        compiler: "inductor" (the product), or "aot_eager" to run the
            rewritten forward/backward graphs op by op, for debugging the
            pass without inductor's code generation.

    Example::

        model = torch.compile(model, backend=approxbp_fx.backend(ApproxBPConfig(bits=3)))
    """
    cfg = config if config is not None else ApproxBPConfig()
    if not isinstance(cfg, ApproxBPConfig):
        raise TypeError(f"backend(config=...) expects an ApproxBPConfig, got {type(cfg).__name__}")
    if compiler not in ("inductor", "aot_eager"):
        raise ValueError(f"compiler must be 'inductor' or 'aot_eager', got {compiler!r}")
    if compiler == "aot_eager":
        if mode not in (None, "default"):
            raise ValueError("mode= only applies to compiler='inductor'")
        return _aot_eager(cfg, on_report)
    patches: dict[str, Any] = {}
    if mode not in (None, "default"):
        patches.update(torch._inductor.list_mode_options(mode))

    def approxbp_backend(gm: torch.fx.GraphModule, example_inputs):
        from torch._inductor.compile_fx import compile_fx

        from .partition import inductor_hooks

        # Measure against, and delegate to, whatever partitioner (and pre-grad
        # pass) the user set; under approxbp_fx.enable() those are the ones
        # enable() wrapped, so the pipeline runs once, with this backend's config.
        hooks = inductor_hooks(cfg, on_report)
        with _partition_runs_if_observed(on_report):
            return compile_fx(gm, example_inputs, config_patches={**patches, **hooks})

    return approxbp_backend


@contextlib.contextmanager
def _partition_runs_if_observed(on_report):
    # An AOTAutograd cache hit (on by default, and persistent across processes)
    # returns the compiled forward/backward without calling the partitioner, so
    # a caller who asked for a GraphReport, or for the approxbp_fx log, would
    # silently get nothing. Only then is the lookup skipped; the compiled code
    # is the same either way.
    if on_report is None and not log.isEnabledFor(logging.INFO):
        yield
        return
    from torch._functorch import config as functorch_config

    with functorch_config.patch(enable_autograd_cache=False):
        yield


def _aot_eager(cfg: ApproxBPConfig, on_report):
    from functorch.compile import make_boxed_func
    from torch._decomp import get_decompositions
    from torch._dynamo.backends.common import aot_autograd

    from .partition import ApproxBPGraphPasses, ApproxBPPartitioner

    def run_graph(gm, _example_inputs):
        return make_boxed_func(gm.forward)

    graph_passes = ApproxBPGraphPasses(cfg)
    partitioner = ApproxBPPartitioner(cfg, on_report=on_report, graph_passes=graph_passes)
    # Inductor hands its partitioner layer norm decomposed (var_mean, rsqrt, ...);
    # decompose it here too so this tier sees the norm sites inductor's does.
    # Activations stay whole (aten.gelu_backward), which keeps that form tested.
    aten = torch.ops.aten
    decomps = get_decompositions([aten.native_layer_norm, aten.native_layer_norm_backward])
    inner = aot_autograd(fw_compiler=run_graph, bw_compiler=run_graph, partition_fn=partitioner, decompositions=decomps)

    def approxbp_aot_eager(gm: torch.fx.GraphModule, example_inputs):
        # No inductor here, so no pre-grad hook: the first stage runs on dynamo's graph directly.
        graph_passes(gm.graph)
        gm.recompile()
        with _partition_runs_if_observed(on_report):
            return inner(gm, example_inputs)

    return approxbp_aot_eager


def approxbp(gm: torch.fx.GraphModule, example_inputs, *, mode: str | None = None, options: dict | None = None):
    """Entry point for ``torch.compile(model, backend="approxbp", options={...})``.

    ``options`` are :class:`ApproxBPConfig` fields, e.g. ``{"bits": 3}``.
    """
    return backend(ApproxBPConfig.from_options(options), mode=mode)(gm, example_inputs)


def inductor_with_recompute(gm: torch.fx.GraphModule, example_inputs):
    """Plain inductor with pointwise recompute allowed (``ban_recompute_materialized_backward=False``).

    The second compiled peer approxbp never saves more than (``ApproxBPConfig.recompute``);
    explain() and the benchmarks measure it. A backend of its own, so dynamo compiles
    anew rather than reuse a plain inductor compile of the same code.
    """
    from torch._functorch import config as functorch_config
    from torch._inductor.compile_fx import compile_fx

    with functorch_config.patch(ban_recompute_materialized_backward=False):
        return compile_fx(gm, example_inputs)
