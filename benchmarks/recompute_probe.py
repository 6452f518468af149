"""Saved bytes with and without inductor's pointwise recompute, for inductor and approxbp.

    python -m benchmarks.recompute_probe      # GPT-2 (2 layers, widths/4, vocab 4096), full fine-tuning, bf16

Prints one line per backend. It is the probe behind docs/performance.md: it asks
whether approxbp's own partition should allow pointwise recompute
(``ban_recompute_materialized_backward=False``). It is not in the harness yet:
that switch has no config field until its GPU step time is known.
"""

from __future__ import annotations

import torch
from torch._functorch import config as fc

from approxbp_fx.measure import saved_activation_bytes

from ._models import MODELS, apply_scenario


def main() -> None:
    spec = MODELS["gpt2-124m"]
    for name, backend, ban in [("inductor", "inductor", True), ("inductor_recompute", "inductor", False),
                               ("approxbp", "approxbp", True), ("approxbp_recompute", "approxbp", False)]:
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = apply_scenario(spec.build(2, 4096, 4), spec, "full").to(torch.bfloat16)
        inputs = spec.inputs(model.config, 2, 63, torch.bfloat16, torch.device("cpu"), torch.Generator().manual_seed(1))
        with fc.patch(ban_recompute_materialized_backward=ban, enable_autograd_cache=False):
            fn = torch.compile(model, backend=backend)
            nbytes = saved_activation_bytes(fn, params=model, loss_fn=lambda out: out.loss, **inputs)
        print(f"{name}: {nbytes}", flush=True)


if __name__ == "__main__":
    main()
