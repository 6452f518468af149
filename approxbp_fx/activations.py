"""The exact activations that Approx-BP approximates in backward.

One registry serves every reader: the eager method's exact forward
(:mod:`approxbp_fx.eager`), the step-derivative tables
(:mod:`approxbp_fx.coefficients`), and the rule that recognises a decomposed
subgraph by evaluating it against these functions in float64.

Low-precision inputs are computed in float32 and rounded once at the end, as
inductor's generated code does (``emulate_precision_casts`` is off by default),
so the rewritten forward equals ``backend="inductor"`` up to rounding.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

__all__ = ["ACTIVATIONS", "check_activation", "activation_fn", "exact_forward", "exact_derivative"]


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    # CLIP's QuickGELU; 1.702 is the constant CLIP and HF ship.
    return x * torch.sigmoid(1.702 * x)


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    # Written out rather than F.gelu(approximate="tanh") so float64 probes and
    # the hand-written GPT-2 formula agree to the last bit of the maths.
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


_FNS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_tanh": _gelu_tanh,
    "silu": F.silu,
    "quick_gelu": _quick_gelu,
}

ACTIVATIONS: tuple[str, ...] = tuple(_FNS)


def check_activation(name: str) -> None:
    """Raise ``ValueError`` unless ``name`` is one of :data:`ACTIVATIONS`."""
    if name not in _FNS:
        raise ValueError(f"unknown activation {name!r}; expected one of {ACTIVATIONS}")


def activation_fn(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The exact activation called ``name`` (one of :data:`ACTIVATIONS`)."""
    check_activation(name)
    return _FNS[name]


def exact_forward(name: str, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``h(x)`` computed in at least float32, rounded once to ``out_dtype``."""
    fn = activation_fn(name)
    compute = x if x.dtype in (torch.float32, torch.float64) else x.float()
    return fn(compute).to(out_dtype or x.dtype)


def _unchanged(t: torch.Tensor) -> torch.Tensor:
    return t


def exact_derivative(name: str, x: torch.Tensor) -> torch.Tensor:
    """``h'(x)`` by autograd on the exact function, in ``x``'s dtype.

    The rule's probe tables are built by this during the first compile, which
    may run inside the caller's ``saved_tensors_hooks`` (a saved-bytes counter,
    an offloading hook): identity hooks keep this private graph's saved tensors
    away from theirs (seen: five float64 probe tensors counted as activations).
    """
    fn = activation_fn(name)
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_unchanged, _unchanged):
        xd = x.detach().requires_grad_(True)
        (d,) = torch.autograd.grad(fn(xd).sum(), xd)
    return d
