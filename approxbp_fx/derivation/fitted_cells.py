"""The derivative-fitted objective reduced to the knots: ``J*(c)``, its gradient and Hessian.

For fixed knots the best levels are the conditional means of ``h'`` on the
cells; the maths is in fitted.py's docstring.
"""

from __future__ import annotations

import mpmath as mp

from .gates import derivative

_REACH = 20  # integrals of h' against the density stop at +-_REACH sigma


class Derivative:
    """``h'``, ``h''`` of one activation and the density ``N(0, sigma**2)``, in
    one mpmath context (``.ctx``, with its exact sum ``.fsum``, as
    newton.py expects)."""

    def __init__(self, name: str, sigma, ctx=None) -> None:
        self.ctx = ctx = ctx or mp.mp
        self.fsum = ctx.fsum
        self.name = name
        self.sigma = ctx.mpf(sigma)
        self.d1 = derivative(name, 1, ctx)
        self.d2 = derivative(name, 2, ctx)
        self._second = None

    def pdf(self, x):
        return self.ctx.npdf(x, 0, self.sigma)

    def mass(self, lo, hi):
        """``P(lo < X < hi)``, via the upper tail right of 0 (no cancellation there)."""
        ncdf = self.ctx.ncdf
        if lo >= 0:
            return ncdf(-lo, 0, self.sigma) - ncdf(-hi, 0, self.sigma)
        return ncdf(hi, 0, self.sigma) - ncdf(lo, 0, self.sigma)

    def moment(self, lo, hi):
        """``E[h'(X); lo < X < hi]``, split at 0 and at +-sigma where the
        integrand bends most."""
        ctx, s = self.ctx, self.sigma
        # Beyond 20 sigma the density is below 1e-87 (far under 30 digits),
        # and exp() in h' would overflow doubles at the quadrature's far nodes.
        lo, hi = max(lo, -_REACH * s), min(hi, _REACH * s)
        pts = [lo] + [p for p in (-s, ctx.mpf(0), s) if lo < p < hi] + [hi]
        return ctx.quad(lambda x: self.d1(x) * self.pdf(x), pts)

    @property
    def second(self):
        """``E[h'(X)**2]``: the objective of the all-zero step derivative."""
        if self._second is None:
            ctx, s = self.ctx, self.sigma
            self._second = ctx.quad(lambda x: self.d1(x) ** 2 * self.pdf(x), [-_REACH * s, -s, 0, s, _REACH * s])
        return self._second


class CellPoint:
    """Everything at one set of ascending knots: cell masses ``m0``, moments
    ``m1``, the optimal ``levels`` and ``J = J*(c)``; gradient and Hessian on demand."""

    def __init__(self, act: Derivative, c) -> None:
        ctx = act.ctx
        self.act = act
        self.c = c = list(c)
        self.n = len(c)
        edges = [-ctx.inf] + c + [ctx.inf]
        self.m0 = [act.mass(lo, hi) for lo, hi in zip(edges, edges[1:])]
        self.m1 = [act.moment(lo, hi) for lo, hi in zip(edges, edges[1:])]
        if not all(m > 0 for m in self.m0):
            raise ZeroDivisionError("a cell of zero mass")
        self.levels = [m1 / m0 for m0, m1 in zip(self.m0, self.m1)]
        self.J = act.second - act.fsum(m * lv for m, lv in zip(self.m1, self.levels))

    def derivatives(self):
        """Gradient and (tridiagonal) Hessian of ``J*``, with ``p = phi(c_k)``,
        left/right levels ``L``/``R`` of knot ``k``, ``D = R - L`` and
        ``M = 2 h'(c_k) - L - R``:

            dJ*/dc_k = p D M
            dR/dc_k = -p (h'_k - R) / m0_R,   dL/dc_k = p (h'_k - L) / m0_L
        """
        act, c, n = self.act, self.c, self.n
        lv, m0 = self.levels, self.m0
        zero = act.ctx.mpf(0)
        p = [act.pdf(v) for v in c]
        d1 = [act.d1(v) for v in c]
        d2 = [act.d2(v) for v in c]
        # How the level of cell j moves with its own left / right edge (cells 0
        # and n have none at -inf / +inf).
        left = [zero] + [-p[j - 1] * (d1[j - 1] - lv[j]) / m0[j] for j in range(1, n + 1)]
        right = [p[j] * (d1[j] - lv[j]) / m0[j] for j in range(n)] + [zero]
        g, H = [], [[zero] * n for _ in range(n)]
        for k in range(n):
            L, R = lv[k], lv[k + 1]
            D, M = R - L, 2 * d1[k] - L - R
            dL, dR = right[k], left[k + 1]  # knot k is cell k's right edge, cell k+1's left
            g.append(p[k] * D * M)
            dp = -c[k] / act.sigma**2 * p[k]
            H[k][k] = dp * D * M + p[k] * ((dR - dL) * M + D * (2 * d2[k] - dR - dL))
            if k + 1 < n:  # c_{k+1} moves R, the level of cell k+1, from its right edge
                H[k][k + 1] = p[k] * right[k + 1] * (M - D)
            if k > 0:  # c_{k-1} moves L, the level of cell k, from its left edge
                H[k][k - 1] = -p[k] * left[k] * (M + D)
        return g, H
