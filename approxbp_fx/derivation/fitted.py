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

subject to ``level[0] = 0`` only.  This is Lloyd-Max quantisation of
``h'(X)`` with cells that are intervals *in x*: ``h'`` is not monotone (GELU's
dips to -0.13 and peaks at 1.13), so cells of nearest level in ``h'`` would not
be intervals, and the codes must be ``code(x) = #{i : x > c_i}``.

Dropped from the paper: ``sum a = 1`` and ``sum a c = 0``, i.e. ``h~`` need
not track ``h`` in the tails.  So ``level[n] = E[h' | X > c_n]`` (1.05 for
2-bit GELU: its cell contains the hump of ``h'`` above 1).  Kept:
``level[0] = 0``, so ``h~ = sum a_i ReLU(x - c_i)`` with ``level[j] = a_1 + ...
+ a_j`` exactly as the paper's tables (same codes, same kernels, same bytes),
and the gradient far left is 0 as ``h'`` is.  The free ``level[0]`` would be
the conditional mean on ``C_0`` (-0.05 for 2-bit GELU) and buys 0.0006 of
per-element cosine at 2 bits: not worth a second representation.

``SIGMA = 1``: LayerNorm'd inputs times initialised weights give
pre-activations of order 1; docs/fidelity.md measures the per-element cosine
of these tables at ``sigma`` 0.5-3 and on real models' pre-activations.

Levels for fixed knots
----------------------
``J`` is a convex quadratic in the free levels; its minimiser is the
conditional mean, ``level[j] = m1_j / m0_j`` with ``m0_j = P(X in C_j)`` and
``m1_j = E[h'(X); X in C_j]``.  Then

    J*(c) = E[h'**2] - sum_{j >= 1} m1_j**2 / m0_j.

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

Floats: ``c`` and ``a_j = level[j] - level[j-1]``, each correctly rounded from
the polished values.  ``python -m approxbp_fx.derivation.fitted`` re-derives
every table and prints the ``_FITTED`` literal of approxbp_fx/coefficients.py.
"""

from __future__ import annotations

import math
from typing import Sequence

import mpmath as mp

from ..activations import ACTIVATIONS, check_activation
from ..coefficients import BITS, StepTable, _check_bits
from .fitted_cells import CellPoint, Derivative
from .linalg import is_positive_definite
from .literal import format_literal
from .newton import best_of, newton

__all__ = ["SIGMA", "derive", "objective", "cosine"]

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
        lv = pt.levels
        a = tuple(float(hi - lo) for lo, hi in zip(lv, lv[1:]))
        c = tuple(float(v) for v in pt.c)
    return StepTable(activation, bits, a, c, "fitted")


def _starts(n: int, sigma) -> list[list[float]]:
    """Knots at the ``k / (n + 1)`` quantiles of ``N(0, (scale sigma)**2)``."""
    q = [math.sqrt(2) * float(mp.erfinv(mp.mpf(2 * k) / (n + 1) - 1)) for k in range(1, n + 1)]
    return [[float(scale) * sigma * v for v in q] for scale in _SCALES]


def _moments(activation: str, a: Sequence[float], c: Sequence[float], sigma):
    """``(E[h'^2], E[h' s], E[s^2])`` for the step derivative of slopes ``a``, knots ``c``."""
    act = Derivative(activation, sigma)
    levels = [mp.fsum(a[:j]) for j in range(len(a) + 1)]
    edges = [-mp.inf] + [mp.mpf(v) for v in c] + [mp.inf]
    cells = list(zip(edges, edges[1:]))
    cross = mp.fsum(lv * act.moment(lo, hi) for lv, (lo, hi) in zip(levels, cells))
    step = mp.fsum(lv**2 * act.mass(lo, hi) for lv, (lo, hi) in zip(levels, cells))
    return act.second, cross, step


def objective(activation: str, a: Sequence[float], c: Sequence[float], sigma=SIGMA) -> float:
    """``J = E[(h'(X) - s(X))**2]``, ``X ~ N(0, sigma**2)``, for any table's ``a``, ``c``."""
    check_activation(activation)
    with mp.workdps(_DPS):
        d2, cross, step = _moments(activation, a, c, sigma)
        return float(d2 - 2 * cross + step)


def cosine(activation: str, a: Sequence[float], c: Sequence[float], sigma=SIGMA) -> float:
    """Per-element cosine ``E[h' s] / sqrt(E[h'^2] E[s^2])`` under ``N(0, sigma**2)``:
    how well the step derivative points along the exact one, scale aside."""
    check_activation(activation)
    with mp.workdps(_DPS):
        d2, cross, step = _moments(activation, a, c, sigma)
        return float(cross / mp.sqrt(d2 * step))


def _literal(tables) -> str:
    """The ``_FITTED = {...}`` block of approxbp_fx/coefficients.py for ``tables``."""
    return format_literal("_FITTED", tables, objective)


def main() -> None:
    """Re-derive every table of this family and print its literal."""
    print(_literal(derive(name, bits) for name in ACTIVATIONS for bits in BITS))


if __name__ == "__main__":
    main()
