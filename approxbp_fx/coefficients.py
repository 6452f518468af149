r"""Step-derivative tables for Approx-BP: the knots and slopes of ``h~``.

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

``python -m approxbp_fx.coefficients`` re-derives every table and prints the
``_SHIPPED`` literal below.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

__all__ = [
    "ACTIVATIONS",
    "BITS",
    "StepTable",
    "table",
    "derive",
    "objective",
    "optimal_slopes",
]

ACTIVATIONS: tuple[str, ...] = ("gelu", "gelu_tanh", "silu", "quick_gelu")
BITS: tuple[int, ...] = (1, 2, 3, 4)


def _check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")


def _check_bits(bits: int) -> None:
    # bool is an int; True as "1 bit" is almost certainly a bug at the call site.
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits!r}")


@dataclass(frozen=True)
class StepTable:
    """Knots ``c`` and slopes ``a`` of ``h~(x) = sum_i a_i ReLU(x - c_i)``.

    ``thresholds`` are the knots (``code(x) = #{i : x > c_i}``) and ``levels``
    the backward derivative per code, ``level[j] = a_1 + ... + a_j``.
    """

    activation: str
    bits: int
    a: tuple[float, ...]
    c: tuple[float, ...]

    def __post_init__(self) -> None:
        _check_activation(self.activation)
        _check_bits(self.bits)
        n = 2**self.bits - 1
        # Coerce to tuples of floats so tables hash, compare and print uniformly.
        a = tuple(float(v) for v in self.a)
        c = tuple(float(v) for v in self.c)
        if len(a) != n or len(c) != n:
            raise ValueError(
                f"a {self.bits}-bit table needs {n} slopes and {n} knots, got {len(a)} and {len(c)}"
            )
        if not all(math.isfinite(v) for v in a + c):
            raise ValueError(f"slopes and knots must be finite, got a={a}, c={c}")
        if any(lo >= hi for lo, hi in zip(c, c[1:])):
            raise ValueError(f"knots must be strictly ascending, got c={c}")
        object.__setattr__(self, "a", a)
        object.__setattr__(self, "c", c)

    @property
    def thresholds(self) -> tuple[float, ...]:
        """The knots ``c``: ``code(x)`` counts the thresholds below ``x``."""
        return self.c

    @property
    def levels(self) -> tuple[float, ...]:
        """``2**bits`` derivative levels, ``level[j] = a_1 + ... + a_j``.

        ``math.fsum`` (correctly rounded) so a table whose slopes fsum to 1.0
        ends exactly at 1.0, as the derivative of ``h`` does for large ``x``.
        """
        return tuple(math.fsum(self.a[:j]) for j in range(len(self.a) + 1))


# --------------------------------------------------------------------------
# Shipped tables.  Generated by `python -m approxbp_fx.coefficients`, which
# re-runs derive() for every activation and bits and prints this literal;
# tests/test_coefficients.py checks that derive() still reproduces it.
# --------------------------------------------------------------------------
# fmt: off
_SHIPPED: dict[tuple[str, int], tuple[tuple[float, ...], tuple[float, ...]]] = {
    ("gelu", 1): (  # J = 6.176505424545e-02
        (1.0,),
        (0.0,),
    ),
    ("gelu", 2): (  # J = 9.506935047571e-03
        (
            -0.04957520565232729, 1.0991504113046546, -0.04957520565232729,
        ),
        (
            -3.17130974269207, 0.0, 3.17130974269207,
        ),
    ),
    ("gelu", 3): (  # J = 1.788989521299e-04
        (
            -0.10037486517666604, 0.2651489642823878, 0.35317476641553974, 0.3486251271039257,
            0.24357901573130455, -0.07687708408874883, -0.033275924267742917,
        ),
        (
            -2.5169456066653635, -0.7036000427673241, -0.20614051641791512, 0.2516117119535774,
            0.7591934693899438, 2.1486751429870443, 3.027218934912683,
        ),
    ),
    ("gelu", 4): (  # J = 9.033717849123e-06
        (
            -0.017684192186444087, -0.04634715839229487, -0.05624439478297028, 0.08482008874565673,
            0.1267063874616947, 0.1533755660960779, 0.16859161701621464, 0.17356417208413055,
            0.16859161701621464, 0.1533755660960779, 0.1267063874616947, 0.08482008874565673,
            -0.05624439478297028, -0.04634715839229487, -0.017684192186444087,
        ),
        (
            -3.261976067624653, -2.482055448899847, -1.9298864638963087, -0.9955576958072548,
            -0.6963729401245262, -0.44677341715625113, -0.21892133984544054, 0.0,
            0.21892133984544054, 0.44677341715625113, 0.6963729401245262, 0.9955576958072548,
            1.9298864638963087, 2.482055448899847, 3.261976067624653,
        ),
    ),
    ("gelu_tanh", 1): (  # J = 6.183674127812e-02
        (1.0,),
        (0.0,),
    ),
    ("gelu_tanh", 2): (  # J = 9.552151554237e-03
        (
            -0.0497861330578082, 1.0995722661156164, -0.0497861330578082,
        ),
        (
            -3.162880066605914, 0.0, 3.162880066605914,
        ),
    ),
    ("gelu_tanh", 3): (  # J = 1.733190322021e-04
        (
            -0.1009140236400421, 0.2644423265930615, 0.3539216620476513, 0.34945679022147974,
            0.24350485308896822, -0.07604227115354341, -0.03436933715757523,
        ),
        (
            -2.5120639678674563, -0.7067004792221185, -0.20736940553019695, 0.25158097206895,
            0.760858639229031, 2.1488463684065056, 2.997285938528436,
        ),
    ),
    ("gelu_tanh", 4): (  # J = 8.665665962496e-06
        (
            -0.018715998270006615, -0.046611638554530446, -0.05519693100160776, 0.08443034799841911,
            0.12664176816245318, 0.15354738463270393, 0.16892669330223467, 0.17395674746066792,
            0.16892669330223467, 0.15354738463270393, 0.12664176816245318, 0.08443034799841911,
            -0.05519693100160776, -0.046611638554530446, -0.018715998270006615,
        ),
        (
            -3.2125623784941917, -2.470226078578407, -1.93015739263541, -0.9990627037666509,
            -0.6983753968784964, -0.4478969481797254, -0.2194298245288867, 0.0,
            0.2194298245288867, 0.4478969481797254, 0.6983753968784964, 0.9990627037666509,
            1.93015739263541, 2.470226078578407, 3.2125623784941917,
        ),
    ),
    ("silu", 1): (  # J = 3.163025757823e-01
        (1.0,),
        (0.0,),
    ),
    ("silu", 2): (  # J = 3.994131646340e-02
        (
            -0.040524294054930715, 1.0810485881098615, -0.040524294054930715,
        ),
        (
            -6.319933404549649, 0.0, 6.319933404549649,
        ),
    ),
    ("silu", 3): (  # J = 1.196939464762e-03
        (
            -0.01907534379205727, -0.060177483807979215, 0.34136547549945884, 0.4757747042011553,
            0.34136547549945884, -0.060177483807979215, -0.01907534379205727,
        ),
        (
            -6.893049341295712, -4.226678835833951, -1.0161580369751266, 0.0,
            1.0161580369751266, 4.226678835833951, 6.893049341295712,
        ),
    ),
    ("silu", 4): (  # J = 6.656413683694e-05
        (
            -0.0050348773678884386, -0.017580194756212662, -0.03092815457051675, -0.03852053529486316,
            0.1037700895578594, 0.1694477436605977, 0.20821869296515294, 0.22125447161174197,
            0.20821869296515294, 0.1694477436605977, 0.1037700895578594, -0.03852053529486316,
            -0.03092815457051675, -0.017580194756212662, -0.0050348773678884386,
        ),
        (
            -8.476686798317502, -5.966246244112975, -4.532723168600931, -3.435044824330197,
            -1.539673166272288, -0.9366893198653, -0.4484248481096007, 0.0,
            0.4484248481096007, 0.9366893198653, 1.539673166272288, 3.435044824330197,
            4.532723168600931, 5.966246244112975, 8.476686798317502,
        ),
    ),
    ("quick_gelu", 1): (  # J = 6.415404749501e-02
        (1.0,),
        (0.0,),
    ),
    ("quick_gelu", 2): (  # J = 8.101094678309e-03
        (
            -0.040524294054930715, 1.0810485881098615, -0.040524294054930715,
        ),
        (
            -3.713239368125528, 0.0, 3.713239368125528,
        ),
    ),
    ("quick_gelu", 3): (  # J = 2.427691620311e-04
        (
            -0.01907534379205727, -0.060177483807979215, 0.34136547549945884, 0.4757747042011553,
            0.34136547549945884, -0.060177483807979215, -0.01907534379205727,
        ),
        (
            -4.049970235778915, -2.483360068057551, -0.5970376245447278, 0.0,
            0.5970376245447278, 2.483360068057551, 4.049970235778915,
        ),
    ),
    ("quick_gelu", 4): (  # J = 1.350086633199e-05
        (
            -0.0050348773678884386, -0.017580194756212662, -0.03092815457051675, -0.03852053529486316,
            0.1037700895578594, 0.1694477436605977, 0.20821869296515294, 0.22125447161174197,
            0.20821869296515294, 0.1694477436605977, 0.1037700895578594, -0.03852053529486316,
            -0.03092815457051675, -0.017580194756212662, -0.0050348773678884386,
        ),
        (
            -4.980427026038486, -3.5054325758595626, -2.6631745996480207, -2.018240202309164,
            -0.9046258321223783, -0.5503462513897179, -0.2634693584662754, 0.0,
            0.2634693584662754, 0.5503462513897179, 0.9046258321223783, 2.018240202309164,
            2.6631745996480207, 3.5054325758595626, 4.980427026038486,
        ),
    ),
}
# fmt: on


def table(activation: str, bits: int) -> StepTable:
    """The shipped table for ``activation`` at ``bits`` bits (no computation)."""
    _check_activation(activation)
    _check_bits(bits)
    a, c = _SHIPPED[(activation, bits)]
    return StepTable(activation, bits, a, c)


# --------------------------------------------------------------------------
# Derivation (mpmath; sympy only for h'' in the start heuristic).  Imported
# lazily: the package reads the shipped tables at import time.
# --------------------------------------------------------------------------
_TOL_SEARCH = "1e-7"  # Newton step length ending a (double precision) start
_DPS = 40  # polish and optimal_slopes(): the Gram form cancels ~10 digits
_DPS_OBJECTIVE = 30  # plain quadrature of (h - h~)^2: no cancellation
_QUICK_GELU_BETA = "1.702"  # decimal strings: exact in any precision
_GELU_TANH_CUBIC = "0.044715"
_GELU_TANH_CUT = 13  # beyond it r and x r are below 1e-74: nothing at 40 digits
_FEASIBILITY_TOL = 1e-10


def _sigmoid_neg(ctx, z):
    """``sigmoid(-z)`` for ``z >= 0``, as ``e/(1+e)``, ``e = exp(-z)``: no overflow in floats."""
    e = ctx.exp(-z)
    return e / (1 + e)


class _Activation:
    """``r = h - ReLU`` and its tail moments for one activation, in an mpmath context."""

    def __init__(self, name: str, ctx=None) -> None:
        # ctx: mpmath.mp (arbitrary precision, the default) or mpmath.fp
        # (Python floats, ~50x faster: good enough to rank local minima).
        import mpmath

        self.name = name
        self.ctx = ctx = ctx or mpmath.mp
        # Exact summation either way; math.fsum is the fast one for floats.
        self.fsum = math.fsum if ctx is mpmath.fp else ctx.fsum
        mpf = ctx.mpf
        if name == "gelu":
            root2 = ctx.sqrt(2)
            # s(-t) = Phi(-t) via erfc: no cancellation in the far tail.
            self._gate_neg = lambda t: ctx.erfc(t / root2) / 2
        elif name == "gelu_tanh":
            # 0.5 (1 + tanh u) = sigmoid(2u): the exp form keeps s(-t) accurate.
            k2 = 2 * ctx.sqrt(2 / ctx.pi)
            cub = mpf(_GELU_TANH_CUBIC)
            self._gate_neg = lambda t: _sigmoid_neg(ctx, k2 * (t + cub * t**3))
        elif name == "silu":
            self._gate_neg = lambda t: _sigmoid_neg(ctx, t)
        elif name == "quick_gelu":
            beta = mpf(_QUICK_GELU_BETA)
            self._gate_neg = lambda t: _sigmoid_neg(ctx, beta * t)
        else:  # pragma: no cover - callers check first
            raise ValueError(name)
        self._rr = None

    def r(self, x):
        """``h(x) - ReLU(x) = -|x| s(-|x|)`` (even)."""
        t = abs(x)
        return -t * self._gate_neg(t)

    def h(self, x):
        """The activation itself (for checks)."""
        return x + self.r(x) if x > 0 else self.r(x)

    def tails(self, ts):
        """``{t: (S0(t), S1(t))}`` for ``t >= 0``, ``S_k(t) = int_t^inf x^k r(x) dx``."""
        mp = self.ctx
        mpf = mp.mpf
        out = {}
        if self.name == "gelu":
            for t in ts:
                # int_t^inf x Phi(-x) = ((1 - t^2) Phi(-t) + t phi(t)) / 2,
                # int_t^inf x^2 Phi(-x) = ((t^2 + 2) phi(t) - t^3 Phi(-t)) / 3.
                q = self._gate_neg(t)
                p = mp.npdf(t)
                out[t] = (-((1 - t * t) * q + t * p) / 2, -((t * t + 2) * p - t**3 * q) / 3)
        elif self.name in ("silu", "quick_gelu"):
            beta = mpf(1) if self.name == "silu" else mpf(_QUICK_GELU_BETA)
            for t in ts:
                # With v = beta t, e = exp(-v): int_v^inf u sigmoid(-u) du = v log1p(e) - Li2(-e),
                # int_v^inf u^2 sigmoid(-u) du = v^2 log1p(e) - 2 v Li2(-e) - 2 Li3(-e).
                v = beta * t
                e = mp.exp(-v)
                sp = mp.log1p(e)
                li2 = mp.polylog(2, -e)
                li3 = mp.polylog(3, -e)
                out[t] = (-(v * sp - li2) / beta**2, -(v * v * sp - 2 * v * li2 - 2 * li3) / beta**3)
        else:
            # Accumulate finite pieces from the right: a quad to infinity per
            # knot costs ~10x a finite one.
            cut = mpf(_GELU_TANH_CUT)
            s0 = s1 = mpf(0)
            hi = cut
            for t in sorted(ts, reverse=True):
                if t < hi:
                    # Both moments on one interval use the same quadrature
                    # nodes: remember r there and evaluate it once.
                    seen = {}

                    def r(x, seen=seen):
                        if x not in seen:
                            seen[x] = self.r(x)
                        return seen[x]

                    s0 += mp.quad(r, [t, hi])
                    s1 += mp.quad(lambda x: x * r(x), [t, hi])
                    hi = t
                out[t] = (s0, s1)
        return out

    @property
    def rr(self):
        """``int r**2`` over R."""
        if self._rr is None:
            mp = self.ctx
            self._rr = 2 * mp.quad(lambda x: self.r(x) ** 2, [0, 1, 4, mp.inf])
        return self._rr


def _solve(A, B):
    """Solve ``A X = B`` (lists of mpf; ``B`` a list of columns) by Gaussian
    elimination with partial pivoting.  mpmath.matrix's element access costs
    more than the arithmetic at these sizes."""
    n = len(A)
    M = [list(row) + [col[i] for col in B] for i, row in enumerate(A)]
    for k in range(n):
        p = max(range(k, n), key=lambda i: abs(M[i][k]))
        if not M[p][k]:
            raise ZeroDivisionError("singular system")
        M[k], M[p] = M[p], M[k]
        piv = M[k][k]
        rowk = M[k][k:]
        for i in range(k + 1, n):
            f = M[i][k] / piv
            if f:
                M[i][k:] = [x - f * y for x, y in zip(M[i][k:], rowk)]
    X = [[None] * n for _ in B]
    for b in range(len(B)):
        col = n + b
        for i in range(n - 1, -1, -1):
            s = M[i][col] - sum(M[i][j] * X[b][j] for j in range(i + 1, n))
            X[b][i] = s / M[i][i]
    return X


def _is_positive_definite(H) -> bool:
    """Cholesky succeeds (strictly positive pivots)."""
    n = len(H)
    L = [[None] * n for _ in range(n)]
    for j in range(n):
        d = H[j][j] - sum(L[j][k] ** 2 for k in range(j))
        if not d > 0:
            return False
        L[j][j] = d**0.5
        for i in range(j + 1, n):
            L[i][j] = (H[i][j] - sum(L[i][k] * L[j][k] for k in range(j))) / L[j][j]
    return True


class _Point:
    """Everything at one set of ascending knots: ``a*(c)``, the multipliers and
    ``J*``; gradient and Hessian of ``J*`` on demand."""

    def __init__(self, act: _Activation, c) -> None:
        mp = act.ctx
        mpf = mp.mpf
        self.act = act
        self.c = c = list(c)
        n = self.n = len(c)
        zero = mpf(0)
        # Cut-off beyond every knot, close to them: the Gram entries grow like
        # K**3 and cancel in J, so a small K loses fewer digits.
        self.K = K = max(c[-1], zero) + 1
        self.kap = kap = c + [zero]
        N = n + 1
        moments = act.tails(sorted({abs(t) for t in c} | {zero}))
        s00 = moments[zero][0]
        S0, T = [], []
        for t in c:
            s0, s1 = moments[abs(t)]
            if t < 0:  # r even: S0(-t) = 2 S0(0) - S0(t); x r odd: S1(-t) = S1(t)
                s0 = 2 * s00 - s0
            S0.append(s0)
            T.append(s1 - t * s0)
        self.S0, self.T = S0, T
        G = [[None] * N for _ in range(N)]
        for p in range(N):
            for q in range(p, N):
                G[p][q] = G[q][p] = _gram(kap[p], kap[q], K)
        self.G = G
        # The KKT matrix is also the (a, l1, l2) block of the Lagrangian's
        # Hessian, reused for the Schur complement.
        A = [[2 * G[i][j] for j in range(n)] + [mpf(1), c[i]] for i in range(n)]
        A.append([mpf(1)] * n + [zero, zero])
        A.append(list(c) + [zero, zero])
        self.A = A
        rhs = [2 * G[i][n] + 2 * T[i] for i in range(n)] + [mpf(1), zero]
        (x,) = _solve(A, [rhs])
        self.a = x[:n]
        self.l1, self.l2 = x[n], x[n + 1]
        self.w = self.a + [mpf(-1)]
        self._t0 = moments[zero][1]  # T(0) = S1(0)
        self._J = None

    @property
    def J(self):
        """``J*(c)``; lazy, as ``int r**2`` costs a quadrature that
        :func:`optimal_slopes` does not need."""
        if self._J is None:
            act, w, G, N = self.act, self.w, self.G, self.n + 1
            gram = act.fsum(w[p] * w[q] * G[p][q] for p in range(N) for q in range(N))
            self._J = act.rr - 2 * act.fsum(ai * ti for ai, ti in zip(self.a, self.T)) + 2 * self._t0 + gram
        return self._J

    def derivatives(self):
        """Gradient and Hessian of ``J*`` with respect to the knots."""
        act, c, a, w, G, K, kap = self.act, self.c, self.a, self.w, self.G, self.K, self.kap
        n, N = self.n, self.n + 1
        mp = act.ctx
        mpf = mp.mpf
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
        X = _solve(self.A, Hyc)
        fsum = act.fsum
        H = [[Hcc[i][j] - fsum(x * y for x, y in zip(Hyc[i], X[j])) for j in range(n)] for i in range(n)]
        return grad, H


def _gram(x, y, K):
    """``int_{max(x,y)}^K (u - x)(u - y) du``."""
    m = max(x, y)
    return (K - m) ** 3 / 3 + abs(x - y) * (K - m) ** 2 / 2


def _gram_d1(x, y, K):
    """``d/dx`` of :func:`_gram` (the boundary term vanishes: the integrand is 0 at ``max``)."""
    m = max(x, y)
    return -((K - y) ** 2 - (m - y) ** 2) / 2


class _NoConvergence(ArithmeticError):
    pass


class _KnownMinimum(Exception):
    """A start has entered the Newton basin of a minimum found before."""


def _mirror(c):
    """Knots of the reflected approximation ``x -> -x`` (J is invariant)."""
    return [-v for v in reversed(c)]


def _newton(act: _Activation, c0, tol, known=(), max_iter: int = 80) -> _Point:
    """Minimise ``J*`` from ascending knots ``c0`` until a full Newton step is
    shorter than ``tol``.  Raises :class:`_KnownMinimum` once a full Newton
    step lands within 1e-4 of a knot vector in ``known`` or of its mirror image."""
    mp = act.ctx
    mpf = mp.mpf
    n = len(c0)
    tol = mpf(tol)
    c = [mpf(v) for v in c0]
    pt = _Point(act, c)
    for _ in range(max_iter):
        g, H = pt.derivatives()
        # Levenberg: shift until positive definite, so d is a descent direction
        # even where J* is not convex (far from a minimum).
        mu = mpf(0)
        scale = max(abs(v) for row in H for v in row)
        while not _is_positive_definite([[H[i][j] + (mu if i == j else 0) for j in range(n)] for i in range(n)]):
            mu = 10 * mu if mu else scale * mpf(10) ** -8
        (d,) = _solve([[H[i][j] + (mu if i == j else 0) for j in range(n)] for i in range(n)], [[-v for v in g]])
        dn = mp.sqrt(act.fsum(v * v for v in d))
        slope = act.fsum(gi * di for gi, di in zip(g, d))
        # Near a minimum J* changes below its own rounding, so Armijo would
        # reject good steps: take full Newton steps there.
        local = mu == 0 and dn < mpf("1e-3")
        step = mpf(1)
        while True:
            cn = [v + step * dv for v, dv in zip(c, d)]
            if all(lo < hi for lo, hi in zip(cn, cn[1:])):
                new = _Point(act, cn)
                if local or new.J <= pt.J + mpf("1e-4") * step * slope:
                    break
            step /= 2
            if step * dn < tol:
                raise _NoConvergence("line search failed")
        c, pt = cn, new
        if local and dn < tol:
            return pt
        if local and any(
            max(abs(u - v) for u, v in zip(c, k)) < mpf("1e-4") for k0 in known for k in (k0, _mirror(k0))
        ):
            raise _KnownMinimum
    raise _NoConvergence(f"no convergence in {max_iter} Newton steps")


def _knot_starts(activation: str, n: int):
    """Deterministic starts for ``n`` knots: one per split ``(qL, p, qR)`` of
    the knots into left-outer, inner and right-outer groups (``qL <= qR``: the
    mirror image of a split gives the mirror image of its minimum), each group
    at quantiles of ``|h''|**(2/5)`` within its region."""
    import mpmath as mp
    import sympy as sp

    x = sp.Symbol("x", real=True)
    gate = {
        "gelu": (1 + sp.erf(x / sp.sqrt(2))) / 2,
        "gelu_tanh": (1 + sp.tanh(sp.sqrt(2 / sp.pi) * (x + sp.Rational(_GELU_TANH_CUBIC) * x**3))) / 2,
        "silu": 1 / (1 + sp.exp(-x)),
        "quick_gelu": 1 / (1 + sp.exp(-sp.Rational(_QUICK_GELU_BETA) * x)),
    }[activation]
    h2 = sp.lambdify(x, sp.diff(x * gate, x, 2), "mpmath")
    mpf = mp.mpf
    with mp.workdps(20):
        # h'' > 0 at 0 (h'(x) rises from 0 to 1); its first positive zero z0
        # separates the positive-slope region from the negative one (h'' is even).
        hi = mpf("0.125")
        while h2(hi) > 0:
            hi += mpf("0.125")
        z0 = mp.findroot(h2, (hi - mpf("0.125"), hi), solver="anderson")

        def quantile_fn(lo, hi, cells=400):
            # Cumulative trapezoid of rho on a grid, inverted linearly.
            xs = [lo + (hi - lo) * i / cells for i in range(cells + 1)]
            rho = [abs(h2(v)) ** mpf("0.4") for v in xs]
            cum = [mpf(0)]
            for i in range(cells):
                cum.append(cum[-1] + (rho[i] + rho[i + 1]) / 2)

            def at(count):
                out, i = [], 0
                for j in range(count):
                    target = cum[-1] * (j + mpf("0.5")) / count
                    while cum[i + 1] < target:
                        i += 1
                    out.append(xs[i] + (target - cum[i]) / (cum[i + 1] - cum[i]) * (xs[i + 1] - xs[i]))
                return out

            return at

        inner_at = quantile_fn(-z0, z0)
        outer_at = quantile_fn(z0, 12 * z0)
        starts = []
        for q_right in range(n):
            for q_left in range(min(q_right, n - 1 - q_right) + 1):
                c = _mirror(outer_at(q_left)) + inner_at(n - q_left - q_right) + outer_at(q_right)
                starts.append([float(v) for v in c])
    return starts


def _rounded(pt: _Point):
    """Floats of a minimiser, in a canonical orientation, with ``fsum(a) == 1.0``.

    A mirror-symmetric minimiser is made exactly symmetric (its asymmetry is
    rounding noise); of an asymmetric mirror pair we ship the one whose knots
    sum to > 0.
    """
    mp = pt.act.ctx
    n = pt.n
    a, c = list(pt.a), list(pt.c)
    noise = mp.mpf(10) ** (20 - mp.dps)
    symmetric = all(abs(c[i] + c[n - 1 - i]) < noise and abs(a[i] - a[n - 1 - i]) < noise for i in range(n))
    if symmetric:
        # Averaging with the mirror image removes rounding-level asymmetry only.
        c = [(c[i] - c[n - 1 - i]) / 2 for i in range(n)]
        a = [(a[i] + a[n - 1 - i]) / 2 for i in range(n)]
    elif mp.fsum(c) < 0:
        c, a = _mirror(c), a[::-1]
    a = [float(v) for v in a]
    c = [float(v) for v in c]
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
    return tuple(a), tuple(c)


def derive(activation: str, bits: int) -> StepTable:
    """Re-derive the table for ``activation`` at ``bits`` bits from scratch.

    Deterministic (no random search): multi-start Newton on ``J*`` as the
    module docstring describes; the floats are those :func:`table` ships.
    Takes ~0.1 s (2 bits) to several seconds (4 bits: ~60 starts).
    """
    _check_activation(activation)
    _check_bits(bits)
    if bits == 1:
        return StepTable(activation, 1, (1.0,), (0.0,))
    import mpmath as mp

    n = 2**bits - 1
    best = None
    found = []
    act = _Activation(activation, mp.fp)
    for c0 in _knot_starts(activation, n):
        try:
            # Ranking the minima needs far less than the final accuracy.
            pt = _newton(act, c0, tol=_TOL_SEARCH, known=found)
        except _KnownMinimum:
            continue  # different start, same minimum: save its last steps
        except ArithmeticError:  # _NoConvergence, a singular KKT system, overflow
            continue  # a start that runs into a degenerate knot set
        found.append(pt.c)
        if best is None or pt.J < best.J:
            best = pt
    if best is None:  # pragma: no cover
        raise RuntimeError(f"no start converged for {activation!r}, {bits} bits")
    with mp.workdps(_DPS):
        act = _Activation(activation)
        # Quadratic convergence: the step after a 1e-30 one is far below 1e-40.
        pt = _newton(act, best.c, tol="1e-30")
        _, H = pt.derivatives()
        if not _is_positive_definite(H):  # pragma: no cover
            raise RuntimeError(f"{activation!r}, {bits} bits: Newton stopped at a saddle of J*")
        a, c = _rounded(pt)
    return StepTable(activation, bits, a, c)


def _validated_pairs(a, c):
    a = [float(v) for v in a]
    c = [float(v) for v in c]
    if len(a) != len(c) or not a:
        raise ValueError(f"need as many slopes as knots (at least one), got {len(a)} and {len(c)}")
    if not all(math.isfinite(v) for v in a + c):
        raise ValueError("slopes and knots must be finite")
    return a, c


def objective(activation: str, a: Sequence[float], c: Sequence[float]) -> float:
    """``J(a, c) = int (h - h~)**2 dx`` over R, by mpmath quadrature.

    Knots may come in any order (``h~`` does not care).  If the constraints are
    violated (beyond a relative ``1e-10`` that absorbs float rounding) the
    integral diverges and the result is ``inf``; within the tolerance the tails
    are integrated as if they held exactly (``h~ = 0`` left of the knots,
    ``h~ = x`` right of them).  Round published constants onto the constraints
    (or use :func:`optimal_slopes`) before comparing them.
    """
    _check_activation(activation)
    a, c = _validated_pairs(a, c)
    import mpmath as mp

    with mp.workdps(_DPS_OBJECTIVE):
        mpf = mp.mpf
        A = [mpf(v) for v in a]
        C = [mpf(v) for v in c]
        slope_excess = abs(mp.fsum(A) - 1)  # the right tail grows like this times x
        offset = abs(mp.fsum(ai * ci for ai, ci in zip(A, C)))  # ... or tends to this constant
        if slope_excess > _FEASIBILITY_TOL * max(1, sum(map(abs, a))) or offset > _FEASIBILITY_TOL * max(
            1, sum(abs(ai * ci) for ai, ci in zip(a, c))
        ):
            return math.inf
        act = _Activation(activation)
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
        return float(J)


def optimal_slopes(activation: str, c: Sequence[float]) -> tuple[float, ...]:
    """The slopes ``a*(c)`` minimising ``J(a, c)`` for fixed knots (the KKT
    solve of the module docstring); ``c`` strictly ascending."""
    _check_activation(activation)
    c = [float(v) for v in c]
    if not c or not all(math.isfinite(v) for v in c) or any(lo >= hi for lo, hi in zip(c, c[1:])):
        raise ValueError(f"knots must be finite and strictly ascending, got c={tuple(c)}")
    if len(c) == 1 and c[0] != 0.0:
        raise ValueError(f"a single knot must be at 0 (sum a c = 0 with sum a = 1), got c={tuple(c)}")
    import mpmath as mp

    with mp.workdps(_DPS):
        pt = _Point(_Activation(activation), [mp.mpf(v) for v in c])
        return tuple(float(v) for v in pt.a)


def _literal(tables) -> str:
    """The ``_SHIPPED = {...}`` block for ``tables`` (``repr`` floats round-trip)."""

    def floats(values, indent):
        if len(values) == 1:
            return f"{indent}({values[0]!r},),"
        lines = [f"{indent}("]
        for i in range(0, len(values), 4):
            lines.append(f"{indent}    " + ", ".join(repr(v) for v in values[i : i + 4]) + ",")
        lines.append(f"{indent}),")
        return "\n".join(lines)

    lines = ["_SHIPPED: dict[tuple[str, int], tuple[tuple[float, ...], tuple[float, ...]]] = {"]
    for tab in tables:
        J = objective(tab.activation, tab.a, tab.c)
        lines.append(f'    ("{tab.activation}", {tab.bits}): (  # J = {J:.12e}')
        lines.append(floats(tab.a, " " * 8))
        lines.append(floats(tab.c, " " * 8))
        lines.append("    ),")
    lines.append("}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(_literal(derive(name, bits) for name in ACTIVATIONS for bits in BITS))
