"""What every user sees on stderr: no warning that plain inductor does not print."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# One training step of a pre-norm MLP block in bf16: the activation and the
# norm rule both fire. -W default shows every warning once, DeprecationWarning
# included, so the check is stricter than what a user's run prints.
_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from torch import nn
    from torch._functorch import config

    config.enable_autograd_cache = False  # partition every time, as a first run does
    model = nn.Sequential(nn.LayerNorm(64), nn.Linear(64, 200), nn.GELU(), nn.Linear(200, 64)).bfloat16()
    model[3].requires_grad_(False)
    x = torch.randn(5, 29, 64, dtype=torch.bfloat16)
    torch.compile(model, backend=sys.argv[1])(x).float().sum().backward()
    """
)

# "path:line: SomeWarning: message", as warnings.showwarning prints it, or a
# warning that torch's C++ side prints itself ("[W...] message").
_WARNING = re.compile(r"^\S.*:\d+: (\w*Warning): (.*)$|^\[W[^\]]*\] (.*)$")

def _warnings(backend: str) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("APPROXBP_FX_AUTO", "PYTHONWARNINGS")}
    run = subprocess.run(
        [sys.executable, "-W", "default", "-c", _SCRIPT, backend],
        env=env, capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return [m.group(0) for line in run.stderr.splitlines() if (m := _WARNING.match(line))]


def test_approxbp_warns_nothing_that_plain_inductor_does_not():
    inductor = _warnings("inductor")
    ours = [w for w in _warnings("approxbp") if w not in inductor]
    assert ours == [], "warnings only backend='approxbp' prints:\n" + "\n".join(ours)


def test_numpy_is_a_dependency():
    # torch's CPU wheel does not require numpy, and `import torch` without it
    # warns "Failed to initialize NumPy" on every run, demo included: README's
    # `pip install -e .` must bring it. (This venv has numpy, so the warning
    # test above cannot see its absence.)
    tomllib = pytest.importorskip("tomllib")
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(re.match(r"numpy\b", d) for d in deps), deps
