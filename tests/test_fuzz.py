"""Random networks through approxbp: forward, gradients, saved bytes, report.

The generator lives in benchmarks/_fuzz_nets.py, the check in benchmarks/_fuzz_check.py (its docstring
says how each activation's decision is mapped back to its module and how
code flips and dropout are handled); benchmarks/fuzz.py runs the same check
for as long as one likes. CI runs a few derandomized examples per tier, so
every run sees the same networks; widen locally with
``--hypothesis-seed=N`` and a larger ``max_examples``.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, assume, given, settings

from benchmarks import _fuzz_check as fuzz_check
from benchmarks._fuzz_check import Ambiguous, check
from benchmarks._fuzz_nets import Block, NetSpec, net_specs

_SETTINGS = dict(deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])


def _check(spec: NetSpec, tier: str) -> dict:
    try:
        return check(spec, tier)
    except Ambiguous:
        assume(False)  # an element at a code threshold: not evidence either way


# Climb: aot_eager runs the rewritten graphs op by op (the pass and the
# partitioner, no code generation), cheap enough for more and larger nets...
@settings(max_examples=8, **_SETTINGS)
@given(spec=net_specs(max_blocks=3))
def test_fuzz_aot_eager(spec):
    _check(spec, "aot_eager")


# ...inductor is the product, at ~10 s of C++ compilation per network.
@settings(max_examples=2, **_SETTINGS)
@given(spec=net_specs(max_blocks=2))
def test_fuzz_inductor(spec):
    _check(spec, "inductor")


# A net where both rules certainly pay: fc2 frozen, so the GELU's output is
# not needed by backward and codes replace its input; the LayerNorm feeds a
# trainable Linear, which saves x̂ anyway.
_PAYS = NetSpec(
    d_in=24,
    blocks=(Block(kind="mlp", width=61, act="nn.GELU", norm="nn.LayerNorm", residual=True, frozen=(False, True)),),
    tokens=(2, 37),
    dtype="float32",
    input_grad=True,
)


@pytest.mark.parametrize("tier", ["aot_eager", "inductor"])
def test_fixed_net_is_rewritten_and_passes(tier):
    # Guards the fuzz tests above: a check that never sees a rewritten site
    # would pass on exact gradients alone.
    summary = check(_PAYS, tier)
    assert summary["act_rewritten"] == summary["act_sites"] == 1
    assert summary["norm_rewritten"] == summary["norm_sites"] == 1
    assert summary["saved_approxbp"] < summary["saved_peer"]


def test_check_fails_with_the_wrong_reference(monkeypatch):
    # The gradient oracle tells the step derivative from the exact one in
    # float32: with a reference that approximates nothing, check() must fail.
    monkeypatch.setattr(fuzz_check, "reference", lambda model, approximated, bits: fuzz_check.copy.deepcopy(model))
    with pytest.raises(AssertionError, match="gradients differ from the eager reference"):
        check(_PAYS, "aot_eager")
