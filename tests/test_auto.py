"""Auto-apply: approxbp_fx.enable()/disable() and the APPROXBP_FX_AUTO variable."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn
from torch._inductor import config as inductor_config
from torch._inductor.custom_graph_pass import CustomPartitionerFn

import approxbp_fx
from approxbp_fx import ApproxBPConfig
from approxbp_fx.auto import config_from_env
from approxbp_fx.partition import ApproxBPPartitioner
from tests.conftest import MLP, rewrites

X = (5, 29, 64)


pytestmark = pytest.mark.usefixtures("partitioner_hook")


def _bytes(model, x, backend="inductor"):
    torch._dynamo.reset()
    return approxbp_fx.saved_activation_bytes(torch.compile(model, backend=backend), x, params=model)


def _model():
    return MLP(nn.GELU(), frozen_second=True).bfloat16(), torch.randn(*X, dtype=torch.bfloat16)


def test_enable_makes_plain_torch_compile_rewrite_and_disable_restores():
    model, x = _model()
    inductor = _bytes(model, x)
    approxbp_fx.enable()
    assert approxbp_fx.is_enabled()
    enabled = _bytes(model, x)
    assert rewrites() == 1
    approxbp_fx.disable()
    assert inductor_config.custom_partitioner_fn is None and not approxbp_fx.is_enabled()
    assert _bytes(model, x) == inductor
    assert enabled == _bytes(model, x, backend="approxbp") < inductor


class _Recording(CustomPartitionerFn):
    """A user's own partitioner: records the call and partitions as inductor does."""

    def __init__(self):
        self.calls = 0

    def __call__(self, gm, joint_inputs, **kwargs):
        from torch._functorch.partitioners import min_cut_rematerialization_partition

        self.calls += 1
        return min_cut_rematerialization_partition(gm, joint_inputs, **kwargs)

    def uuid(self):
        return "recording"


def test_enable_chains_an_installed_partitioner_and_disable_gives_it_back():
    mine = _Recording()
    inductor_config.custom_partitioner_fn = mine
    model, x = _model()
    approxbp_fx.enable()
    ours = _bytes(model, x)
    # Ours rewrote, and the user's partitioner still did the partitioning
    # (at least the baseline and the rewritten trial).
    assert rewrites() == 1 and mine.calls >= 2
    approxbp_fx.disable()
    assert inductor_config.custom_partitioner_fn is mine
    assert ours < _bytes(model, x)


def test_enable_twice_replaces_the_config_and_one_disable_restores():
    approxbp_fx.enable()
    approxbp_fx.enable(ApproxBPConfig(bits=3))
    hook = inductor_config.custom_partitioner_fn
    assert hook.cfg.bits == 3 and hook.inner is None
    approxbp_fx.disable()
    assert inductor_config.custom_partitioner_fn is None


def test_disable_refuses_to_clobber_a_partitioner_installed_after_enable():
    approxbp_fx.enable()
    mine = _Recording()
    inductor_config.custom_partitioner_fn = mine
    with pytest.raises(RuntimeError, match="replaced after enable"):
        approxbp_fx.disable()
    assert inductor_config.custom_partitioner_fn is mine


def test_disable_without_enable_is_a_no_op():
    approxbp_fx.disable()
    assert inductor_config.custom_partitioner_fn is None


def test_backend_by_name_under_enable_rewrites_once_with_its_own_config():
    approxbp_fx.enable(ApproxBPConfig(save_act_codes=False))
    model, x = _model()
    torch._dynamo.reset()
    fn = torch.compile(model, backend="approxbp")  # the backend's default config wins
    approxbp_fx.saved_activation_bytes(fn, x, params=model)
    assert rewrites() == 1


def test_enable_rejects_a_non_config():
    with pytest.raises(TypeError, match="ApproxBPConfig"):
        approxbp_fx.enable({"bits": 3})


@pytest.mark.parametrize(
    "value,expected",
    [
        ("", None), ("0", None), ("false", None), ("off", None), ("no", None), (" OFF ", None),
        ("1", ApproxBPConfig()), ("true", ApproxBPConfig()), ("on", ApproxBPConfig()), ("yes", ApproxBPConfig()),
        (" Yes ", ApproxBPConfig()),
        ("bits=3", ApproxBPConfig(bits=3)),
        ("bits=3, share_norm_input=0", ApproxBPConfig(bits=3, share_norm_input=False)),
        ("activations=gelu+silu", ApproxBPConfig(activations={"gelu", "silu"})),
        ("dtypes=bfloat16", ApproxBPConfig(dtypes={torch.bfloat16})),
        ("norm_share_dtype=input", ApproxBPConfig(norm_share_dtype="input")),
    ],
)
def test_config_from_env(value, expected):
    assert config_from_env(value) == expected


@pytest.mark.parametrize(
    "value,match",
    [("bitz=3", "unknown approxbp option"), ("bits", "key=value"), ("save_act_codes=maybe", "0/1/true/false"),
     ("bits=9", "1..4"), ("dtypes=bfloat", "not torch dtypes"), ("garbage", "not a key=value pair")],
)
def test_config_from_env_rejects_bad_values(value, match):
    with pytest.raises((ValueError, TypeError), match=match):
        config_from_env(value)


_SCRIPT = textwrap.dedent(
    """
    import torch
    from torch import nn
    from torch._dynamo.utils import counters
    from torch._functorch import config as fc

    fc.enable_autograd_cache = False
    model = nn.Sequential(nn.Linear(64, 200), nn.GELU(), nn.Linear(200, 64))
    model[2].requires_grad_(False)
    torch.compile(model)(torch.randn(5, 29, 64)).sum().backward()   # plain torch.compile, no approxbp import
    print("REWRITES", counters["approxbp"]["save_act_codes"])
    """
)


def _run(env_value):
    env = {k: v for k, v in os.environ.items() if k != "APPROXBP_FX_AUTO"}
    if env_value is not None:
        env["APPROXBP_FX_AUTO"] = env_value
    return subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=300)


def test_environment_variable_applies_the_pass_to_an_unedited_script():
    on, off = _run("1"), _run(None)
    assert on.returncode == 0, on.stderr[-2000:]
    assert off.returncode == 0, off.stderr[-2000:]
    assert "REWRITES 1" in on.stdout
    assert "REWRITES 0" in off.stdout


def test_a_bad_environment_variable_fails_import_torch_with_the_reason():
    bad = _run("bitz=3")
    assert bad.returncode != 0
    assert "unknown approxbp option" in bad.stderr and "bitz" in bad.stderr


def test_a_bad_environment_variable_has_the_last_word_with_every_accepted_value():
    bad = _run("garbage")
    assert bad.returncode != 0
    # torch wraps an entry point's Exception in its own "Failed to load the
    # backend extension"; the user must read our reason and the fix last.
    last = bad.stderr.strip().splitlines()[-1]
    assert last.startswith("approxbp_fx_autoload.AutoloadError: APPROXBP_FX_AUTO='garbage'"), bad.stderr[-2000:]
    assert 'off: "", 0, false, off, no;' in last
    assert "on with the defaults: 1, true, on, yes;" in last
    assert "key=value" in last
    fields = [f.name for f in dataclasses.fields(ApproxBPConfig)]
    assert all(name in last for name in fields), last
