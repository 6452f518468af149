"""Real model code: tiny random-init Hugging Face GPT-2, BERT and ViT (no downloads)."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import rewrites, saved_bytes

transformers = pytest.importorskip("transformers")

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


@pytest.mark.parametrize("build", [_gpt2, _bert, _vit], ids=["gpt2", "bert", "vit"])
def test_hf_mlp_sites_are_found_and_shrink_saved_bytes(build):
    torch.manual_seed(0)
    model, args = build()
    model.train()
    model.config.use_cache = False
    # Dropout off: both compiles then see identical graphs apart from our rewrite.
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    reports = []
    ours = saved_bytes(model, "approxbp", *args, reports=reports)
    theirs = saved_bytes(model, "inductor", *args)
    rewritten = [d.site.activation for r in reports for d in r.sites if d.rewritten and d.rule == "save_act_codes"]
    expected = "gelu_tanh" if build is _gpt2 else "gelu"
    assert rewritten == [expected] * LAYERS
    assert rewrites() == LAYERS
    assert ours < theirs, (ours, theirs)
