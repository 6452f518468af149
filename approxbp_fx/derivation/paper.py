r"""The paper's table family: knots and slopes of ``h~`` minimising ``int (h - h~)**2``.

Approx-BP (Yang et al., ICML 2024, arXiv:2406.16282) keeps an activation's exact
forward ``h(x)`` but back-propagates through the derivative of the
piecewise-linear

    h~(x) = sum_{i=1..n} a_i ReLU(x - c_i),     n = 2**bits - 1,  c_1 < ... < c_n,

so backward needs only ``code(x) = #{i : x > c_i}`` (``bits`` bits per element)
and the derivative levels ``level[j] = a_1 + ... + a_j`` (``level[0] = 0``).

Objective
---------
``(a, c)`` minimise the paper's

    J(a, c) = integral over R of (h(x) - h~(x))**2 dx
    subject to   sum_i a_i = 1,   sum_i a_i c_i = 0.

The constraints are exactly what makes ``J`` finite: left of ``c_1``, ``h~ = 0``
and ``h -> 0``; right of ``c_n``, ``h~(x) = (sum a) x - sum a c`` must be the
asymptote ``x`` of ``h``.  Hence ``level[n] = 1``.

Symmetry
--------
All four activations are ``h(x) = x s(x)`` with a gate satisfying
``s(-x) = 1 - s(x)`` (``Phi``; ``sigmoid(beta x)``; ``sigmoid`` of an odd
polynomial for the tanh GELU).  So the residual ``r = h - ReLU`` is exactly even,
``r(x) = -|x| s(-|x|)``, and ``J`` is invariant under the reflection
``(a_i, c_i) -> (a_{n+1-i}, -c_{n+1-i})``.  Minimisers are therefore either
mirror symmetric (then the middle knot of the odd count ``n`` sits at 0) or
come in mirror pairs.  Both happen: the best 2- and 4-bit minima are symmetric (the
paper's ReGELU2 asymmetry, ``c = (-3.18588, -0.00118, 3.19083)``, is search
noise at a higher ``J``), but for 3-bit ``gelu`` / ``gelu_tanh`` an asymmetric
pair (1 outer knot left, 4 inner, 2 outer right, none at 0) beats the best
symmetric set by 16-18%.  We ship the member of a pair whose knots sum to > 0.
``bits = 1`` is degenerate: one knot, and the constraints force ``a = (1,)``,
``c = (0,)``, i.e. ``h~ = ReLU``.

Splitting off the ReLU
----------------------
With ``g = h~ - ReLU`` (piecewise linear, zero outside ``[c_1, c_n]`` on the
constraint set) the error is ``h - h~ = r - g`` and

    J = int r**2  -  2 sum_i a_i T(c_i)  +  2 T(0)  +  int g**2,
    S0(t) = int_t^inf r(x) dx,   T(t) = int_t^inf r(x) (x - t) dx,
    T' = -S0,   S0' = -r.

``S0``, ``T`` have closed forms for ``gelu`` (``Phi``, ``phi``) and for ``silu``
and ``quick_gelu`` (``log1p``, ``Li2``, ``Li3``); ``gelu_tanh`` uses
``mpmath.quad``.  Evenness of ``r`` gives the values at ``-t`` from those at ``t``.
``int g**2 = w' G w`` with weights ``w = (a, -1)`` on knots ``(c, 0)`` and the
closed-form Gram matrix ``G_pq = int_{max(k_p, k_q)}^K (x - k_p)(x - k_q) dx`` of
the ramps, cut off at any ``K`` beyond all knots (``K`` drops out of ``J`` on
the constraint set, so it may change from one set of knots to the next).

Slopes for fixed knots: a KKT system
------------------------------------
For fixed ``c``, ``J`` is a strictly convex quadratic in ``a`` (a Gram form of
linearly independent ramps) under two linear constraints, so ``a*(c)`` is the
unique solution of

    [ 2G   1   c ] [ a  ]   [ 2 (G_{i0} + T(c_i)) ]
    [ 1'   0   0 ] [ l1 ] = [ 1                   ]
    [ c'   0   0 ] [ l2 ]   [ 0                   ]

(``G_{i0}``: ramp ``i`` against the ReLU ramp), solved exactly in mpmath.

Knots: Newton on the reduced objective
--------------------------------------
``J*(c) = J(a*(c), c)`` is smooth in ``c`` (``C^2`` with a Lipschitz Hessian).
By the envelope theorem

    dJ*/dc_i = a_i (2 int_{c_i}^inf (h - h~) dx + l2),

so at the optimum the tail integral of the error is the same at every knot.
Its Hessian is the Schur complement of the bordered Hessian of the Lagrangian
(implicit differentiation of the KKT system).  We run Newton's method on
``J*`` over all ``n`` knots, with a Levenberg shift when the Hessian is not
positive definite, Armijo back-tracking and ascending knots.

``J*`` has many local minima (about 30 for 4 bits), which differ in how many
knots sit left of ``-z0``, between, and right of ``z0``, where ``h''(z0) = 0``:
outside ``[-z0, z0]`` ``h''`` and the optimal slopes are negative.  So the
start is deterministic but not unique: for every split ``(qL, p, qR)`` of the
``n`` knots (``qL <= qR``, mirror images being redundant) each group is put at
quantiles of de Boor's asymptotically optimal knot density ``|h''|**(2/5)``
(for L2 fits by linear splines) within its region.  Each start runs in double
precision (``mpmath.fp``: enough to rank the minima, whose ``J`` differ by
percents), the lowest ``J`` is polished at ``_DPS`` digits, and the result is
accepted only if the Hessian of ``J*`` is positive definite there (a strict
local minimum).  Floats are the correctly rounded mpmath values; a symmetric
minimiser is mirrored exactly (pairs of knots negate, paired slopes are equal),
and the smallest slopes would be nudged by ulps if needed so that
``math.fsum(a) == 1.0`` (hence ``levels[-1] == 1.0``; no shipped table needed it).

Where it lives: the tail moments in residual.py, the KKT point and the
derivatives of ``J*`` in paper_kkt.py, the starts in starts.py, Newton in
newton.py; this module ties them together.  ``python -m
approxbp_fx.derivation.paper`` re-derives every table and prints the
``_SHIPPED`` literal of approxbp_fx/coefficients.py.
"""

from __future__ import annotations

import math
from typing import Sequence

import mpmath as mp

from ..activations import ACTIVATIONS, check_activation
from ..coefficients import BITS, StepTable, _check_bits
from .gates import mirror
from .linalg import is_positive_definite
from .literal import format_literal
from .newton import best_of, newton
from .paper_kkt import Point
from .residual import Residual
from .starts import knot_starts

__all__ = ["derive", "objective", "optimal_slopes"]

_TOL_SEARCH = "1e-7"  # Newton step length ending a (double precision) start
_DPS = 40  # polish and optimal_slopes(): the Gram form cancels ~10 digits
_DPS_OBJECTIVE = 30  # plain quadrature of (h - h~)^2: no cancellation
_FEASIBILITY_TOL = 1e-10


def derive(activation: str, bits: int) -> StepTable:
    """Re-derive the table for ``activation`` at ``bits`` bits from scratch.

    Deterministic (no random search): multi-start Newton on ``J*`` as the
    module docstring describes; the floats are those
    :func:`approxbp_fx.coefficients.table` ships.
    Takes ~0.1 s (2 bits) to several seconds (4 bits: ~60 starts).
    """
    check_activation(activation)
    _check_bits(bits)
    if bits == 1:
        return StepTable(activation, 1, (1.0,), (0.0,))
    # Ranking the minima needs far less than the final accuracy.
    best = best_of(Residual(activation, mp.fp), Point, knot_starts(activation, 2**bits - 1), _TOL_SEARCH)
    if best is None:  # pragma: no cover
        raise RuntimeError(f"no start converged for {activation!r}, {bits} bits")
    with mp.workdps(_DPS):
        # Quadratic convergence: the step after a 1e-30 one is far below 1e-40.
        pt = newton(Residual(activation), Point, best.c, tol="1e-30")
        _, H = pt.derivatives()
        if not is_positive_definite(H):  # pragma: no cover
            raise RuntimeError(f"{activation!r}, {bits} bits: Newton stopped at a saddle of J*")
        a, c = _rounded(pt)
    return StepTable(activation, bits, a, c)


def _rounded(pt: Point):
    """Floats of a minimiser, in a canonical orientation, with ``fsum(a) == 1.0``.

    A mirror-symmetric minimiser is made exactly symmetric (its asymmetry is
    rounding noise); of an asymmetric mirror pair we ship the one whose knots
    sum to > 0.
    """
    n = pt.n
    a, c = list(pt.a), list(pt.c)
    noise = mp.mpf(10) ** (20 - mp.mp.dps)
    symmetric = all(abs(c[i] + c[n - 1 - i]) < noise and abs(a[i] - a[n - 1 - i]) < noise for i in range(n))
    if symmetric:
        # Averaging with the mirror image removes rounding-level asymmetry only.
        c = [(c[i] - c[n - 1 - i]) / 2 for i in range(n)]
        a = [(a[i] + a[n - 1 - i]) / 2 for i in range(n)]
    elif mp.fsum(c) < 0:
        c, a = mirror(c), a[::-1]
    a = [float(v) for v in a]
    c = tuple(float(v) for v in c)
    # Nudge the smallest slope(s) (finest ulp; both of a mirror pair) so that
    # the slopes fsum to exactly 1.
    k = min(range(n), key=lambda i: (abs(a[i]), i))
    pair = {k, n - 1 - k} if symmetric else {k}
    for _ in range(64):
        s = math.fsum(a)
        if s == 1.0:
            break
        for i in pair:
            a[i] = math.nextafter(a[i], math.inf if s < 1.0 else -math.inf)
    else:  # pragma: no cover
        raise RuntimeError("could not round the slopes to sum to 1")
    return tuple(a), c


def objective(activation: str, a: Sequence[float], c: Sequence[float]) -> float:
    """``J(a, c) = int (h - h~)**2 dx`` over R, by mpmath quadrature.

    Knots may come in any order (``h~`` does not care).  If the constraints are
    violated (beyond a relative ``1e-10`` that absorbs float rounding) the
    integral diverges and the result is ``inf``; within the tolerance the tails
    are integrated as if they held exactly (``h~ = 0`` left of the knots,
    ``h~ = x`` right of them).  Round published constants onto the constraints
    (or use :func:`optimal_slopes`) before comparing them.
    """
    check_activation(activation)
    a, c = _validated_pairs(a, c)
    with mp.workdps(_DPS_OBJECTIVE):
        A = [mp.mpf(v) for v in a]
        C = [mp.mpf(v) for v in c]
        if _infeasible(a, c, A, C):
            return math.inf
        return float(_error_integral(Residual(activation), A, C))


def _validated_pairs(a, c):
    a = [float(v) for v in a]
    c = [float(v) for v in c]
    if len(a) != len(c) or not a:
        raise ValueError(f"need as many slopes as knots (at least one), got {len(a)} and {len(c)}")
    if not all(math.isfinite(v) for v in a + c):
        raise ValueError("slopes and knots must be finite")
    return a, c


def _infeasible(a, c, A, C) -> bool:
    """``sum a != 1`` or ``sum a c != 0`` beyond rounding: then a tail of
    ``(h - h~)**2`` is not integrable."""
    slope_excess = abs(mp.fsum(A) - 1)  # the right tail grows like this times x
    offset = abs(mp.fsum(ai * ci for ai, ci in zip(A, C)))  # ... or tends to this constant
    return slope_excess > _FEASIBILITY_TOL * max(1, sum(map(abs, a))) or offset > _FEASIBILITY_TOL * max(
        1, sum(abs(ai * ci) for ai, ci in zip(a, c))
    )


def _error_integral(act: Residual, A, C):
    """``int (h - h~)**2`` for slopes ``A`` and knots ``C`` on the constraints."""
    mpf = mp.mpf
    lo, hi = min(min(C), mpf(0)), max(max(C), mpf(0))

    def r2(x):
        return act.r(x) ** 2

    # h - h~ = r - g, and g = h~ - ReLU vanishes outside [lo, hi]; r is even.
    J = mp.quad(r2, [-lo, -lo + 4, mp.inf]) + mp.quad(r2, [hi, hi + 4, mp.inf])
    points = sorted(set(C) | {lo, hi, mpf(0)})
    for left, right in zip(points, points[1:]):
        # g is linear between breakpoints: slope and intercept of the
        # ramps (and the ReLU) that have started.
        slope = mp.fsum(ai for ai, ci in zip(A, C) if ci <= left) - (1 if left >= 0 else 0)
        icept = -mp.fsum(ai * ci for ai, ci in zip(A, C) if ci <= left)
        J += mp.quad(lambda x: (act.r(x) - icept - slope * x) ** 2, [left, right])
    return J


def optimal_slopes(activation: str, c: Sequence[float]) -> tuple[float, ...]:
    """The slopes ``a*(c)`` minimising ``J(a, c)`` for fixed knots (the KKT
    solve of the module docstring); ``c`` strictly ascending."""
    check_activation(activation)
    c = [float(v) for v in c]
    if not c or not all(math.isfinite(v) for v in c) or any(lo >= hi for lo, hi in zip(c, c[1:])):
        raise ValueError(f"knots must be finite and strictly ascending, got c={tuple(c)}")
    if len(c) == 1 and c[0] != 0.0:
        raise ValueError(f"a single knot must be at 0 (sum a c = 0 with sum a = 1), got c={tuple(c)}")
    with mp.workdps(_DPS):
        pt = Point(Residual(activation), [mp.mpf(v) for v in c])
        return tuple(float(v) for v in pt.a)


def _literal(tables) -> str:
    """The ``_SHIPPED = {...}`` block of approxbp_fx/coefficients.py for ``tables``."""
    return format_literal("_SHIPPED", tables, lambda tab: objective(tab.activation, tab.a, tab.c))


def main() -> None:
    """Re-derive every table of this family and print its literal."""
    print(_literal(derive(name, bits) for name in ACTIVATIONS for bits in BITS))


if __name__ == "__main__":
    main()
