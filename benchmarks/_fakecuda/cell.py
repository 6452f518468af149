"""One training step's saved activation bytes on fake CUDA, for benchmarks/train_step.py.

The model is built on the meta device (published sizes cost no memory and no
initialisation time), then each parameter and buffer becomes a FakeTensor on
"cuda" with its shape, strides and dtype. The step is the harness's: forward
under ``autocast("cuda")`` for amp, backward; no optimizer step, no timing.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from approxbp_fx.measure import count_saved_bytes

from . import inductor, sdpa


def _fake_cuda(t: torch.Tensor, mode: FakeTensorMode) -> torch.Tensor:
    with mode:
        return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cuda")


def to_fake_cuda(model: nn.Module, mode: FakeTensorMode) -> nn.Module:
    """Every parameter and buffer replaced, in place, by a fake CUDA tensor like it.
    Tied parameters (GPT-2's and LLaMA's embedding and head) stay one parameter."""
    done: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for table, is_param in ((module._parameters, True), (module._buffers, False)):
            for name, t in table.items():
                if t is None:
                    continue
                if id(t) not in done:
                    fake = _fake_cuda(t.detach(), mode)
                    done[id(t)] = nn.Parameter(fake, requires_grad=t.requires_grad) if is_param else fake
                table[name] = done[id(t)]
    return model


def _storage_id(t: torch.Tensor) -> int:
    # The StorageImpl's address: fake storages have no data pointer (all report 0).
    return t.untyped_storage()._cdata


class count_fake_saved_bytes(count_saved_bytes):
    """``approxbp_fx.measure.count_saved_bytes``'s rule with storages told apart by identity.

    The rule is unchanged: every tensor saved for backward, each storage once at its
    full size, parameters and parameter-shaped tensors (autocast's weight copies) left out.
    Saved tensors stay alive until backward, so no storage address is reused meanwhile.
    """

    def __init__(self, params: nn.Module) -> None:  # the base's, keyed by _storage_id
        plist = list(params.parameters())
        self._param_ptrs = {_storage_id(p) for p in plist}
        self._param_shapes = {tuple(p.shape) for p in plist}
        self._seen: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        key = _storage_id(t)
        if key not in self._param_ptrs and tuple(t.shape) not in self._param_shapes:
            self._seen[key] = max(self._seen.get(key, 0), t.untyped_storage().nbytes())
        return t


def measure(build: Callable[[], nn.Module], prepare: Callable[[nn.Module], Callable],
            inputs: Callable[[nn.Module], dict], amp: bool, compiled: bool) -> dict:
    """Saved bytes of one forward and backward on fake CUDA.

    Args:
        build: makes the model (called under ``torch.device("meta")``).
        prepare: the harness's module swaps and ``torch.compile`` for the backend.
        inputs: makes a batch (on meta) for the model.
        amp: forward under ``torch.autocast("cuda", torch.bfloat16)``.
        compiled: ``prepare`` compiled the model. Eager forwards run inside the fake
            mode, so their constructors are fake too; dynamo does not trace while a
            mode is active, and the compiled graphs enter it themselves.

    Returns ``saved_bytes``, the attention kernels chosen (``sdpa``, each kernel once)
    and how many matmuls pad_mm would have timed on the GPU (``pad_mm_undecided``,
    answered "do not pad").
    """
    mode = FakeTensorMode()
    with torch.device("meta"):
        model = to_fake_cuda(build(), mode)
    fn = prepare(model)
    batch = {k: _fake_cuda(v, mode) for k, v in inputs(model).items()}
    if "position_ids" in batch:  # hf.install() assumes the models number positions themselves
        raise ValueError("fake CUDA: inputs with position_ids are not modelled (see benchmarks/_fakecuda/hf.py)")
    sdpa.CHOICES.clear()
    asked = len(inductor.PAD_MM_QUESTIONS)
    eager_mode = contextlib.nullcontext() if compiled else mode
    with count_fake_saved_bytes(model) as counter, eager_mode, torch.autocast("cuda", torch.bfloat16, enabled=amp):
        loss = fn(**batch).loss
    with mode:  # the engine makes zero gradients with at::zeros(device="cuda"): keep them fake
        loss.backward()
    return {"saved_bytes": counter.total, "sdpa": sorted(sdpa.CHOICES),
            "pad_mm_undecided": len(inductor.PAD_MM_QUESTIONS) - asked}
