"""``r = h - ReLU`` and its tail moments, for each activation, in mpmath.

``r(x) = -|x| s(-|x|)`` is even and square integrable; the paper's objective
splits into integrals of it (see paper.py).  The tail moments
``S_k(t) = int_t^inf x^k r(x) dx`` have closed forms for ``gelu`` (``Phi``,
``phi``) and for ``silu`` and ``quick_gelu`` (``log1p``, ``Li2``, ``Li3``);
``gelu_tanh`` uses ``mpmath.quad``.
"""

from __future__ import annotations

import math
from functools import partial

import mpmath

from .gates import GATE_NEG, QUICK_GELU_BETA, per_activation

_GELU_TANH_CUT = 13  # beyond it r and x r are below 1e-74: nothing at 40 digits


class Residual:
    """``r = h - ReLU`` for the activation ``name``, in an mpmath context."""

    def __init__(self, name: str, ctx=None) -> None:
        # ctx: mpmath.mp (arbitrary precision, the default) or mpmath.fp
        # (Python floats, ~50x faster: good enough to rank local minima).
        self.name = name
        self.ctx = ctx = ctx or mpmath.mp
        # Exact summation either way; math.fsum is the fast one for floats.
        self.fsum = math.fsum if ctx is mpmath.fp else ctx.fsum
        self.gate_neg = GATE_NEG[name](ctx)
        self._rr = None

    def r(self, x):
        """``h(x) - ReLU(x) = -|x| s(-|x|)`` (even)."""
        t = abs(x)
        return -t * self.gate_neg(t)

    def h(self, x):
        """The activation itself (for checks)."""
        return x + self.r(x) if x > 0 else self.r(x)

    def tails(self, ts):
        """``{t: (S0(t), S1(t))}`` for ``t >= 0``, ``S_k(t) = int_t^inf x^k r(x) dx``."""
        return _TAILS[self.name](self, ts)

    @property
    def rr(self):
        """``int r**2`` over R."""
        if self._rr is None:
            mp = self.ctx
            self._rr = 2 * mp.quad(lambda x: self.r(x) ** 2, [0, 1, 4, mp.inf])
        return self._rr


def _normal_tails(res: Residual, ts):
    mp = res.ctx
    out = {}
    for t in ts:
        # int_t^inf x Phi(-x) = ((1 - t^2) Phi(-t) + t phi(t)) / 2,
        # int_t^inf x^2 Phi(-x) = ((t^2 + 2) phi(t) - t^3 Phi(-t)) / 3.
        q = res.gate_neg(t)
        p = mp.npdf(t)
        out[t] = (-((1 - t * t) * q + t * p) / 2, -((t * t + 2) * p - t**3 * q) / 3)
    return out


def _logistic_tails(res: Residual, ts, beta):
    mp = res.ctx
    beta = mp.mpf(beta)
    out = {}
    for t in ts:
        # With v = beta t, e = exp(-v): int_v^inf u sigmoid(-u) du = v log1p(e) - Li2(-e),
        # int_v^inf u^2 sigmoid(-u) du = v^2 log1p(e) - 2 v Li2(-e) - 2 Li3(-e).
        v = beta * t
        e = mp.exp(-v)
        sp = mp.log1p(e)
        li2 = mp.polylog(2, -e)
        li3 = mp.polylog(3, -e)
        out[t] = (-(v * sp - li2) / beta**2, -(v * v * sp - 2 * v * li2 - 2 * li3) / beta**3)
    return out


def _quadrature_tails(res: Residual, ts):
    # Accumulate finite pieces from the right: a quad to infinity per knot
    # costs ~10x a finite one.
    mp = res.ctx
    s0 = s1 = mp.mpf(0)
    hi = mp.mpf(_GELU_TANH_CUT)
    out = {}
    for t in sorted(ts, reverse=True):
        if t < hi:
            # Both moments on one interval use the same quadrature nodes:
            # remember r there and evaluate it once.
            seen = {}

            def r(x, seen=seen):
                if x not in seen:
                    seen[x] = res.r(x)
                return seen[x]

            s0 += mp.quad(r, [t, hi])
            s1 += mp.quad(lambda x: x * r(x), [t, hi])
            hi = t
        out[t] = (s0, s1)
    return out


_TAILS = per_activation(
    {
        "gelu": _normal_tails,
        "gelu_tanh": _quadrature_tails,
        "silu": partial(_logistic_tails, beta="1"),
        "quick_gelu": partial(_logistic_tails, beta=QUICK_GELU_BETA),
    }
)
