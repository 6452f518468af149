"""The Python half of the fake CUDA device: what torch, dynamo and inductor ask of a GPU, answered.

:func:`install` patches the process for good (there is no undo: the native hooks
cannot be unloaded either), so it only ever runs in the child process that
``benchmarks._fakecuda`` starts. Each patch below says what breaks without it.
The most fragile are the ones that replace a private function by name (marked
*private*): a torch upgrade that renames or moves it makes :func:`install` fail
loudly with an AttributeError, never measure silently with the patch missing.
"""

from __future__ import annotations

import types

import torch
import torch._subclasses.fake_tensor as fake_tensor  # private

from . import hf, inductor, native, sdpa

# What inductor and dynamo read from the device: an H100 SXM (sm90, 132 SMs, 80 GiB).
# Inductor's is_big_gpu() and has_triton() read these; pad_mm reads the capability.
H100 = types.SimpleNamespace(
    name="NVIDIA H100 80GB HBM3 (fake)", major=9, minor=0, multi_processor_count=132,
    total_memory=80 * 2**30, L2_cache_size=50 * 2**20, warp_size=32, max_threads_per_block=1024,
    max_threads_per_multi_processor=2048, regs_per_multiprocessor=65536, shared_memory_per_block=49152,
    shared_memory_per_block_optin=232448, shared_memory_per_multiprocessor=233472, gcnArchName="",
    uuid="fake", is_integrated=False, is_multi_gpu_board=False, clock_rate=1980000,
    memory_clock_rate=2619000, memory_bus_width=5120,
)

_installed = False


def install() -> None:
    """Patch this process so FakeTensors on "cuda" trace, compile and run backward as on an H100."""
    global _installed
    if _installed:
        return
    if not native.active():
        raise RuntimeError("fake CUDA: the native hooks are not loaded (run through python -m benchmarks._fakecuda)")
    _installed = True
    _cuda_module()
    # The first fake CUDA tensor of a mode allocates one real element "to initialise the context".
    fake_tensor.init_gpu_context = lambda device: None
    _constructors()
    sdpa.install()
    inductor.install()
    hf.install()


def _cuda_module() -> None:
    cuda = torch.cuda
    # autocast("cuda") is disabled with a warning unless CUDA is available and, for bf16, supported.
    cuda.is_available = lambda: True
    cuda.is_bf16_supported = lambda *a, **k: True
    cuda.device_count = lambda: 1
    cuda.current_device = lambda: 0
    cuda.get_device_capability = lambda *a, **k: (H100.major, H100.minor)
    cuda.get_device_properties = lambda *a, **k: H100
    cuda.get_device_name = lambda *a, **k: H100.name
    # Tensor.to("cuda") calls _lazy_init from C++; the CPU build's raises "not compiled with CUDA".
    cuda._lazy_init = lambda: None
    # dynamo saves and restores the CUDA generator around every traced frame.
    cuda.get_rng_state = lambda *a, **k: torch.zeros(16, dtype=torch.uint8)
    cuda.set_rng_state = lambda *a, **k: None


def _constructors() -> None:
    """``torch.tensor(data, device="cuda")`` copies its data to the device with the Python
    dispatch key excluded, so FakeTensorMode never sees it and a real CUDA copy fails. Inside a
    fake mode it becomes an empty fake tensor of the same shape and dtype: the values are lost,
    which is harmless where it is called (inductor's attention-pattern setup traces example
    tensors; Hugging Face's caches start from ``torch.tensor([])``)."""
    real_tensor = torch.tensor

    def tensor(data, *args, device=None, **kwargs):
        if device is None or torch.device(device).type != "cuda":
            return real_tensor(data, *args, device=device, **kwargs)
        requires_grad = kwargs.pop("requires_grad", False)
        host = real_tensor(data, *args, **kwargs)
        return torch.empty(host.shape, dtype=host.dtype, device=device, requires_grad=requires_grad)

    torch.tensor = tensor
