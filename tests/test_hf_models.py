"""Real model code: tiny random-init Hugging Face GPT-2, BERT, ViT and LLaMA (no downloads)."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import kept_exact, norm_sites, rewrites, saved_bytes

transformers = pytest.importorskip("transformers")

# Every test here must see its own partitioner reports (the models repeat across tests).
LAYERS = 2


def _gpt2():
    cfg = transformers.GPT2Config(
        n_layer=LAYERS, n_embd=64, n_head=4, vocab_size=101, n_positions=64, activation_function="gelu_new"
    )
    model = transformers.GPT2LMHeadModel(cfg)
    return model, (torch.randint(0, 101, (3, 23)),)


def _bert():
    cfg = transformers.BertConfig(
        num_hidden_layers=LAYERS, hidden_size=64, intermediate_size=160, num_attention_heads=4, vocab_size=101
    )
    model = transformers.BertForSequenceClassification(cfg)
    return model, (torch.randint(0, 101, (3, 23)),)


def _vit():
    cfg = transformers.ViTConfig(
        num_hidden_layers=LAYERS, hidden_size=64, intermediate_size=160, num_attention_heads=4,
        image_size=40, patch_size=8, num_labels=5,
    )
    model = transformers.ViTForImageClassification(cfg)
    return model, (torch.randn(3, 3, 40, 40),)


def _llama():
    cfg = transformers.LlamaConfig(
        num_hidden_layers=LAYERS, hidden_size=64, intermediate_size=160, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=101, max_position_embeddings=64,
    )
    model = transformers.LlamaForCausalLM(cfg)
    return model, (torch.randint(0, 101, (3, 23)),)


def _prepare(build):
    torch.manual_seed(0)
    model, args = build()
    model.train()
    model.config.use_cache = False
    # Dropout off: both compiles then see identical graphs apart from our rewrite.
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model, args


@pytest.mark.parametrize("build", [_gpt2, _bert, _vit], ids=["gpt2", "bert", "vit"])
def test_hf_mlp_sites_are_found_and_shrink_saved_bytes(build):
    model, args = _prepare(build)
    reports = []
    ours = saved_bytes(model, "approxbp", *args, reports=reports)
    theirs = saved_bytes(model, "inductor", *args)
    rewritten = [d.site.activation for r in reports for d in r.sites if d.rewritten and d.rule == "save_act_codes"]
    expected = "gelu_tanh" if build is _gpt2 else "gelu"
    assert rewritten == [expected] * LAYERS
    assert rewrites() == LAYERS
    assert ours < theirs, (ours, theirs)


# Norm sites per model (2 layers): (op, found, rewritten). BERT's and ViT's last
# LayerNorm feeds only the pooler's [CLS] slice / the classifier's [CLS] token, so
# no consumer saves its full output and it stays exact.
NORMS = {
    "gpt2": ("layer_norm", 2 * LAYERS + 1, 2 * LAYERS + 1),  # ln_1, ln_2 per layer, ln_f
    "bert": ("layer_norm", 2 * LAYERS + 1, 2 * LAYERS),  # embeddings LN + 2 per layer
    "vit": ("layer_norm", 2 * LAYERS + 1, 2 * LAYERS),  # 2 per layer + final LN
    "llama": ("rms_norm", 2 * LAYERS + 1, 2 * LAYERS + 1),  # 2 per layer + final norm
}


@pytest.mark.parametrize(
    "build", [_gpt2, _bert, _vit, _llama], ids=["gpt2", "bert", "vit", "llama"]
)
def test_hf_norm_sites_are_found_and_shrink_saved_bytes(build):
    name = build.__name__.lstrip("_")
    op, found, rewritten = NORMS[name]
    model, args = _prepare(build)
    reports = []
    ours = saved_bytes(model, "approxbp", *args, reports=reports)
    theirs = saved_bytes(model, "inductor", *args)
    decisions = norm_sites(reports)
    assert [d.site.op for d in decisions] == [op] * found
    assert rewrites("share_norm_input") == rewritten
    assert kept_exact("share_norm_input") == found - rewritten
    for d in decisions:
        if not d.rewritten:
            assert d.reason == "no consumer saves the normalised output: nothing to share", d.reason
        else:
            assert d.bytes_after < d.bytes_before, (d.bytes_after, d.bytes_before)
    assert ours < theirs, (ours, theirs)
