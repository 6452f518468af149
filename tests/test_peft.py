"""PEFT LoRA on a tiny Hugging Face LLaMA under ``backend="approxbp"``.

Under LoRA the base Linear is frozen: its backward needs only its weight,
so of the layers that read a norm's output y, only the adapters' A matmuls
save it (for dA = dZᵀ·y). q_proj's and v_proj's adapters read the same y and
save it once. MS-BP then takes the norm's backward from that y, so the
norm's input, which inductor saves besides y, leaves the saved set. A norm
whose consumers are all frozen (no adapter) saves no y to share and stays
exact; so does one whose backward never runs (layer 0's input norm: the
embedding is frozen, nothing upstream needs a gradient).
"""

from __future__ import annotations

import pytest
import torch

from benchmarks._models import MODELS
from tests.conftest import compiled, norm_sites, rewrites
from tests.test_hf_models import LAYERS, _llama, _prepare

peft = pytest.importorskip("peft")

# LLaMA's norms in forward order: per layer input_layernorm (-> q, k, v) and
# post_attention_layernorm (-> gate, up), then the final norm (-> frozen lm_head).
# Per scenario, which of them share their input away.
SHARED = {
    "lora_qv": [False, False] + [True, False] * (LAYERS - 1) + [False],
    "lora_all": [False, True] + [True, True] * (LAYERS - 1) + [False],
}


def _lora(scenario: str):
    model, args = _prepare(_llama)
    spec = MODELS["llama-1b"]  # the benchmark's LoRA targets for LLaMA
    targets = spec.lora_qv if scenario == "lora_qv" else spec.lora_all
    # init_lora_weights=False: B random, not zero, so A's gradient is not zero.
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, init_lora_weights=False)
    return peft.get_peft_model(model, cfg), args


def _norm_io(model, args) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input, output) of every RMSNorm in forward order, from one eager forward."""
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append((i[0].detach(), o.detach())))
             for m in model.modules() if type(m).__name__ == "LlamaRMSNorm"]
    with torch.no_grad():
        model(*args)
    for h in hooks:
        h.remove()
    return seen


def _saved(model, tier, args, reports=None) -> list[torch.Tensor]:
    """Every distinct storage saved for backward by one compiled forward; runs backward."""
    saved: dict[int, torch.Tensor] = {}

    def pack(t):
        saved.setdefault(t.untyped_storage().data_ptr(), t.detach())
        return t

    fn = compiled(model, tier, reports=reports)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    out.logits.sum().backward()
    return list(saved.values())


def _copies(saved, t) -> int:
    """How many saved tensors hold ``t``'s values (up to compile rounding), whatever their view."""
    return sum(s.numel() == t.numel() and torch.allclose(s.reshape(t.shape), t, rtol=1e-4, atol=1e-5) for s in saved)


def _lora_grads(model) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n}
    model.zero_grad(set_to_none=True)
    return grads


# lora_all shares three norms, lora_qv one: the latter adds ~20 s for little news.
@pytest.mark.parametrize("scenario", [pytest.param("lora_qv", marks=pytest.mark.slow), "lora_all"])
def test_lora_adapter_and_norm_share_one_saved_tensor(scenario):
    model, args = _lora(scenario)
    norms = _norm_io(model, args)
    reports = []
    ours = _saved(model, "approxbp", args, reports)
    ours_grads = _lora_grads(model)
    torch._dynamo.reset()
    theirs = _saved(model, "inductor", args)
    theirs_grads = _lora_grads(model)

    decisions = norm_sites(reports)
    assert [d.site.op for d in decisions] == ["rms_norm"] * len(norms)
    assert [d.rewritten for d in decisions] == SHARED[scenario], [d.reason for d in decisions]
    assert rewrites("share_norm_input") == sum(SHARED[scenario])
    for i, ((x, y), d) in enumerate(zip(norms, decisions)):
        if d.rewritten:
            # Inductor saves y once for every adapter that reads it, and x besides.
            assert (_copies(theirs, y), _copies(theirs, x)) == (1, 1), i
            # We save y once, for the adapters and the norm alike, and not x.
            assert (_copies(ours, y), _copies(ours, x)) == (1, 0), i
    nbytes = lambda ts: sum(t.untyped_storage().nbytes() for t in ts)
    assert nbytes(ours) < nbytes(theirs)

    # MS-BP is exact and SwiGLU's silu stays exact here (kept: inductor
    # recomputes it), so the adapters' gradients match inductor's.
    assert ours_grads.keys() == theirs_grads.keys() and len(ours_grads) > 0
    for name, g in theirs_grads.items():
        cos = torch.nn.functional.cosine_similarity(ours_grads[name].flatten(), g.flatten(), dim=0)
        assert cos >= 0.999, (name, cos.item())
