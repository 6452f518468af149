"""ApproxBPConfig validation and the backend's entry points."""

from __future__ import annotations

import dataclasses
import os
import pickle
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch

import approxbp_fx
from approxbp_fx import ApproxBPConfig
from approxbp_fx.coefficients import DEFAULT_TABLE, TABLES


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"bits": 0}, ValueError, "bits must be an int in 1..4"),
        ({"bits": 5}, ValueError, "bits must be an int in 1..4"),
        ({"bits": 2.0}, ValueError, "bits must be an int"),
        ({"bits": True}, ValueError, "bits must be an int"),
        ({"activations": {"relu"}}, ValueError, "unknown \\['relu'\\]"),
        ({"activations": "gelu"}, TypeError, "not a single string"),
        ({"dtypes": {torch.float64}}, ValueError, "cannot be approximated"),
        ({"save_act_codes": 1}, TypeError, "must be a bool"),
        ({"recompute": True}, ValueError, "recompute must be one of"),
        ({"fused_attention": "yes"}, TypeError, "must be a bool"),
        ({"act_lowering": "triton"}, ValueError, "act_lowering must be one of"),
        ({"table": "lloyd"}, ValueError, "table must be one of"),
    ],
)
def test_bad_config_values_fail_clearly(kwargs, error, match):
    with pytest.raises(error, match=match):
        ApproxBPConfig(**kwargs)


def test_config_is_frozen_and_hashable():
    cfg = ApproxBPConfig(activations=["gelu"])
    assert cfg.activations == frozenset({"gelu"})
    with pytest.raises(AttributeError):
        cfg.bits = 3
    assert hash(cfg) == hash(ApproxBPConfig(activations={"gelu"}))
    assert cfg.key() != ApproxBPConfig().key()


def test_from_options_rejects_unknown_keys():
    assert ApproxBPConfig.from_options({"bits": 3}).bits == 3
    with pytest.raises(ValueError, match="unknown approxbp option"):
        ApproxBPConfig.from_options({"bitz": 3})


def test_backend_is_registered_as_entry_point():
    names = {ep.name: ep.value for ep in entry_points(group="torch_dynamo_backends")}
    assert names.get("approxbp") == "approxbp_fx.backend:approxbp"
    assert "approxbp" in torch._dynamo.list_backends()


def test_backend_rejects_wrong_arguments():
    with pytest.raises(TypeError, match="expects an ApproxBPConfig"):
        approxbp_fx.backend({"bits": 2})
    with pytest.raises(ValueError, match="compiler must be"):
        approxbp_fx.backend(compiler="tvm")


def test_partitioner_uuid_tracks_config():
    from approxbp_fx.partition import ApproxBPPartitioner

    a = ApproxBPPartitioner(ApproxBPConfig(bits=2)).uuid()
    assert a == ApproxBPPartitioner(ApproxBPConfig(bits=2)).uuid()
    assert a != ApproxBPPartitioner(ApproxBPConfig(bits=3)).uuid()
    assert a != ApproxBPPartitioner(ApproxBPConfig(recompute="allowed")).uuid()
    assert a != ApproxBPPartitioner(ApproxBPConfig(act_lowering="kernels")).uuid()


# One value other than the default for every field; a new field must add one here.
_OTHER_VALUE = {
    "bits": 3,
    "table": next(t for t in TABLES if t != DEFAULT_TABLE),
    "save_act_codes": False,
    "fused_attention": False,
    "pack_bool_masks": False,
    "share_norm_input": False,
    "norm_share_dtype": "input",
    "recompute": "allowed",
    "act_lowering": "kernels",
    "activations": frozenset({"gelu"}),
    "dtypes": frozenset({torch.float32}),
}


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(ApproxBPConfig)])
def test_every_field_reaches_the_cache_key(name):
    from approxbp_fx.partition import ApproxBPPartitioner

    assert name in _OTHER_VALUE, f"ApproxBPConfig.{name} is new: give it a value in _OTHER_VALUE"
    other = ApproxBPConfig(**{name: _OTHER_VALUE[name]})
    assert other.key() != ApproxBPConfig().key()
    assert ApproxBPPartitioner(other).uuid() != ApproxBPPartitioner(ApproxBPConfig()).uuid()


def test_config_pickles_the_same_in_every_process():
    # Inductor's cache keys hash the pickled partitioner, config included; a
    # frozenset pickles in string-hash order, which PYTHONHASHSEED changes.
    code = "import pickle, approxbp_fx; print(pickle.dumps(approxbp_fx.ApproxBPConfig()).hex())"
    root = Path(__file__).resolve().parents[1]
    outs = {
        subprocess.run(
            [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120,
            env={**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(root)},
        ).stdout
        for seed in ("1", "2", "3")
    }
    assert len(outs) == 1 and outs != {""}
    assert pickle.loads(bytes.fromhex(outs.pop())) == ApproxBPConfig()


def test_import_loads_neither_sympy_nor_mpmath_nor_dynamo():
    # APPROXBP_FX_AUTO imports the package inside every `import torch`: it must
    # cost little until a compile starts (the derivation is offline, the
    # rules load at the first compile). Measured against torch's own import.
    code = (
        "import sys, torch\n"
        "before = set(sys.modules)\n"
        "import approxbp_fx\n"
        "print(sorted(m for m in ('sympy', 'mpmath', 'torch._dynamo') if m in set(sys.modules) - before))\n"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["[]"]
