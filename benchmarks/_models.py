"""The benchmark's models: real Hugging Face code, random init from a config, no downloads.

Each :class:`ModelSpec` builds its model at a given depth and vocabulary size
(``None``: the published ones), optionally with every width (hidden size, MLP
size, heads; not the head dimension) divided by ``width_div``. Only CPU runs
shrink models: bf16 matmuls there run at a few GFLOP/s. Makes a batch of inputs whose output has a ``.loss``, and
names the LoRA targets of its two PEFT scenarios.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

SCENARIOS = ("full", "lora_qv", "lora_all")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    build: Callable[[int | None, int | None, int], nn.Module]  # (layers, vocab, width_div); None: published
    inputs: Callable[[object, int, int, torch.dtype, torch.device, torch.Generator], dict]  # (config, batch, ...)
    lora_qv: list[str]
    lora_all: str  # a regex over module names: every Linear/Conv1D in the blocks
    modules_to_save: list[str]  # the task head stays trainable under LoRA
    batch: int  # the GPU grid's default batch
    seq: int  # tokens per sample (ViT: fixed by the image size; reported, not used)
    unit: str  # "tokens" or "images", for throughput


def _instantiate(cls, cfg, depth: str, layers: int | None, width_div: int, *widths: str) -> nn.Module:
    """``cls(cfg)`` after setting the depth attribute to ``layers`` (if given) and
    dividing the ``widths`` attributes by ``width_div`` (heads among them, so the
    head dimension stays)."""
    if layers is not None:
        setattr(cfg, depth, layers)
    for name in widths if width_div != 1 else ():
        value = getattr(cfg, name)
        if value % width_div:
            raise ValueError(f"width_div={width_div} does not divide {name}={value}")
        setattr(cfg, name, value // width_div)
    cfg._attn_implementation = "sdpa"  # the same attention kernel for every backend
    return cls(cfg)


_BERT_WIDTHS = ("hidden_size", "intermediate_size", "num_attention_heads")


def _vit(layers, vocab, width_div=1):
    import transformers

    cfg = transformers.ViTConfig(image_size=224, patch_size=16, num_labels=100)
    return _instantiate(transformers.ViTForImageClassification, cfg, "num_hidden_layers", layers, width_div, *_BERT_WIDTHS)


def _vit_inputs(cfg, batch, seq, dtype, device, gen):
    return {
        "pixel_values": torch.randn(batch, 3, 224, 224, generator=gen).to(device, dtype),
        "labels": torch.randint(0, 100, (batch,), generator=gen).to(device),
    }


def _gpt2(layers, vocab, width_div=1):
    import transformers

    cfg = transformers.GPT2Config(vocab_size=vocab or 50257)
    if vocab:
        cfg.bos_token_id = cfg.eos_token_id = vocab - 1
    # n_inner=None: the MLP is 4 * n_embd wide.
    return _instantiate(transformers.GPT2LMHeadModel, cfg, "n_layer", layers, width_div, "n_embd", "n_head")


def _causal_inputs(cfg, batch, seq, dtype, device, gen):
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=gen).to(device)
    return {"input_ids": ids, "labels": ids}


def _roberta(layers, vocab, width_div=1):
    import transformers

    cfg = transformers.RobertaConfig(
        vocab_size=vocab or 50265, max_position_embeddings=514, type_vocab_size=1, num_labels=2, pad_token_id=1
    )
    return _instantiate(
        transformers.RobertaForSequenceClassification, cfg, "num_hidden_layers", layers, width_div, *_BERT_WIDTHS
    )


def _roberta_inputs(cfg, batch, seq, dtype, device, gen):
    # Ids from 3 up: 1 is padding, which would change the position ids.
    return {
        "input_ids": torch.randint(3, cfg.vocab_size, (batch, seq), generator=gen).to(device),
        "labels": torch.randint(0, 2, (batch,), generator=gen).to(device),
    }


def _llama_1b(layers, vocab, width_div=1):
    import transformers

    # Llama-3.2-1B's shape: 1.24B parameters, SwiGLU + RMSNorm, GQA (32 query, 8 kv heads).
    cfg = transformers.LlamaConfig(
        vocab_size=vocab or 128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=2048,
        rope_theta=500000.0, tie_word_embeddings=True, rms_norm_eps=1e-5,
    )
    model = _instantiate(
        transformers.LlamaForCausalLM, cfg, "num_hidden_layers", layers, width_div, *_BERT_WIDTHS, "num_key_value_heads"
    )
    model.config.use_cache = False
    return model


def _in_blocks(*names: str) -> str:
    """A regex for the named linears of the transformer blocks (not the task head)."""
    return r".*\.(layers|layer|h)\.\d+\..*\.(" + "|".join(names) + ")$"


MODELS: dict[str, ModelSpec] = {
    "vit-b16": ModelSpec(
        "vit-b16", _vit, _vit_inputs, ["q_proj", "v_proj"], _in_blocks("q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"),
        ["classifier"], 64, 197, "images",
    ),
    "gpt2-124m": ModelSpec(
        # GPT-2 fuses q, k and v into one Conv1D (c_attn): "q and v" LoRA is LoRA on c_attn.
        "gpt2-124m", _gpt2, _causal_inputs, ["c_attn"], _in_blocks("c_attn", "c_proj", "c_fc"), [], 8, 1024,
        "tokens",
    ),
    "roberta-base": ModelSpec(
        "roberta-base", _roberta, _roberta_inputs, ["query", "value"], _in_blocks("query", "key", "value", "dense"),
        ["classifier"], 32, 256,
        "tokens",
    ),
    "llama-1b": ModelSpec(
        "llama-1b", _llama_1b, _causal_inputs, ["q_proj", "v_proj"],
        _in_blocks("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), [], 4, 1024,
        "tokens",
    ),
}


def apply_scenario(model: nn.Module, spec: ModelSpec, scenario: str) -> nn.Module:
    """Full fine-tuning (every parameter trains) or PEFT LoRA r=16, alpha=32."""
    if scenario == "full":
        return model
    if scenario not in SCENARIOS:
        raise ValueError(f"scenario must be one of {SCENARIOS}, got {scenario!r}")
    import peft

    targets = spec.lora_qv if scenario == "lora_qv" else spec.lora_all
    cfg = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=targets,
                          modules_to_save=spec.modules_to_save or None)
    return peft.get_peft_model(model, cfg)
