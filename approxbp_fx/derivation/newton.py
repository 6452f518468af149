"""Multi-start Newton on the knots of a reduced objective ``J*(c)``.

Family-agnostic: a family supplies ``point_at(act, c)``, an object at ascending
knots ``c`` with ``.c``, ``.J`` (``J*(c)``) and ``.derivatives()`` (gradient
and Hessian of ``J*``); ``act`` carries the mpmath context (``.ctx``) and its
exact sum (``.fsum``).  ``J*`` is assumed invariant under :func:`mirror`.
"""

from __future__ import annotations

from .gates import mirror
from .linalg import is_positive_definite, solve


class NoConvergence(ArithmeticError):
    pass


class KnownMinimum(Exception):
    """A start has entered the Newton basin of a minimum found before."""


def best_of(act, point_at, starts, tol):
    """The lowest ``J*`` reached by :func:`newton` from any of ``starts``.

    A start that enters the basin of a minimum found before is cut short, and
    one that runs into a degenerate knot set is dropped."""
    best = None
    found = []
    for c0 in starts:
        try:
            pt = newton(act, point_at, c0, tol=tol, known=found)
        except KnownMinimum:
            continue  # different start, same minimum: save its last steps
        except ArithmeticError:  # NoConvergence, a singular KKT system, overflow
            continue
        found.append(pt.c)
        if best is None or pt.J < best.J:
            best = pt
    return best


def newton(act, point_at, c0, tol, known=(), max_iter: int = 80):
    """Minimise ``J*`` from ascending knots ``c0`` until a full Newton step is
    shorter than ``tol``.  Raises :class:`KnownMinimum` once a full Newton
    step lands within 1e-4 of a knot vector in ``known`` or of its mirror image."""
    mp = act.ctx
    mpf = mp.mpf
    tol = mpf(tol)
    c = [mpf(v) for v in c0]
    pt = point_at(act, c)
    for _ in range(max_iter):
        g, H = pt.derivatives()
        d, shifted = _descent(mp, H, g)
        dn = mp.sqrt(act.fsum(v * v for v in d))
        slope = act.fsum(gi * di for gi, di in zip(g, d))
        # Near a minimum J* changes below its own rounding, so Armijo would
        # reject good steps: take full Newton steps there.
        local = not shifted and dn < mpf("1e-3")
        step = mpf(1)
        while True:
            cn = [v + step * dv for v, dv in zip(c, d)]
            if all(lo < hi for lo, hi in zip(cn, cn[1:])):
                new = point_at(act, cn)
                if local or new.J <= pt.J + mpf("1e-4") * step * slope:
                    break
            step /= 2
            if step * dn < tol:
                raise NoConvergence("line search failed")
        c, pt = cn, new
        if local and dn < tol:
            return pt
        if local and any(
            max(abs(u - v) for u, v in zip(c, k)) < mpf("1e-4") for k0 in known for k in (k0, mirror(k0))
        ):
            raise KnownMinimum
    raise NoConvergence(f"no convergence in {max_iter} Newton steps")


def _descent(mp, H, g):
    """The Newton direction for Hessian ``H`` and gradient ``g``, and whether
    ``H`` needed a Levenberg shift: shifted until positive definite, so it is a
    descent direction even where ``J*`` is not convex (far from a minimum)."""
    n = len(g)

    def plus(mu):
        return [[H[i][j] + (mu if i == j else 0) for j in range(n)] for i in range(n)]

    mu = mp.mpf(0)
    scale = max(abs(v) for row in H for v in row)
    while not is_positive_definite(plus(mu)):
        mu = 10 * mu if mu else scale * mp.mpf(10) ** -8
    (d,) = solve(plus(mu), [[-v for v in g]])
    return d, mu != 0
