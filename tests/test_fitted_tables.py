"""The derivative-fitted tables (coefficients._FITTED) and their derivation,
approxbp_fx.derivation.fitted: Lloyd-Max on h' under N(0, 1).

The maths is checked against independent float64 torch numerics (a grid
quadrature of h' against the density), not against the derivation's own
mpmath code.
"""

from __future__ import annotations

import math

import mpmath as mp
import pytest
import torch

import approxbp_fx
from approxbp_fx import ApproxBPConfig
from approxbp_fx import coefficients as C
from approxbp_fx.activations import ACTIVATIONS, exact_derivative
from approxbp_fx.codes import step_derivative
from approxbp_fx.coefficients import BITS, DEFAULT_TABLE, TABLES, table
from approxbp_fx.derivation import fitted
from approxbp_fx.derivation.fitted_cells import CellPoint, Derivative
from approxbp_fx.eager import ApproxActivation
from tests.conftest import MLP

ALL = [(name, bits) for name in ACTIVATIONS for bits in BITS]


def _fitted(name: str, bits: int):
    return table(name, bits, "fitted")


@pytest.mark.parametrize("name,bits", ALL)
def test_derive_reproduces_shipped_table(name, bits):
    shipped, fresh = _fitted(name, bits), fitted.derive(name, bits)
    assert fresh.family == "fitted" and (fresh.activation, fresh.bits) == (name, bits)
    assert fresh.a == pytest.approx(shipped.a, abs=1e-9, rel=0)
    assert fresh.c == pytest.approx(shipped.c, abs=1e-9, rel=0)
    assert fresh.a0 == pytest.approx(shipped.a0, abs=1e-9, rel=0)


def test_literal_round_trips():
    """The `python -m approxbp_fx.derivation.fitted` printer reproduces _FITTED exactly."""
    ns: dict = {}
    exec(fitted._literal(_fitted(name, bits) for name, bits in ALL), ns)
    assert ns["_FITTED"] == C._FITTED
    assert list(ns["_FITTED"]) == ALL


def _simpson(f, lo: float, hi: float, n: int = 20_000) -> float:
    """int_lo^hi f by Simpson's rule in float64 (error ~1e-14 for these smooth integrands)."""
    x = torch.linspace(lo, hi, n + 1, dtype=torch.float64)
    w = torch.ones(n + 1, dtype=torch.float64)
    w[1:-1:2], w[2:-1:2] = 4, 2
    return ((hi - lo) / (3 * n) * (w * f(x)).sum()).item()


def _density(x):
    return torch.exp(-x * x / 2) / math.sqrt(2 * math.pi)


@pytest.mark.parametrize("name,bits", ALL)
def test_levels_are_conditional_means(name, bits):
    """Lloyd-Max, first condition: every level is E[h' | its cell], the end cells' included."""
    tab = _fitted(name, bits)
    assert len(tab.levels) == 2**bits and tab.family == "fitted"
    edges = [-12.0, *tab.c, 12.0]  # N(0, 1) mass beyond 12 is ~1e-33
    for j in range(len(tab.levels)):
        lo, hi = edges[j], edges[j + 1]
        mean = _simpson(lambda x: exact_derivative(name, x) * _density(x), lo, hi) / _simpson(_density, lo, hi)
        assert mean == pytest.approx(tab.levels[j], abs=1e-10)


@pytest.mark.parametrize("name,bits", ALL)
def test_thresholds_sit_where_h_prime_crosses_the_mid_level(name, bits):
    """Lloyd-Max, second condition: h'(c_k) = (level[k] + level[k+1]) / 2 (h' in place of x)."""
    tab = _fitted(name, bits)
    d = exact_derivative(name, torch.tensor(tab.c, dtype=torch.float64))
    mids = [(lo + hi) / 2 for lo, hi in zip(tab.levels, tab.levels[1:])]
    assert d.tolist() == pytest.approx(mids, abs=1e-9)


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_fitted_beats_paper_on_its_objective_and_on_cosine(name):
    """Per bits, E[(h' - s)^2] under N(0,1) is lower than the paper table's, and at
    2 bits the per-element cosine with h' is >= 0.985 at sigma 0.5, 1 and 3, where the
    paper's is below 0.95 at sigma 0.5 (its knots at +-3.2 / +-6.3 are nearly 1-bit)."""
    for bits in BITS:
        ours, theirs = _fitted(name, bits), table(name, bits, "paper")
        assert fitted.objective(ours) < fitted.objective(theirs)
    ours, theirs = _fitted(name, 2), table(name, 2, "paper")
    for sigma in (0.25, 0.5, 1, 3):
        assert fitted.cosine(ours, sigma) >= 0.98
    assert fitted.cosine(theirs, 0.5) < 0.95


def test_cosine_matches_an_independent_quadrature():
    tab = _fitted("gelu", 2)
    levels, c = torch.tensor(tab.levels, dtype=torch.float64), torch.tensor(tab.c, dtype=torch.float64)

    def step(x):
        return levels[torch.bucketize(x, c)]

    d = lambda x: exact_derivative("gelu", x)  # noqa: E731
    moments = [_simpson(lambda x: f(x) * _density(x), -12.0, 12.0, 480_000)
               for f in (lambda x: d(x) * step(x), lambda x: d(x) ** 2, lambda x: step(x) ** 2)]
    # The step's jumps cost Simpson's rule its order: 1e-7 at this grid.
    assert fitted.cosine(tab) == pytest.approx(moments[0] / math.sqrt(moments[1] * moments[2]), abs=1e-6)


@pytest.mark.parametrize("name", ["gelu", "silu"])
def test_gradient_and_hessian_of_j_star_match_finite_differences(name):
    act = Derivative(name, 1)
    with mp.workdps(30):
        c = [mp.mpf(v) for v in ("-0.7", "0.1", "0.9")]
        g, H = CellPoint(act, c).derivatives()
        e = mp.mpf("1e-10")
        for k in range(3):
            up, down = (CellPoint(act, [v + (s * e if i == k else 0) for i, v in enumerate(c)]) for s in (1, -1))
            assert float(g[k]) == pytest.approx(float((up.J - down.J) / (2 * e)), rel=1e-8)
            fd = [(a - b) / (2 * e) for a, b in zip(up.derivatives()[0], down.derivatives()[0])]
            assert [float(v) for v in H[k]] == pytest.approx([float(v) for v in fd], rel=1e-7, abs=1e-12)


def test_symmetric_under_the_mirror():
    """h'(-x) = 1 - h'(x) and N(0, 1) is even: every shipped minimiser is mirror symmetric,
    exactly (the middle knot at 0.0), so level[0] + level[n] = 1."""
    for name, bits in ALL:
        tab = _fitted(name, bits)
        assert tab.c == tuple(-v for v in reversed(tab.c))
        assert [lo + hi for lo, hi in zip(tab.levels, reversed(tab.levels))] == pytest.approx([1.0] * len(tab.levels))


def test_more_bits_fit_better():
    for name in ACTIVATIONS:
        js = [fitted.objective(_fitted(name, k)) for k in BITS]
        assert js == sorted(js, reverse=True)


def test_other_sigma_refits_and_n01_is_near_its_fit():
    """derive(sigma=3) fits inputs three times wider: better there than the shipped
    N(0, 1) table, but by little (the knots stay where h' bends, near 0)."""
    wide, ours = fitted.derive("gelu", 2, sigma=3), _fitted("gelu", 2)
    assert wide.c != ours.c
    assert fitted.objective(wide, sigma=3) < fitted.objective(ours, sigma=3)
    assert 0 < fitted.cosine(wide, sigma=3) - fitted.cosine(ours, sigma=3) < 0.003


def test_default_family_reaches_config_table_and_eager():
    assert DEFAULT_TABLE in TABLES and ApproxBPConfig().table == DEFAULT_TABLE
    assert table("gelu", 2) == table("gelu", 2, DEFAULT_TABLE)
    act = ApproxActivation("gelu", 2, family="paper")
    assert act.table.family == "paper" and "table='paper'" in repr(act)
    with pytest.raises(ValueError, match="unknown table family"):
        table("gelu", 2, "lloyd")


@pytest.mark.parametrize("family", TABLES)
def test_compiled_gradient_uses_the_configured_table(family):
    """One GELU site: the compiled gradient is g * level[code(x)] of that family's table, and
    the two families give different gradients from the same codes' width."""
    torch.manual_seed(0)
    x = torch.randn(64, 33, requires_grad=True)
    g = torch.randn(64, 33)
    fn = torch.compile(torch.nn.functional.gelu, backend=approxbp_fx.backend(ApproxBPConfig(table=family)))
    (gx,) = torch.autograd.grad(fn(x), x, g)
    want = g * step_derivative(x.detach(), table("gelu", 2, family))
    torch.testing.assert_close(gx, want, rtol=1e-6, atol=1e-6)
    other = table("gelu", 2, next(t for t in TABLES if t != family))
    assert not torch.allclose(gx, g * step_derivative(x.detach(), other))


def test_saved_bytes_do_not_depend_on_the_family():
    """Same bits, same codes: the table changes thresholds and levels, not what is saved."""
    torch.manual_seed(0)
    model, x = MLP(torch.nn.GELU(), d=32, hidden=128), torch.randn(4, 7, 32)
    saved = {
        family: approxbp_fx.saved_activation_bytes(
            torch.compile(model, backend=approxbp_fx.backend(ApproxBPConfig(table=family))), x, params=model
        )
        for family in TABLES
    }
    assert len(set(saved.values())) == 1, saved
