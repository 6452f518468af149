"""Every spelling of an activation and of a norm that real model code uses.

One table each, keyed by the op approxbp must recognise: the pass tests
(tests/conftest.py re-exports them) and the gradient fuzzer
(benchmarks/_fuzz_nets.py) draw from the same spellings. The fuzzers build
their Hugging Face spellings with :func:`hf_act` and :func:`hf_norm`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

def hf_act(name: str):
    """A factory of Hugging Face's ``ACT2FN[name]``."""

    # Imported lazily: transformers costs ~2 s to import, and only these forms need it.
    def make():
        from transformers.activations import ACT2FN

        return ACT2FN[name]

    return make


# Every spelling of an activation that real model code uses, keyed by the
# activation the pass should recognise.
ACT_FORMS = {
    "nn.GELU": ("gelu", nn.GELU()),
    "F.gelu(tanh)": ("gelu_tanh", lambda x: F.gelu(x, approximate="tanh")),
    # Hugging Face GPT-2's NewGELUActivation, verbatim maths.
    "NewGELU": (
        "gelu_tanh",
        lambda x: 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0)))),
    ),
    # Hugging Face's FastGELUActivation.
    "FastGELU": ("gelu_tanh", lambda x: 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))),
    "QuickGELU": ("quick_gelu", lambda x: x * torch.sigmoid(1.702 * x)),
    "nn.SiLU": ("silu", nn.SiLU()),
    "x*sigmoid(x)": ("silu", lambda x: x * torch.sigmoid(x)),
}


class FunctionalLayerNorm(nn.Module):
    """``F.layer_norm`` with its own weight and bias, as hand-written model code calls it."""

    def __init__(self, d, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))
        self.bias = nn.Parameter(torch.zeros(d))

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


class FunctionalRMSNorm(nn.Module):
    """``F.rms_norm`` with its own weight."""

    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


def hf_norm(module: str, cls: str):
    """A factory(width) of the norm class ``cls`` in ``transformers.models.<module>``."""

    # Imported lazily: transformers is only needed by the forms that build these.
    def make(d):
        import importlib

        return getattr(importlib.import_module(f"transformers.models.{module}"), cls)(d)

    return make


# Every spelling of a normalisation that real model code uses, keyed by the
# op the share_norm_input rule should report: name -> (op, factory(d)).
NORM_FORMS = {
    "nn.LayerNorm": ("layer_norm", lambda d: nn.LayerNorm(d)),
    "nn.LayerNorm(bias=False)": ("layer_norm", lambda d: nn.LayerNorm(d, bias=False)),
    "nn.LayerNorm(no affine)": ("layer_norm", lambda d: nn.LayerNorm(d, elementwise_affine=False)),
    "F.layer_norm": ("layer_norm", FunctionalLayerNorm),
    "nn.RMSNorm": ("rms_norm", lambda d: nn.RMSNorm(d)),
    "F.rms_norm": ("rms_norm", FunctionalRMSNorm),
    "LlamaRMSNorm": ("rms_norm", hf_norm("llama.modeling_llama", "LlamaRMSNorm")),
    "T5LayerNorm": ("rms_norm", hf_norm("t5.modeling_t5", "T5LayerNorm")),
    # (1 + weight) scaling, zero-initialised weight.
    "GemmaRMSNorm": ("rms_norm", hf_norm("gemma.modeling_gemma", "GemmaRMSNorm")),
}
