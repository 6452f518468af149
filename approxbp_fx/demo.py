"""The main job: compile a small built-in model three ways and show what each saves.

    python -m approxbp_fx.demo            # or: approxbp-demo

Builds a 4-block pre-LN transformer MLP stack (GELU, bf16, second linear of
each block frozen as in adapter fine-tuning, plus one fully trainable block),
prints the saved activation bytes of eager, inductor and approxbp for one
training step, the per-site report, and a few training losses of inductor
against approxbp from the same initial weights and data.
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch import nn

from .backend import backend
from .explain import Explanation, explain
from .measure import saved_activation_bytes


class Block(nn.Module):
    def __init__(self, d: int, hidden: int, act: nn.Module) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, hidden)
        self.act = act
        self.fc2 = nn.Linear(hidden, d)

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


class DemoModel(nn.Module):
    """Token classifier: embedding, MLP blocks, head."""

    def __init__(self, vocab=512, d=128, hidden=512, blocks=4, classes=8):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        acts = [nn.GELU(), nn.GELU(approximate="tanh"), nn.SiLU(), nn.GELU()]
        self.blocks = nn.Sequential(*(Block(d, hidden, acts[i % len(acts)]) for i in range(blocks)))
        self.head = nn.Linear(d, classes)

    def forward(self, tokens):
        return self.head(self.blocks(self.embed(tokens)))


def _data(steps: int, batch: int, seq: int, vocab: int, classes: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    # A learnable task: the class is the token id modulo the class count.
    for _ in range(steps):
        tokens = torch.randint(0, vocab, (batch, seq), generator=g)
        yield tokens, tokens % classes


def _train(model: nn.Module, compiled, steps: int, args) -> list[float]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    losses = []
    for tokens, labels in _data(steps, args.batch, args.seq, 512, 8, seed=1):
        logits = compiled(tokens)
        loss = nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def build(batch: int = 4, seq: int = 61, dtype: torch.dtype = torch.bfloat16) -> tuple[DemoModel, torch.Tensor]:
    """The demo's model and one batch of tokens, the same on every call."""
    torch.manual_seed(0)
    model = DemoModel().to(dtype)
    # Adapter-style fine-tuning: freeze the second linear of all blocks but the last.
    for blk in model.blocks[:-1]:
        blk.fc2.requires_grad_(False)
    tokens = torch.randint(0, 512, (batch, seq), generator=torch.Generator().manual_seed(0))
    return model, tokens


def report(batch: int = 4, seq: int = 61, dtype: torch.dtype = torch.bfloat16) -> Explanation:
    """What the demo prints first; README's explain() sample is this at the defaults
    (benchmarks/readme_sample.py writes it there, tests/test_readme.py checks it)."""
    model, tokens = build(batch, seq, dtype)
    return explain(model, tokens)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=8, help="training steps per backend")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=61, help="tokens per sequence (61: matches no weight shape)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    args = p.parse_args(argv)

    model, tokens = build(args.batch, args.seq, getattr(torch, args.dtype))
    print(f"DemoModel, {args.dtype}, batch {args.batch} x {args.seq} tokens, torch {torch.__version__}\n")
    result = explain(model, tokens)
    print(result)

    print(f"\ntraining losses, {args.steps} steps each (same init, same data):")
    exact_model, approx_model = copy.deepcopy(model), copy.deepcopy(model)
    exact = _train(exact_model, torch.compile(exact_model, backend="inductor"), args.steps, args)
    approx = _train(approx_model, torch.compile(approx_model, backend=backend()), args.steps, args)
    print(f"{'step':>4} {'inductor':>10} {'approxbp':>10}")
    for i, (a, b) in enumerate(zip(exact, approx)):
        print(f"{i:>4} {a:>10.4f} {b:>10.4f}")
    ours = saved_activation_bytes(torch.compile(approx_model, backend=backend()), tokens, params=approx_model)
    print(f"\napproxbp saves {result.ratio:.3f}x of inductor's activation bytes ({ours} B per step).")


if __name__ == "__main__":
    main()
