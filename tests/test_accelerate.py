"""Hugging Face Accelerate, unedited: its own torch.compile (dynamo_backend="inductor")
gets the rewrite from approxbp_fx.enable(), or from APPROXBP_FX_AUTO=1 with
ACCELERATE_DYNAMO_BACKEND=inductor in a script that names neither."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import approxbp_fx
from approxbp_fx.measure import count_saved_bytes
from tests.conftest import MLP, RULES_VS_INDUCTOR, NormBlock

accelerate = pytest.importorskip("accelerate")

pytestmark = pytest.mark.usefixtures("partitioner_hook", "fresh_accelerator")

STEPS = 6
ROOT = Path(__file__).resolve().parents[1]


def _reset_accelerate():
    # AcceleratorState is a process-wide singleton: each run builds its own.
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture
def fresh_accelerator():
    _reset_accelerate()
    yield
    _reset_accelerate()


def train(**accelerator_kwargs) -> dict:
    """A stock Accelerate loop on a tiny pre-norm GELU model: losses, saved bytes
    per step and approxbp's rewrite counters. ``ACCELERATE_DYNAMO_BACKEND`` is
    read when no ``dynamo_backend`` is given."""
    from accelerate import Accelerator
    from accelerate.utils import is_compiled_module
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = nn.Sequential(NormBlock(nn.LayerNorm(32), 32), nn.LayerNorm(32), MLP(nn.GELU(), d=32, hidden=64))
    x, target = torch.randn(2, 4, 7, 32, generator=torch.Generator().manual_seed(1))  # 7 tokens: no weight shape
    accelerator = Accelerator(cpu=True, **accelerator_kwargs)
    model, opt = accelerator.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-2))
    losses, saved = [], []
    for _ in range(STEPS):
        with count_saved_bytes(model) as counter:
            loss = nn.functional.mse_loss(model(x), target)
        accelerator.backward(loss)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        saved.append(counter.total)
    rewrites = dict(counters["approxbp"])
    return {"compiled": is_compiled_module(model), "losses": losses, "saved": saved, "rewrites": rewrites}


@pytest.fixture
def inductor_run():
    """The same loop under accelerate's inductor compile, without approxbp."""
    run = train(dynamo_backend="inductor")
    torch._dynamo.reset()
    _reset_accelerate()
    return run


def _check(ours: dict, theirs: dict) -> None:
    assert ours["compiled"] and theirs["compiled"]
    assert ours["losses"][-1] < 0.9 * ours["losses"][0], ours["losses"]
    assert ours["rewrites"].get("save_act_codes") == 1, ours["rewrites"]
    assert ours["rewrites"].get("share_norm_input") == 2, ours["rewrites"]
    assert not theirs["rewrites"], theirs["rewrites"]
    assert max(ours["saved"]) < min(theirs["saved"]), (ours["saved"], theirs["saved"])
    # MS-BP is exact and Approx-BP only changes GELU's backward a little:
    # the first step's loss is the same model's output, later ones stay close.
    assert ours["losses"][0] == pytest.approx(theirs["losses"][0], rel=1e-5)
    assert ours["losses"] == pytest.approx(theirs["losses"], rel=0.05)


def test_accelerator_inductor_under_enable_trains_and_saves_less(inductor_run):
    approxbp_fx.enable(RULES_VS_INDUCTOR)
    try:
        ours = train(dynamo_backend="inductor")
    finally:
        approxbp_fx.disable()
    _check(ours, inductor_run)


def test_accelerate_env_with_auto_env_in_a_fresh_process(inductor_run):
    # What a user runs: `APPROXBP_FX_AUTO=1 ACCELERATE_DYNAMO_BACKEND=inductor python train.py` (here with
    # recompute=banned: the checks count rewrites of sites that pointwise recompute would otherwise take).
    # The script names neither approxbp nor a backend; `import torch` enables the rewrite.
    # AOTAutograd's on-disk cache would serve an earlier run's graph without
    # calling the partitioner, and so without counting the rewrites.
    env = {**os.environ, "APPROXBP_FX_AUTO": "recompute=banned", "ACCELERATE_DYNAMO_BACKEND": "inductor",
           "TORCHINDUCTOR_AUTOGRAD_CACHE": "0",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("TORCH_DEVICE_BACKEND_AUTOLOAD", None)
    code = "import json; from tests.test_accelerate import train; print(json.dumps(train()))"
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    _check(json.loads(out.stdout.strip().splitlines()[-1]), inductor_run)


@pytest.mark.parametrize("how", ["Accelerator", "TorchDynamoPlugin", "ACCELERATE_DYNAMO_BACKEND"])
def test_accelerate_refuses_the_approxbp_backend_name(how, monkeypatch):
    # A limit we cannot fix from here: accelerate checks the backend name
    # against its closed DynamoBackend enum. Use dynamo_backend="inductor"
    # with approxbp_fx.enable() or APPROXBP_FX_AUTO=1 instead. When accelerate
    # accepts custom backends this test fails, and docs/pipelines.md should change.
    from accelerate import Accelerator
    from accelerate.utils import TorchDynamoPlugin

    with pytest.raises(ValueError, match="not a valid DynamoBackend"):
        if how == "Accelerator":
            Accelerator(cpu=True, dynamo_backend="approxbp")
        elif how == "TorchDynamoPlugin":
            TorchDynamoPlugin(backend="approxbp")
        else:
            monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "approxbp")
            Accelerator(cpu=True)
