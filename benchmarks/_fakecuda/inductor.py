"""Inductor up to its partition, then no code generation: the compiled graphs run on fake tensors.

``torch.compile(backend="inductor")`` and the ``approxbp`` backend both end in
``torch._inductor.compile_fx.compile_fx``, which they import when they are called.
:func:`install` replaces that function by one that passes a different
``inner_compile``: everything before it runs unchanged (pre-grad passes,
AOTAutograd with inductor's decompositions, the joint-graph passes, the
partitioner: inductor's min-cut or a ``custom_partitioner_fn`` such as
approxbp's), and each partitioned forward or backward graph is then run op by op
on the fake tensors it receives. What the forward returns for backward is what
AOTAutograd's ``CompiledFunction`` saves, so the saved-tensor hooks count it as
they count inductor's own compiled code.

Skipped with code generation: inductor's post-grad passes and its buffer
allocation. Neither moves the cut between forward and backward; a saved view
keeps its base's storage here as inductor's ``reinterpret_tensor`` does there.
Buffer padding is not modelled (within 0.3 MiB of the H100's figures).

Also answered here: pad_mm's GPU benchmark, torch.cuda.device() and the
constant folder's real constructors (see each function).
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# pad_mm would time padded against unpadded matmuls on the GPU; each case it asked
# about is recorded here and answered "do not pad", as the H100 figures require.
PAD_MM_QUESTIONS: list[str] = []


def install() -> None:
    import torch._inductor.compile_fx as compile_fx  # private: the patched names are checked on access
    import torch._inductor.fx_passes.pad_mm as pad_mm  # private

    real_compile_fx = compile_fx.compile_fx

    @functools.wraps(real_compile_fx)
    def compile_fx_without_codegen(model, example_inputs, inner_compile=None, *args, **kwargs):
        # Only callers that leave inner_compile to its default (torch.compile's inductor and
        # approxbp's backend) are redirected; compile_fx's own recursive calls pass one on.
        return real_compile_fx(model, example_inputs, inner_compile or run_graph, *args, **kwargs)

    compile_fx.compile_fx = compile_fx_without_codegen
    # torch.cuda.device(i) needs the CUDA extension; there is one (fake) device anyway.
    compile_fx.get_cuda_device_context = lambda gm: contextlib.nullcontext()
    pad_mm.get_cached_should_pad = _do_not_pad
    # No code is generated, so no compile workers are needed (on 2 cores they only cost).
    torch._inductor.config.compile_threads = 1
    _fold_constants_on_cpu()


def run_graph(gm: torch.fx.GraphModule, example_inputs, **kwargs):
    """An ``inner_compile``: the graph itself, run inside the fake mode of its inputs, so that
    constructors in it (full, empty, arange on "cuda") make fake tensors too."""
    from torch._functorch.aot_autograd import make_boxed_func
    from torch._subclasses.fake_tensor import FakeTensor

    def run(*args):
        mode = next((a.fake_mode for a in args if isinstance(a, FakeTensor)), None)
        if mode is None:
            raise RuntimeError("fake CUDA: a compiled graph was called without fake tensors")
        with mode:
            return gm(*args)

    return make_boxed_func(run)


def _do_not_pad(key: str) -> bool:
    PAD_MM_QUESTIONS.append(key)
    return False


class _ConstructOnCpu(TorchDispatchMode):
    """Constructors asked for device="cuda" make real CPU tensors instead."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "device" in kwargs and torch.device(kwargs["device"]).type == "cuda":
            kwargs["device"] = torch.device("cpu")
        return func(*args, **kwargs)


def _fold_constants_on_cpu() -> None:
    """Inductor's uniform-value constant folder (a joint-graph pass) evaluates constructor nodes
    (full, ones) for real, fake modes disabled, on the node's device. Only the scalar it deduces
    is used (the replacement node takes its device from the graph), so CPU decides the same folds."""
    from torch._inductor.fx_passes import joint_graph  # private

    folder = joint_graph.UniformValueConstantFolder
    for name in ("__init__", "run"):
        method = getattr(folder, name)

        def on_cpu(self, *args, _method=method, **kwargs):
            with _ConstructOnCpu():
                return _method(self, *args, **kwargs)

        setattr(folder, name, on_cpu)
