"""Offline derivation of the step tables that approxbp_fx/coefficients.py ships.

One module per table family, each with a ``derive(activation, bits)`` and a
``python -m`` entry point that re-derives every table and prints the family's
literal for coefficients.py:

    paper.py       the paper's objective, int (h - h~)**2 dx (the shipped ``_SHIPPED``)
    fitted.py      E[(h' - s)**2] under N(0, 1), Lloyd-Max on h' (the shipped ``_FITTED``);
                   fitted_cells.py holds its J*(c) with gradient and Hessian

The rest is shared by the families:

    gates.py       the activations' gates in mpmath and sympy, keyed by
                   approxbp_fx.activations.ACTIVATIONS
    residual.py    r = h - ReLU and its tail moments
    starts.py      deterministic starting knots
    newton.py      multi-start Newton on the knots
    linalg.py      small dense solves in mpmath
    literal.py     the printer of a shipped literal

Nothing at runtime imports this package: it needs mpmath and sympy, and the
package reads the shipped tables instead.
"""
