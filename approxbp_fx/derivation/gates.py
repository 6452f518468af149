"""The activations' gates, in mpmath and in sympy, for the derivation.

Each activation of :data:`approxbp_fx.activations.ACTIVATIONS` is
``h(x) = x s(x)`` with a gate satisfying ``s(-x) = 1 - s(x)``, which makes
``h - ReLU`` even.  The derivation needs ``s(-t)`` for ``t >= 0`` in an mpmath
context (accurate in the far tail) and ``s(x)`` in sympy (for ``h''``).  Every
per-activation table of the derivation is keyed by the names of ACTIVATIONS and
checked by :func:`per_activation` to cover exactly them.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, TypeVar

import sympy as sp

from ..activations import ACTIVATIONS

QUICK_GELU_BETA = "1.702"  # decimal strings: exact in any precision
GELU_TANH_CUBIC = "0.044715"

V = TypeVar("V")


def per_activation(maths: dict[str, V]) -> dict[str, V]:
    """``maths`` itself, once checked to have one entry per activation, no more."""
    if set(maths) != set(ACTIVATIONS):
        raise RuntimeError(f"derivation maths covers {sorted(maths)}, the activations are {sorted(ACTIVATIONS)}")
    return maths


def mirror(c):
    """Knots of the reflected approximation ``x -> -x`` (as good: ``h - ReLU`` is even)."""
    return [-v for v in reversed(c)]


def _sigmoid_neg(ctx, z):
    """``sigmoid(-z)`` for ``z >= 0``, as ``e/(1+e)``, ``e = exp(-z)``: no overflow in floats."""
    e = ctx.exp(-z)
    return e / (1 + e)


def _normal_gate(ctx):
    root2 = ctx.sqrt(2)
    # s(-t) = Phi(-t) via erfc: no cancellation in the far tail.
    return lambda t: ctx.erfc(t / root2) / 2


def _tanh_gate(ctx):
    # 0.5 (1 + tanh u) = sigmoid(2u): the exp form keeps s(-t) accurate.
    k2 = 2 * ctx.sqrt(2 / ctx.pi)
    cub = ctx.mpf(GELU_TANH_CUBIC)
    return lambda t: _sigmoid_neg(ctx, k2 * (t + cub * t**3))


def _logistic_gate(ctx, beta):
    beta = ctx.mpf(beta)
    return lambda t: _sigmoid_neg(ctx, beta * t)


# ``GATE_NEG[name](ctx)``: ``t -> s(-t)`` for ``t >= 0`` in the mpmath context
# ``ctx`` (mpmath.mp or mpmath.fp), its constants at ctx's current precision.
GATE_NEG: dict[str, Callable] = per_activation(
    {
        "gelu": _normal_gate,
        "gelu_tanh": _tanh_gate,
        "silu": partial(_logistic_gate, beta="1"),
        "quick_gelu": partial(_logistic_gate, beta=QUICK_GELU_BETA),
    }
)

_X = sp.Symbol("x", real=True)

# s(x) as a sympy expression in _X.
_GATE_SYMPY: dict[str, sp.Expr] = per_activation(
    {
        "gelu": (1 + sp.erf(_X / sp.sqrt(2))) / 2,
        "gelu_tanh": (1 + sp.tanh(sp.sqrt(2 / sp.pi) * (_X + sp.Rational(GELU_TANH_CUBIC) * _X**3))) / 2,
        "silu": 1 / (1 + sp.exp(-_X)),
        "quick_gelu": 1 / (1 + sp.exp(-sp.Rational(QUICK_GELU_BETA) * _X)),
    }
)


def derivative(name: str, order: int, ctx=None) -> Callable:
    """``h`` differentiated ``order`` times, as a function of a number of the
    mpmath context ``ctx`` (``mpmath.mp`` when None; constants at its current
    precision)."""
    expr = sp.diff(_X * _GATE_SYMPY[name], _X, order)
    if ctx is None:
        return sp.lambdify(_X, expr, "mpmath")
    # The printed code calls these names; binding them to ctx keeps a search
    # in mpmath.fp in double precision throughout.
    names = ("mpf", "sqrt", "exp", "erf", "tanh", "pi")
    return sp.lambdify(_X, expr, [{n: getattr(ctx, n) for n in names}, "mpmath"])


def second_derivative(name: str) -> Callable:
    """``h''`` of activation ``name``, as a function of an mpmath number."""
    return derivative(name, 2)
