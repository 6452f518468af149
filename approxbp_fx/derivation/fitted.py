r"""The derivative-fitted table family: a step function fitted to ``h'`` where inputs fall.

The paper (paper.py) fits ``h~`` to ``h`` over the whole line.  At 2 bits its
tables are nearly 1-bit: the outer knots sit at +-3.17 (GELU) and +-6.32
(SiLU), where few pre-activations fall, and near 0 the step derivative is
the 1-bit ``0 / 1``.  What backward uses is the derivative, at the inputs
the network produces.  This family fits it there.

Objective
---------
With ``n = 2**bits - 1`` ascending knots ``c``, cells ``C_0 = (-inf, c_1)``,
``C_j = (c_j, c_{j+1})``, ``C_n = (c_n, inf)`` and the step derivative
``s(x) = level[j]`` on ``C_j``, minimise the expected squared error of the
derivative

    J(level, c) = E[(h'(X) - s(X))**2],    X ~ N(0, sigma**2),  sigma = SIGMA = 1,

unconstrained.  This is Lloyd-Max quantisation of ``h'(X)`` with cells that
are intervals *in x*: ``h'`` is not monotone (GELU's dips to -0.13 and peaks
at 1.13), so cells of nearest level in ``h'`` would not be intervals, and the
codes must be ``code(x) = #{i : x > c_i}``.

Dropped from the paper: ``sum a = 1`` and ``sum a c = 0`` (``h~`` need not
track ``h`` in the tails, so ``level[n] = E[h' | X > c_n]``, 1.05 for 2-bit
GELU, whose top cell holds the hump of ``h'`` above 1) and ``level[0] = 0``
(``level[0] = E[h' | X < c_1]``, -0.046 for 2-bit GELU, where ``h'`` dips
below 0).  The table keeps the paper's form with one more term,
``h~(x) = a0 x + sum a_i ReLU(x - c_i)`` (``level[j] = a0 + a_1 + ... + a_j``):
same codes, same kernels, same bytes.  The tails are safe: ``h'`` lies in
[-0.13, 1.13] (SiLU: [-0.10, 1.10]) and the end levels are its mean over the
end cells, so far out the step is off by at most ``|level[0]|`` on the left
(``h' -> 0``) and ``|level[n] - 1|`` on the right.  Pinning ``level[0] = 0``
costs 0.0006 of per-element cosine under N(0, 1) but 0.005 under MiniLM's
GELU inputs (mean -0.74, std 1.0: much of their mass is where ``h' < 0``),
and the pretrained MiniLM's whole-model gradient cosine 0.987-0.989 against
0.991-0.993 (docs/fidelity.md).

``SIGMA = 1``: one fixed table for every site.  Random-init transformers feed
their MLPs inputs of std ~0.22, pretrained MiniLM mean -0.74 and std 1.0.  At
2 bits the N(0, 1) table keeps a per-element cosine >= 0.980 over sigma in
[0.25, 3]; a table fitted to sigma = 0.25 gains 0.013 there but falls to
0.95 at sigma = 1 (GELU; SiLU 0.94), because its knots shrink to +-0.23
(docs/fidelity.md has the figures).  The knots of the N(0, 1) fit sit where
``h'`` bends, and a scale is not known per site without a calibration pass.

Symmetry: ``h'(-x) = 1 - h'(x)`` and the density is even, so ``J`` is
invariant under ``(c, level) -> (-reversed(c), 1 - reversed(level))``.  A
symmetric minimiser is shipped exactly symmetric (middle knot at 0); an
asymmetric one in the orientation whose knots sum to >= 0, as the paper's
family does.

Levels for fixed knots
----------------------
``J`` is a convex quadratic in the free levels; its minimiser is the
conditional mean, ``level[j] = m1_j / m0_j`` with ``m0_j = P(X in C_j)`` and
``m1_j = E[h'(X); X in C_j]``.  Then

    J*(c) = E[h'**2] - sum_j m1_j**2 / m0_j.

Knots: Newton on J*
-------------------
Moving knot ``c_k`` hands the mass at ``c_k`` from its right cell (level
``R``) to its left one (``L``); the levels are stationary (envelope theorem), so

    dJ*/dc_k = phi(c_k) (R - L) (2 h'(c_k) - L - R),

and at a minimum ``h'(c_k) = (L + R)/2``: the Lloyd-Max threshold condition,
with ``h'`` in place of the identity.  ``J*`` couples only neighbouring knots,
so its Hessian is tridiagonal (fitted_cells.py has the entries, from
``d level_j / d edge = +-phi(edge) (h'(edge) - level_j) / m0_j``).  As for the
paper's family, multi-start Newton (newton.py: Levenberg shift, Armijo,
ascending knots) runs in double precision from a few starts (quantiles of
``N(0, sigma**2)`` at three scales), and the lowest ``J`` is polished at 30
digits and accepted only where the Hessian is positive definite.

Floats: ``c``, ``a0 = level[0]`` and ``a_j = level[j] - level[j-1]``, each
correctly rounded from the polished values.  ``python -m approxbp_fx.derivation.fitted`` re-derives
every table and prints the ``_FITTED`` literal of approxbp_fx/coefficients.py.
"""

from __future__ import annotations

import math

import mpmath as mp

from ..activations import ACTIVATIONS, check_activation
from ..coefficients import BITS, StepTable, _check_bits
from .fitted_cells import CellPoint, Derivative
from .gates import mirror
from .linalg import is_positive_definite
from .literal import format_literal
from .newton import best_of, newton

__all__ = ["SIGMA", "derive", "objective", "relative_error", "cosine"]

SIGMA = 1  # the input distribution N(0, SIGMA**2); module docstring and docs/fidelity.md
_SCALES = ("0.5", "1", "2")  # starts: quantiles of N(0, (scale * SIGMA)**2)
_TOL_SEARCH = "1e-7"
_DPS = 30


def derive(activation: str, bits: int, sigma=SIGMA) -> StepTable:
    """Re-derive the fitted table for ``activation`` at ``bits`` bits (deterministic).

    ``sigma`` other than :data:`SIGMA` gives the table fitted to
    ``N(0, sigma**2)`` (for measurements; only ``SIGMA`` is shipped).
    """
    check_activation(activation)
    _check_bits(bits)
    n = 2**bits - 1
    best = best_of(Derivative(activation, sigma, mp.fp), CellPoint, _starts(n, sigma), _TOL_SEARCH)
    if best is None:  # pragma: no cover
        raise RuntimeError(f"no start converged for {activation!r}, {bits} bits")
    with mp.workdps(_DPS):
        pt = newton(Derivative(activation, sigma), CellPoint, best.c, tol="1e-20")
        _, H = pt.derivatives()
        if not is_positive_definite(H):  # pragma: no cover
            raise RuntimeError(f"{activation!r}, {bits} bits: Newton stopped at a saddle of J*")
        c, lv = _canonical(list(pt.c), list(pt.levels))
        a = tuple(float(hi - lo) for lo, hi in zip(lv, lv[1:]))
    return StepTable(activation, bits, a, tuple(float(v) for v in c), "fitted", a0=float(lv[0]))


def _canonical(c, lv):
    """A mirror-symmetric minimiser made exactly symmetric (its asymmetry is
    rounding noise: the middle knot at 0, not 1e-31); of an asymmetric mirror
    pair, the member whose knots sum to >= 0."""
    mc, ml = mirror(c), [1 - v for v in reversed(lv)]
    noise = mp.mpf(10) ** (10 - mp.mp.dps)
    if all(abs(u - v) < noise for u, v in zip(c + lv, mc + ml)):
        return [(u + v) / 2 for u, v in zip(c, mc)], [(u + v) / 2 for u, v in zip(lv, ml)]
    return (mc, ml) if mp.fsum(c) < 0 else (c, lv)


def _starts(n: int, sigma) -> list[list[float]]:
    """Knots at the ``k / (n + 1)`` quantiles of ``N(0, (scale sigma)**2)``."""
    q = [math.sqrt(2) * float(mp.erfinv(mp.mpf(2 * k) / (n + 1) - 1)) for k in range(1, n + 1)]
    return [[float(scale) * sigma * v for v in q] for scale in _SCALES]


def _moments(tab: StepTable, sigma):
    """``(E[h'^2], E[h' s], E[s^2])`` for the step derivative of ``tab``."""
    act = Derivative(tab.activation, sigma)
    levels = [mp.fsum([tab.a0, *tab.a[:j]]) for j in range(len(tab.a) + 1)]
    edges = [-mp.inf] + [mp.mpf(v) for v in tab.c] + [mp.inf]
    cells = list(zip(edges, edges[1:]))
    cross = mp.fsum(lv * act.moment(lo, hi) for lv, (lo, hi) in zip(levels, cells))
    step = mp.fsum(lv**2 * act.mass(lo, hi) for lv, (lo, hi) in zip(levels, cells))
    return act.second, cross, step


def objective(tab: StepTable, sigma=SIGMA) -> float:
    """``J = E[(h'(X) - s(X))**2]``, ``X ~ N(0, sigma**2)``, for any table (either family)."""
    with mp.workdps(_DPS):
        d2, cross, step = _moments(tab, sigma)
        return float(d2 - 2 * cross + step)


def relative_error(tab: StepTable, sigma=SIGMA) -> float:
    """``J / E[h'(X)**2]``: 0 for the exact derivative, 1 for the all-zero step."""
    with mp.workdps(_DPS):
        d2, cross, step = _moments(tab, sigma)
        return float((d2 - 2 * cross + step) / d2)


def cosine(tab: StepTable, sigma=SIGMA) -> float:
    """Per-element cosine ``E[h' s] / sqrt(E[h'^2] E[s^2])`` under ``N(0, sigma**2)``:
    how well the step derivative points along the exact one, scale aside."""
    with mp.workdps(_DPS):
        d2, cross, step = _moments(tab, sigma)
        return float(cross / mp.sqrt(d2 * step))


def _literal(tables) -> str:
    """The ``_FITTED = {...}`` block of approxbp_fx/coefficients.py for ``tables``."""
    return format_literal("_FITTED", tables, objective, with_a0=True)


def main() -> None:
    """Re-derive every table of this family and print its literal."""
    print(_literal(derive(name, bits) for name in ACTIVATIONS for bits in BITS))


if __name__ == "__main__":
    main()
