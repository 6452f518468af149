"""The pack_bool_masks rule: a dropout mask saved a bit an element, forward and gradients unchanged."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from approxbp_fx import ApproxBPConfig, saved_activation_bytes
from tests.conftest import MLP, RULES_VS_INDUCTOR, compiled, kept_exact, rewrites

X_SHAPE = (3, 37, 64)
MASK = 3 * 37 * 200  # the dropout mask after fc1's 200 outputs


def _step(model, tier, x, cfg=None, reports=None):
    """(out, saved bytes, parameter gradients) of one step, the dropout seed fixed."""
    torch._dynamo.reset()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    fn = compiled(model, tier, cfg, reports)
    out = []
    saved = saved_activation_bytes(lambda t: out.append(fn(t)) or out[-1], x, params=model)
    return out[0], saved, [p.grad.clone() for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("tier", ["aot_eager", "approxbp"])
def test_a_dropout_mask_is_saved_a_bit_an_element_and_nothing_else_changes(tier):
    torch.manual_seed(0)
    model = MLP(nn.GELU(), dropout=0.1).train()
    x = torch.randn(*X_SHAPE)
    # The peer: every rule but this one, so the GELU is approximated alike on both sides.
    peer_cfg = ApproxBPConfig(pack_bool_masks=False, recompute="banned")
    their_out, theirs, their_grads = _step(model, tier, x, cfg=peer_cfg)
    reports = []
    out, ours, grads = _step(model, tier, x, reports=reports)
    masks = [d for r in reports for d in r.sites if d.rule == "pack_bool_masks"]
    assert [(d.site.op, d.site.shape, d.rewritten) for d in masks] == [("bool mask", (3, 37, 200), True)]
    assert (masks[0].bytes_before, masks[0].bytes_after) == (MASK, math.ceil(MASK / 8))
    assert theirs - ours >= MASK - math.ceil(MASK / 8)
    assert rewrites("pack_bool_masks") == 1 and kept_exact("pack_bool_masks") == 0
    # The mask is unpacked bit for bit: the same forward, the same gradients.
    assert torch.equal(out, their_out)
    for a, b in zip(grads, their_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_switched_off_finds_no_mask():
    torch.manual_seed(0)
    model, x = MLP(nn.GELU(), dropout=0.1).train(), torch.randn(*X_SHAPE)
    reports = []
    _step(model, "approxbp", x, cfg=ApproxBPConfig(pack_bool_masks=False, recompute="banned"), reports=reports)
    assert not [d for r in reports for d in r.sites if d.rule == "pack_bool_masks"]


def test_a_small_mask_stays_as_it_is_and_says_why():
    torch.manual_seed(0)
    model, x = MLP(nn.GELU(), d=8, hidden=16, dropout=0.1).train(), torch.randn(2, 3, 8)
    reports = []
    _step(model, "approxbp", x, cfg=RULES_VS_INDUCTOR, reports=reports)
    (d,) = [d for r in reports for d in r.sites if d.rule == "pack_bool_masks"]
    assert not d.rewritten and d.reason == "96 elements: too small to pay for the pack"


class _DropoutAttention(nn.Module):
    """softmax(q kᵀ) → dropout → @ v: backward reads the dropped probabilities for v's gradient."""

    def __init__(self, d: int = 64) -> None:
        super().__init__()
        self.qkv, self.drop = nn.Linear(d, 3 * d), nn.Dropout(0.1)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)
        return self.drop(torch.softmax(q @ k.transpose(-1, -2), -1)) @ v


def _spy_trials(monkeypatch) -> list[bool]:
    """For every partitioner run from now on: did its graph hold a packed mask?"""
    from approxbp_fx.partition import ApproxBPPartitioner

    trials = []
    partition = ApproxBPPartitioner._partition

    def spy(self, gm, *args):
        trials.append(any(n.target is torch.ops.approxbp.pack_bits.default for n in gm.graph.nodes))
        return partition(self, gm, *args)

    monkeypatch.setattr(ApproxBPPartitioner, "_partition", spy)
    return trials


@pytest.mark.parametrize("recompute", ["allowed", "banned"])
def test_a_mask_that_backward_recomputes_from_is_predicted_not_to_pay_without_a_trial(monkeypatch, recompute):
    # With pointwise recompute allowed, inductor saves the mask and recomputes
    # probs * mask * scale in backward, so a packed copy would be saved beside
    # the mask. Predicted, not tried: no partitioner run sees a packed mask.
    trials = _spy_trials(monkeypatch)
    torch.manual_seed(0)
    reports = []
    _step(_DropoutAttention().train(), "approxbp", torch.randn(2, 64, 64), ApproxBPConfig(recompute=recompute), reports)
    (d,) = [d for r in reports for d in r.sites if d.rule == "pack_bool_masks"]
    if recompute == "allowed":
        assert (d.rewritten, any(trials)) == (False, False)
        assert d.reason == "backward recomputes aten.mul.Tensor from the mask, so it would still read it"
    else:  # inductor's default saves the dropped probabilities: the mask is read by the gradient alone
        assert (d.rewritten, trials.count(True)) == (True, 1)


def test_every_residual_dropout_mask_of_bf16_gpt2_is_packed_with_pointwise_recompute_allowed(monkeypatch):
    # With recompute allowed, inductor recomputes the embedding dropout's output
    # (the first LayerNorm's input) in backward from the mask; MS-LN then stops
    # backward from reading it, and the mask pays. Judged alone, the mask would
    # look as if it stayed: its prediction sees that MS-LN is predicted to
    # rewrite that norm. The attention masks stay, predicted so: one trial.
    transformers = pytest.importorskip("transformers")
    trials = _spy_trials(monkeypatch)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=61, n_positions=32)
    ).train().bfloat16()
    ids = torch.randint(0, 61, (2, 32))
    reports = []
    torch._dynamo.reset()
    fn = compiled(model, "approxbp", ApproxBPConfig(recompute="allowed"), reports)
    fn(ids, labels=ids).loss.backward()
    masks = [d for r in reports for d in r.sites if d.rule == "pack_bool_masks"]
    residual = [d for d in masks if d.site.shape == (2, 32, 64)]
    assert len(residual) == 5  # embedding, then attention and MLP output per layer
    assert all(d.rewritten for d in residual), [d.reason for d in residual if not d.rewritten]
    attention = [d for d in masks if d.site.shape == (2, 4, 32, 32)]
    assert len(attention) == 2 and not any(d.rewritten for d in attention)
    assert all(d.reason.startswith("backward recomputes") for d in attention)
    assert trials.count(True) == 1  # the one trial holds every residual mask and no refuted one


def test_a_mask_whose_recompute_needs_an_input_nobody_else_needs_is_tried_not_predicted():
    # RoBERTa under autocast: the last layer's output dropout feeds the residual
    # add into a LayerNorm kept exact, so backward recomputes the add from the
    # mask and the dense output. That output is needed for nothing else: once
    # the mask is packed, the partitioner saves the sum instead, and the pack
    # pays. Only the trial can tell; a prediction from the mask must not hold it.
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.RobertaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                        intermediate_size=256, vocab_size=61, max_position_embeddings=40)
    model = transformers.RobertaForSequenceClassification(config).train()
    ids = torch.randint(3, 61, (2, 32))
    reports = []
    torch._dynamo.reset()
    fn = compiled(model, "approxbp", ApproxBPConfig(recompute="allowed"), reports)
    with torch.autocast("cpu", torch.bfloat16):
        loss = fn(input_ids=ids, labels=torch.tensor([0, 1])).loss
    loss.backward()
    residual = [d for r in reports for d in r.sites if d.rule == "pack_bool_masks" and d.site.shape == (2, 32, 64)]
    assert len(residual) == 5  # embedding, then attention and MLP output per layer
    # The embedding's is refuted by the trial (its recompute feeds a bf16 cast for q, k, v); the rest pay.
    assert [d.rewritten for d in residual] == [False, True, True, True, True], [d.reason for d in residual]
    assert residual[0].reason.startswith("measured:")
