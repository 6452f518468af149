"""Deterministic starting knots for Newton on ``J*``.

``J*`` has many local minima (about 30 for 4 bits), which differ in how many
knots sit left of ``-z0``, between, and right of ``z0``, where ``h''(z0) = 0``.
So there is one start per split of the knots into those three groups, each
group at quantiles of de Boor's asymptotically optimal knot density
``|h''|**(2/5)`` (for L2 fits by linear splines) within its region.
"""

from __future__ import annotations

import mpmath as mp

from .gates import mirror, second_derivative


def knot_starts(activation: str, n: int) -> list[list[float]]:
    """Starts for ``n`` knots: one per split ``(qL, p, qR)`` of the knots into
    left-outer, inner and right-outer groups (``qL <= qR``: the mirror image of
    a split gives the mirror image of its minimum)."""
    h2 = second_derivative(activation)
    with mp.workdps(20):
        z0 = _inflection(h2)
        inner_at = _quantiles(h2, -z0, z0)
        outer_at = _quantiles(h2, z0, 12 * z0)
        starts = []
        for q_right in range(n):
            for q_left in range(min(q_right, n - 1 - q_right) + 1):
                c = mirror(outer_at(q_left)) + inner_at(n - q_left - q_right) + outer_at(q_right)
                starts.append([float(v) for v in c])
    return starts


def _inflection(h2):
    """The first positive zero ``z0`` of ``h''``.

    ``h'' > 0`` at 0 (``h'`` rises from 0 to 1); ``z0`` separates the region of
    positive optimal slopes from the outer ones, where they are negative
    (``h''`` is even)."""
    step = mp.mpf("0.125")
    hi = step
    while h2(hi) > 0:
        hi += step
    return mp.findroot(h2, (hi - step, hi), solver="anderson")


def _quantiles(h2, lo, hi, cells=400):
    """``at(count)``: ``count`` knots at the mid-quantiles of ``|h''|**(2/5)``
    on ``[lo, hi]`` (a cumulative trapezoid on a grid, inverted linearly)."""
    xs = [lo + (hi - lo) * i / cells for i in range(cells + 1)]
    rho = [abs(h2(v)) ** mp.mpf("0.4") for v in xs]
    cum = [mp.mpf(0)]
    for i in range(cells):
        cum.append(cum[-1] + (rho[i] + rho[i + 1]) / 2)

    def at(count):
        out, i = [], 0
        for j in range(count):
            target = cum[-1] * (j + mp.mpf("0.5")) / count
            while cum[i + 1] < target:
                i += 1
            out.append(xs[i] + (target - cum[i]) / (cum[i + 1] - cum[i]) * (xs[i + 1] - xs[i]))
        return out

    return at
