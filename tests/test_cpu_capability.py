"""The CPU-kernel suites hold on every x86-64 vector unit, not only this machine's.

CI runs on whatever processor the machine has (Intel or AMD, AVX2 or
AVX-512), and aten picks its vectorised kernels by that: torch 2.13's
``F.gelu(+inf)`` is NaN on the vectorised path and +inf on the scalar one.
``ATEN_CPU_CAPABILITY`` forces a lower level (aten reads it once, at import;
inductor's C++ code generation honours it too), so each level runs the suites
in its own interpreter. A level above what the processor has is skipped, and so
is this interpreter's own level: the suite itself just ran the suites there.

Each level also gets its own inductor cache directory. On torch 2.13 the FX
graph cache key does not include the vector ISA that ATEN_CPU_CAPABILITY
picks: scalar code compiled under ``default`` is served later to a process
on AVX-512 (seen here: a shared cache mixed one backend's scalar kernel with
the other's vectorised one, 1 ulp apart). Sharing the cache would both
pollute the developer's and hide the level under test.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The suites whose outputs come from aten's CPU kernels: the ops' torch
# implementation, the lowering traced from it, and the forward of both
# backends on the issue-12 cases (inductor's C++ under the same ISA).
SUITES = [
    "tests/kernels/test_act_codes.py::TestTorchOps",
    "tests/test_lowering.py::test_lowered_graph_matches_the_ops_bit_for_bit",
    "tests/passes/test_save_act_codes.py::test_a_clamp_around_an_activation_keeps_the_forward_bit_for_bit",
]


def _capability(level: str) -> str:
    """The capability aten actually uses when ``level`` is asked for (lower if the processor lacks it)."""
    code = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    env = {**os.environ, "ATEN_CPU_CAPABILITY": level}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().lower()


@pytest.mark.parametrize("level", ["default", "avx2", "avx512"])
def test_cpu_kernel_suites_pass_at_every_capability(level, tmp_path):
    import torch

    if torch.backends.cpu.get_cpu_capability().lower() == level:
        pytest.skip(f"{level} is this interpreter's own level: the suites ran at it in-process")
    got = _capability(level)
    if got != level:
        pytest.skip(f"this processor has no {level} (aten uses {got})")
    env = {
        **os.environ,
        "ATEN_CPU_CAPABILITY": level,
        "PYTHONPATH": str(ROOT),
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"),
    }
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *SUITES],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert run.returncode == 0, f"ATEN_CPU_CAPABILITY={level}:\n{run.stdout[-6000:]}"
