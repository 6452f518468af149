"""The paper's method in plain eager PyTorch, module by module: the benchmarks' eager peer.

* :class:`ApproxActivation` (and :func:`approx_activation`): exact forward
  ``y = h(x)``; saves the packed codes and the non-finite flag of
  :mod:`approxbp_fx.codes` instead of ``x``; backward ``dx = dy * level[code]``.
* :class:`MSNorm` (and :func:`ms_norm`): a LayerNorm/RMSNorm that saves its own
  *output* ``y = γ·x̂ + β`` and the per-row ``r = 1/σ``; a following Linear
  saves the same tensor, so the norm's input is no longer held. Backward
  recovers ``x̂ = (y − β)/γ`` (see :class:`_MSNormFn`).
* :func:`swap_modules` puts both into an existing model, the way the paper's
  reference code does. It is also the tests' oracle for what the compiled
  rewrite must compute.

Example::

    >>> x = torch.randn(4, 5, requires_grad=True)
    >>> y = approx_activation(x, "gelu", bits=2)   # y == F.gelu(x)
    >>> y.sum().backward()                        # x.grad is the step derivative
"""

from __future__ import annotations

import torch
from torch import nn

from .activations import exact_forward
from .codes import code_grad_of, nonfinite_flag, pack_codes
from .coefficients import DEFAULT_TABLE, StepTable, table

__all__ = ["approx_activation", "ApproxActivation", "ms_norm", "MSNorm", "swap_modules"]


class _ApproxActivationFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, tab: StepTable) -> torch.Tensor:
        ctx.tab = tab
        ctx.save_for_backward(pack_codes(x, tab.thresholds, tab.bits), nonfinite_flag(x))
        return exact_forward(tab.activation, x)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        codes, nonfinite = ctx.saved_tensors
        tab = ctx.tab
        return code_grad_of(grad, codes, nonfinite, tab.levels, tab.bits, grad.dtype), None


def approx_activation(
    x: torch.Tensor, activation: str = "gelu", bits: int = 2, family: str = DEFAULT_TABLE
) -> torch.Tensor:
    """Exact ``activation(x)`` whose backward is the ``bits``-bit step derivative of ``family``'s table."""
    return _ApproxActivationFn.apply(x, table(activation, bits, family))


class ApproxActivation(nn.Module):
    """Drop-in module for eager use, e.g. ``ApproxActivation("gelu", bits=2)`` for ``nn.GELU()``."""

    def __init__(self, activation: str = "gelu", bits: int = 2, family: str = DEFAULT_TABLE) -> None:
        super().__init__()
        self.table = table(activation, bits, family)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ApproxActivationFn.apply(x, self.table)

    def extra_repr(self) -> str:
        return f"activation={self.table.activation!r}, bits={self.table.bits}, table={self.table.family!r}"


class _MSNormFn(torch.autograd.Function):
    """Memory-sharing norm; the gradient maths, per row of ``d`` normalised elements.

    Forward (float32, or float64 for float64 input): ``μ = mean(x)`` (LayerNorm; 0 for RMSNorm),
    ``r = 1/sqrt(mean((x−μ)²) + eps)``, ``x̂ = (x−μ)·r``, ``y = γ·x̂ + β``,
    rounded once to ``out_dtype``. Saved: ``y`` itself and ``r`` (4 bytes a row).

    Backward, with ``g = dy·γ`` and ``x̂ = (y − β)/γ``:

    * LayerNorm: ``dx = r·(g − mean(g) − x̂·mean(g·x̂))``
    * RMSNorm:   ``dx = r·(g − x̂·mean(g·x̂))``
    * ``dγ = Σ_rows dy·x̂``, ``dβ = Σ_rows dy``.

    ``x̂`` carries ``y``'s rounding (bf16: about 3 significant digits), and the
    division by ``γ`` is ill-conditioned where ``|γ|`` is tiny; the reference
    code avoids it by folding γ and β into the following Linear, which edits
    weights. The compiled rule does neither: it rebuilds y in backward.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, kind: str, ndim: int, eps: float, out_dtype: torch.dtype):
        dims = tuple(range(-ndim, 0))
        ct = torch.promote_types(x.dtype, torch.float32)  # float32 maths, float64 kept
        xf = x.to(ct)
        mu = xf.mean(dims, keepdim=True) if kind == "layer_norm" else None
        xc = xf - mu if mu is not None else xf
        r = torch.rsqrt(xc.pow(2).mean(dims, keepdim=True) + eps)
        y = xc * r
        if weight is not None:
            y = y * weight.to(ct)
        if bias is not None:
            y = y + bias.to(ct)
        y = y.to(out_dtype)
        ctx.kind, ctx.dims, ctx.in_dtype = kind, dims, x.dtype
        ctx.save_for_backward(y, r, weight, bias)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        y, r, weight, bias = ctx.saved_tensors
        dims = ctx.dims
        ct = r.dtype
        xhat = y.to(ct)
        if bias is not None:
            xhat = xhat - bias.to(ct)
        g = dy.to(ct)
        if weight is not None:
            xhat = xhat / weight.to(ct)
            g = g * weight.to(ct)
        proj = (g * xhat).mean(dims, keepdim=True)
        inner = g - xhat * proj
        if ctx.kind == "layer_norm":
            inner = inner - g.mean(dims, keepdim=True)
        dx = (r * inner).to(ctx.in_dtype)
        rows = tuple(range(dy.dim() - len(dims)))
        dw = (dy.to(ct) * xhat).sum(rows).to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        db = dy.to(ct).sum(rows).to(bias.dtype) if bias is not None and ctx.needs_input_grad[2] else None
        return dx, dw, db, None, None, None, None


def ms_norm(
    x: torch.Tensor,
    kind: str,
    ndim: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """LayerNorm (``kind="layer_norm"``) or RMSNorm (``"rms_norm"``) over the last
    ``ndim`` dims, with the memory-sharing backward of :class:`_MSNormFn`.

    The output dtype is autocast's where autocast is on, so that the following
    Linear's cast is a no-op and it saves this very tensor; otherwise ``x``'s.
    """
    if kind not in ("layer_norm", "rms_norm"):
        raise ValueError(f"kind must be 'layer_norm' or 'rms_norm', got {kind!r}")
    out_dtype = x.dtype
    if torch.is_autocast_enabled(x.device.type):
        out_dtype = torch.get_autocast_dtype(x.device.type)
    return _MSNormFn.apply(x, weight, bias, kind, ndim, float(eps), out_dtype)


class MSNorm(nn.Module):
    """A norm module with the MS-BP eager backward; shares the replaced module's
    ``weight`` and ``bias`` Parameters (same objects), so optimisers and PEFT
    still see them."""

    def __init__(self, kind: str, ndim: int, eps: float, weight: nn.Parameter | None, bias: nn.Parameter | None):
        super().__init__()
        self.kind, self.ndim, self.eps = kind, ndim, eps
        self.weight, self.bias = weight, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ms_norm(x, self.kind, self.ndim, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, ndim={self.ndim}, eps={self.eps}"


# Hugging Face activation classes by name, so this module never imports transformers.
_HF_ACTIVATIONS = {
    "GELUActivation": "gelu",
    "NewGELUActivation": "gelu_tanh",
    "GELUTanh": "gelu_tanh",
    "PytorchGELUTanh": "gelu_tanh",
    "FastGELUActivation": "gelu_tanh",
    "QuickGELUActivation": "quick_gelu",
    "SiLUActivation": "silu",
}


def _activation_name(m: nn.Module) -> str | None:
    if isinstance(m, nn.GELU):
        return "gelu_tanh" if m.approximate == "tanh" else "gelu"
    if isinstance(m, nn.SiLU):
        return "silu"
    return _HF_ACTIVATIONS.get(type(m).__name__)


def _norm_swap(m: nn.Module) -> MSNorm | None:
    if isinstance(m, nn.LayerNorm):
        return MSNorm("layer_norm", len(m.normalized_shape), m.eps, m.weight, m.bias)
    if isinstance(m, nn.RMSNorm):
        eps = m.eps if m.eps is not None else torch.finfo(torch.float32).eps
        return MSNorm("rms_norm", len(m.normalized_shape), eps, m.weight, None)
    # LlamaRMSNorm and its many copies (Mistral, Qwen2, ...): weight + variance_epsilon.
    weight = getattr(m, "weight", None)
    if type(m).__name__.endswith("RMSNorm") and isinstance(weight, nn.Parameter) and hasattr(m, "variance_epsilon"):
        return MSNorm("rms_norm", 1, float(m.variance_epsilon), weight, None)
    return None


def swap_modules(
    model: nn.Module, bits: int = 2, *, family: str = DEFAULT_TABLE, activations: bool = True, norms: bool = True
) -> dict[str, int]:
    """Replace, in place, GELU/SiLU modules by :class:`ApproxActivation` and
    LayerNorm/RMSNorm modules by :class:`MSNorm`: the paper's method applied
    eagerly. Returns how many of each were swapped, e.g.
    ``{"gelu": 12, "layer_norm": 25}``; activations called as functions
    (``F.gelu`` in a forward) are not modules and stay exact.  ``bits`` and
    ``family`` pick the activations' step table, as in ApproxBPConfig.
    """
    counts: dict[str, int] = {}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            new: nn.Module | None = None
            if activations and (act := _activation_name(child)) is not None:
                new, key = ApproxActivation(act, bits, family), act
            elif norms and (norm := _norm_swap(child)) is not None:
                new, key = norm, norm.kind
            if new is not None:
                setattr(parent, name, new)
                counts[key] = counts.get(key, 0) + 1
    return counts
