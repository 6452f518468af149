"""The paper's objective reduced to the knots: ``J*(c) = J(a*(c), c)``.

For fixed knots the optimal slopes solve a KKT system; gradient and Hessian of
``J*`` follow from the envelope theorem and implicit differentiation of that
system (the maths is in paper.py's docstring).
"""

from __future__ import annotations

from .linalg import solve
from .residual import Residual


class Point:
    """Everything at one set of ascending knots: ``a*(c)``, the multipliers and
    ``J*``; gradient and Hessian of ``J*`` on demand."""

    def __init__(self, act: Residual, c) -> None:
        mp = act.ctx
        mpf = mp.mpf
        self.act = act
        self.c = c = list(c)
        self.n = n = len(c)
        zero = mpf(0)
        # Cut-off beyond every knot, close to them: the Gram entries grow like
        # K**3 and cancel in J, so a small K loses fewer digits.
        self.K = K = max(c[-1], zero) + 1
        self.kap = kap = c + [zero]
        moments = act.tails(sorted({abs(t) for t in c} | {zero}))
        self.S0, self.T = _knot_moments(c, moments, zero)
        self.G = G = [[_gram(p, q, K) for q in kap] for p in kap]
        # The KKT matrix is also the (a, l1, l2) block of the Lagrangian's
        # Hessian, reused for the Schur complement.
        A = [[2 * G[i][j] for j in range(n)] + [mpf(1), c[i]] for i in range(n)]
        A.append([mpf(1)] * n + [zero, zero])
        A.append(list(c) + [zero, zero])
        self.A = A
        rhs = [2 * G[i][n] + 2 * self.T[i] for i in range(n)] + [mpf(1), zero]
        (x,) = solve(A, [rhs])
        self.a = x[:n]
        self.l1, self.l2 = x[n], x[n + 1]
        self.w = self.a + [mpf(-1)]
        self._t0 = moments[zero][1]  # T(0) = S1(0)
        self._J = None

    @property
    def J(self):
        """``J*(c)``; lazy, as ``int r**2`` costs a quadrature that
        ``optimal_slopes`` does not need."""
        if self._J is None:
            act, w, G, N = self.act, self.w, self.G, self.n + 1
            gram = act.fsum(w[p] * w[q] * G[p][q] for p in range(N) for q in range(N))
            self._J = act.rr - 2 * act.fsum(ai * ti for ai, ti in zip(self.a, self.T)) + 2 * self._t0 + gram
        return self._J

    def derivatives(self):
        """Gradient and Hessian of ``J*`` with respect to the knots."""
        act, c, a, w, K, kap = self.act, self.c, self.a, self.w, self.K, self.kap
        n, N = self.n, self.n + 1
        mpf = act.ctx.mpf
        # L = J + l1 (sum a - 1) + l2 sum a c, J = const - 2 sum a_i T(c_i) + w'Gw.
        # With T' = -S0 and S0' = -r: dL/dc_i = 2 a_i S0(c_i) + d(w'Gw)/dc_i + l2 a_i,
        # which at a*(c) is dJ*/dc_i (envelope theorem).
        g1 = [[_gram_d1(kap[p], kap[q], K) for q in range(N)] for p in range(N)]
        row = [act.fsum(w[q] * g1[i][q] for q in range(N)) for i in range(n)]
        grad = [2 * a[i] * self.S0[i] + 2 * w[i] * row[i] + self.l2 * a[i] for i in range(n)]
        # Mixed block d2L / d(a, l1, l2) dc_j, one column per knot j.
        Hyc = [[mpf(0)] * (n + 2) for _ in range(n)]
        Hcc = [[mpf(0)] * n for _ in range(n)]
        for j in range(n):
            for i in range(n):
                v = 2 * w[j] * g1[j][i]
                if i == j:
                    v += 2 * row[i] + 2 * self.S0[i] + self.l2
                Hyc[j][i] = v
                if i != j:
                    Hcc[i][j] = 2 * w[i] * w[j] * (K - max(kap[i], kap[j]))
            Hyc[j][n + 1] = a[j]
            Hcc[j][j] = 2 * w[j] * (
                act.fsum(w[q] * max(kap[j] - kap[q], 0) for q in range(N) if q != j) + w[j] * (K - kap[j])
            ) - 2 * a[j] * act.r(c[j])
        # Implicit differentiation of the KKT system: H = Hcc - Hyc' A^-1 Hyc.
        X = solve(self.A, Hyc)
        fsum = act.fsum
        H = [[Hcc[i][j] - fsum(x * y for x, y in zip(Hyc[i], X[j])) for j in range(n)] for i in range(n)]
        return grad, H


def _knot_moments(c, moments, zero):
    """``S0(c_i)`` and ``T(c_i) = S1(c_i) - c_i S0(c_i)`` from the moments at ``|c_i|``."""
    s00 = moments[zero][0]
    S0, T = [], []
    for t in c:
        s0, s1 = moments[abs(t)]
        if t < 0:  # r even: S0(-t) = 2 S0(0) - S0(t); x r odd: S1(-t) = S1(t)
            s0 = 2 * s00 - s0
        S0.append(s0)
        T.append(s1 - t * s0)
    return S0, T


def _gram(x, y, K):
    """``int_{max(x,y)}^K (u - x)(u - y) du``."""
    m = max(x, y)
    return (K - m) ** 3 / 3 + abs(x - y) * (K - m) ** 2 / 2


def _gram_d1(x, y, K):
    """``d/dx`` of :func:`_gram` (the boundary term vanishes: the integrand is 0 at ``max``)."""
    m = max(x, y)
    return -((K - y) ** 2 - (m - y) ** 2) / 2
