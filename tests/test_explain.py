"""approxbp_fx.explain(): what it accepts, and the figures it reports."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import approxbp_fx
from approxbp_fx import ApproxBPConfig
from tests.conftest import MLP

X = (5, 29, 64)


def _model():
    torch.manual_seed(0)
    return MLP(nn.GELU(), frozen_second=True).bfloat16(), torch.randn(*X, dtype=torch.bfloat16)


def _figures(exp):
    return exp.eager_bytes, exp.inductor_bytes, exp.approxbp_bytes, exp.sites


def test_a_compiled_model_gets_the_figures_of_the_plain_one():
    model, x = _model()
    plain = approxbp_fx.explain(model, x)
    # README's pattern: the model is already wrapped when explain() is called.
    # Through the wrapper, "eager" used to run approxbp's graph and report its bytes.
    compiled = approxbp_fx.explain(torch.compile(model, backend="approxbp"), x)
    assert _figures(compiled) == _figures(plain)
    assert plain.approxbp_bytes < plain.eager_bytes


class _Calls(nn.Module):
    """Counts forward calls: a refused call must not reach the model."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x)


@pytest.mark.parametrize(
    "args,kwargs,match",
    [
        ((), {}, r"needs the model's example inputs.*explain\(model, \*\*batch\)"),
        (("config", "x"), {}, r"config=ApproxBPConfig"),
        (("x", "config"), {}, r"config=ApproxBPConfig"),
        (("x", "loss"), {}, r"too many positional arguments.*loss_fn="),
        (("x",), {"y": "x"}, r"unexpected keyword argument 'y'.*Call explain\(model, x\)"),
    ],
    ids=["no input", "config first", "config after input", "loss positional", "unknown keyword"],
)
def test_misplaced_arguments_are_refused_with_what_to_pass(args, kwargs, match):
    inner, x = _model()
    model = _Calls(inner)
    values = {"x": x, "config": ApproxBPConfig(), "loss": lambda out: out.sum()}
    with pytest.raises(TypeError, match=match):
        approxbp_fx.explain(model, *(values[a] for a in args), **{k: values[v] for k, v in kwargs.items()})
    assert model.calls == 0


def test_a_batch_dict_passed_positionally_to_a_keyword_model_is_refused():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16)
    model = transformers.GPT2LMHeadModel(cfg)
    ids = torch.randint(0, 64, (2, 7))
    batch = transformers.BatchEncoding({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    with pytest.raises(TypeError, match=r"dict of inputs \(input_ids, attention_mask\).*explain\(model, \*\*batch\)"):
        approxbp_fx.explain(model, batch)


class _TakesADict(nn.Module):
    """A forward that really takes a dict: explain(model, batch) is right for it."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, batch):
        return self.inner(batch["x"])


def test_a_model_that_takes_a_dict_still_gets_one():
    inner, x = _model()
    exp = approxbp_fx.explain(_TakesADict(inner), {"x": x})
    assert [s.op for s in exp.sites] == ["gelu"]
    assert exp.approxbp_bytes < exp.inductor_bytes


def test_the_report_names_the_step_table():
    model, x = _model()
    exp = approxbp_fx.explain(model, x, config=ApproxBPConfig(bits=3, table="paper"))
    assert (exp.bits, exp.table) == (3, "paper")
    assert "activation backward: 3-bit step derivative, 'paper' tables" in str(exp).splitlines()
