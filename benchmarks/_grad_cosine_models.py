"""The models of benchmarks/grad_cosine.py: small random-init Hugging Face configs, one per family, and MiniLM.

Each entry builds a :class:`Bench`: the model (``eval()``: dropout off, so the
arms' forwards agree), a ``load(seed)`` that puts that seed's initial weights
into it in place (the compiled modules read them; nothing recompiles) and
returns that seed's inputs, and the scalar loss of an output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

VOCAB, SEQ, BATCH, WIDTH, LAYERS, HEADS = 1000, 64, 4, 128, 4, 4
IMAGE, PATCH = 32, 4


@dataclass
class Bench:
    describe: str
    model: nn.Module
    fresh: Callable[[int], dict]  # seed -> {"state": initial weights, "inputs": ...}
    loss: Callable[[object], torch.Tensor]

    def load(self, seed: int) -> dict:
        got = self.fresh(seed)
        with torch.no_grad():
            for name, p in self.model.state_dict(keep_vars=True).items():
                p.copy_(got["state"][name])
        return got["inputs"]


def _random_init(describe: str, build: Callable[[], nn.Module], inputs: Callable[[torch.Generator], dict],
                 loss=lambda out: out.loss) -> Bench:
    """A Hugging Face model at random init: seed ``s`` builds it anew under ``manual_seed(s)``."""
    def fresh(seed: int) -> dict:
        torch.manual_seed(seed)
        state = build().state_dict()
        return {"state": state, "inputs": inputs(torch.Generator().manual_seed(seed))}

    torch.manual_seed(0)
    return Bench(describe, build().eval(), fresh, loss)


def _ids(gen: torch.Generator, low: int = 0) -> torch.Tensor:
    return torch.randint(low, VOCAB, (BATCH, SEQ), generator=gen)


def _sdpa(cfg):
    cfg._attn_implementation = "sdpa"  # the same attention kernel for every backend
    return cfg


def bert() -> Bench:
    import transformers as T

    cfg = _sdpa(T.BertConfig(vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                             intermediate_size=4 * WIDTH, num_labels=3))
    return _random_init("BERT encoder (GELU, post-LN), random init", lambda: T.BertForSequenceClassification(cfg),
                        lambda g: {"input_ids": _ids(g), "labels": torch.randint(0, 3, (BATCH,), generator=g)})


def roberta() -> Bench:
    import transformers as T

    cfg = _sdpa(T.RobertaConfig(vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=LAYERS,
                                num_attention_heads=HEADS, intermediate_size=4 * WIDTH, num_labels=3,
                                max_position_embeddings=SEQ + 2, pad_token_id=1))
    # Ids from 3 up: 1 is padding, which would change the position ids.
    return _random_init("RoBERTa encoder (GELU, post-LN), random init",
                        lambda: T.RobertaForSequenceClassification(cfg),
                        lambda g: {"input_ids": _ids(g, 3), "labels": torch.randint(0, 3, (BATCH,), generator=g)})


def _gpt2(activation: str, describe: str) -> Bench:
    import transformers as T

    cfg = _sdpa(T.GPT2Config(vocab_size=VOCAB, n_embd=WIDTH, n_layer=LAYERS, n_head=HEADS, n_positions=SEQ,
                             activation_function=activation))
    return _random_init(describe, lambda: T.GPT2LMHeadModel(cfg), lambda g: {"input_ids": (i := _ids(g)), "labels": i})


def gpt2() -> Bench:
    return _gpt2("gelu_new", "GPT-2 decoder (tanh GELU, pre-LN), random init")


def gpt2_silu() -> Bench:
    return _gpt2("silu", "GPT-2 decoder with a plain SiLU MLP, random init")


def llama() -> Bench:
    import transformers as T

    cfg = _sdpa(T.LlamaConfig(vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=344, num_hidden_layers=LAYERS,
                              num_attention_heads=HEADS, num_key_value_heads=2, max_position_embeddings=SEQ,
                              use_cache=False))
    return _random_init("LLaMA decoder (SwiGLU: its SiLU stays exact; RMSNorm), random init",
                        lambda: T.LlamaForCausalLM(cfg), lambda g: {"input_ids": (i := _ids(g)), "labels": i})


def vit() -> Bench:
    import transformers as T

    cfg = _sdpa(T.ViTConfig(image_size=IMAGE, patch_size=PATCH, hidden_size=WIDTH, num_hidden_layers=LAYERS,
                            num_attention_heads=HEADS, intermediate_size=4 * WIDTH, num_labels=10))
    return _random_init("ViT (GELU, pre-LN), random init", lambda: T.ViTForImageClassification(cfg),
                        lambda g: {"pixel_values": torch.randn(BATCH, 3, IMAGE, IMAGE, generator=g),
                                   "labels": torch.randint(0, 10, (BATCH,), generator=g)})


def clip_vision() -> Bench:
    import transformers as T

    vision = dict(image_size=IMAGE, patch_size=PATCH, hidden_size=WIDTH, num_hidden_layers=LAYERS,
                  num_attention_heads=HEADS, intermediate_size=4 * WIDTH, hidden_act="quick_gelu")
    cfg = _sdpa(T.CLIPConfig(vision_config=vision, num_labels=10))
    cfg.vision_config._attn_implementation = "sdpa"
    # A classifier on the vision tower (the text tower is not built): a loss whose gradient
    # reaches every block, unlike a function of the pooled output alone, which the final
    # LayerNorm's parameters dominate (whole-model cosine 1 - 1e-10 for either table).
    return _random_init("CLIP vision tower + classifier (QuickGELU, pre-LN), random init",
                        lambda: T.CLIPForImageClassification(cfg),
                        lambda g: {"pixel_values": torch.randn(BATCH, 3, IMAGE, IMAGE, generator=g),
                                   "labels": torch.randint(0, 10, (BATCH,), generator=g)})


def minilm() -> Bench:
    """The pretrained all-MiniLM-L6-v2 of the fidelity tasks, on 8 BBC News documents of 128 tokens:
    seed ``s`` draws the classifier head (as the fidelity runs do) and the documents."""
    from ._fidelity_tasks import TASKS

    task = TASKS["minilm-bbc-full"]()
    model = task.model.eval()
    pretrained = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def fresh(seed: int) -> dict:
        with torch.no_grad():
            for k, v in model.state_dict().items():
                v.copy_(pretrained[k])
        torch.manual_seed(seed)
        task.reinit()
        docs = torch.randperm(task.n_train, generator=torch.Generator().manual_seed(seed))[:8]
        return {"state": {k: v.detach().clone() for k, v in model.state_dict().items()}, "inputs": task.batch(docs)}

    return Bench("all-MiniLM-L6-v2, pretrained (GELU, post-LN), BBC News, 8 x 128 tokens", model, fresh,
                 lambda out: out.loss)


MODELS: dict[str, Callable[[], Bench]] = {
    "bert": bert, "roberta": roberta, "gpt2": gpt2, "gpt2-silu": gpt2_silu, "llama": llama, "vit": vit,
    "clip-vision": clip_vision, "minilm": minilm,
}
