"""Fake CUDA: CUDA saved-activation bytes measured on a machine with no GPU.

``python -m benchmarks.train_step --device fake-cuda ...`` runs each grid cell's
training step with FakeTensors on device "cuda" (shapes, strides and dtypes;
no data, no kernels) through the unchanged ``torch.compile`` pipeline, and counts
what forward saves for backward with the project's rule. Bytes only: there is
nothing to time and no memory to peak, so those fields stay empty.

What CUDA changes, and this reproduces: ``autocast("cuda")``'s op lists, the SDPA
kernel CUDA picks (:mod:`.sdpa`), and every decision inductor, AOTAutograd and the
partitioners make from a tensor's device.

The parts, each in its own module:

* :mod:`.native` + ``hooks.cpp``: a fake CUDA device guard and CUDA hooks, so the
  autograd engine accepts CUDA tensors; built with g++ on first use, cached per torch
  version. Must load before torch, hence :func:`rerun` and ``__main__``.
* :mod:`.device`: ``torch.cuda`` reports an H100; ``torch.tensor(..., device="cuda")``.
* :mod:`.sdpa`: the attention backend choice (the patch that decides attention bytes).
* :mod:`.inductor`: inductor without code generation; pad_mm and constant folding.
* :mod:`.cell`: one cell: model and inputs made fake, forward, backward, bytes.

Credit: the reference instrument (``shared/fakecuda`` beside the project's worktrees,
not in this repository) found what must be patched and validated the approach
against a real H100; this is a separate implementation of the same ideas.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from . import native

FAKE_CUDA = "fake-cuda"  # the --device value


def rerun(module: str, argv: list[str]) -> int:
    """Run ``python -m module argv`` in a child process whose torch sees the fake device;
    its exit code. The hooks must load before torch, which this process has imported."""
    native.build()  # here, so a missing compiler fails before the child starts
    root = str(Path(__file__).resolve().parents[2])
    # The child imports this checkout's benchmarks and approxbp_fx from any working
    # directory; PYTHONPATH's other entries (another transformers) keep their order.
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "benchmarks._fakecuda", module, *argv]
    return subprocess.run(cmd, env={**os.environ, "PYTHONPATH": path}).returncode
