"""The forward-equivalence check: approxbp's forward is inductor's, bit for bit.

Shared by tests/test_forward_fuzz.py and benchmarks/forward_fuzz.py. It takes
any spec with the interface of :class:`_forward_nets.ForwardSpec` (``build()``,
``config()``, ``seed``, ``autocast``, ``has_dropout``) and imports neither that
module nor tests/.

The property: ``torch.compile(model, backend=approxbp)`` must return what
``backend="inductor"`` returns: same dtype and shape, NaN at the same positions
and ``torch.equal`` everywhere else (so -0.0 == 0.0, and NaN payloads are not
compared). Both compiles must succeed, forward and backward:
``out.float().sum().backward()`` makes AOTAutograd build and partition the whole
joint graph, which is where the rewrite runs; NaN gradients are fine. An example
inductor itself cannot run is not evidence either way (:class:`PeerFailed`).
Dropout: under ``torch._inductor.config.fallback_random=True`` compiled random
ops call aten's in eager's order, and every forward starts from the same seed.
"""

from __future__ import annotations

import contextlib

import torch

import approxbp_fx


class PeerFailed(Exception):
    """``backend="inductor"`` itself failed on this example: not evidence either way."""


@contextlib.contextmanager
def compile_env(spec):
    """No AOTAutograd cache (every compile partitions afresh) and, where dropout is
    live, eager-order RNG, so both backends draw the same masks."""
    from torch._functorch import config as functorch_config
    from torch._inductor import config as inductor_config

    with contextlib.ExitStack() as stack:
        stack.enter_context(functorch_config.patch(enable_autograd_cache=False))
        if spec.has_dropout:
            stack.enter_context(inductor_config.patch(fallback_random=True))
        yield


def _run(spec, model: torch.nn.Module, x: torch.Tensor, backend) -> torch.Tensor:
    """One seeded forward through ``torch.compile(model, backend=backend)``, and its backward."""
    torch._dynamo.reset()
    for p in model.parameters():
        p.grad = None
    xin = x.detach().requires_grad_(True)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if spec.autocast else contextlib.nullcontext()
    compiled = torch.compile(model, backend=backend)
    with compile_env(spec):
        torch.manual_seed(spec.seed + 1)
        with autocast:
            out = compiled(xin)
        out.float().sum().backward()
    torch._dynamo.reset()
    return out.detach()


def ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise distance of ``a`` and ``b`` in representable values of their dtype (1: adjacent floats)."""
    bits = torch.finfo(a.dtype).bits
    ints = {16: torch.int16, 32: torch.int32, 64: torch.int64}[bits]

    def ordered(t):  # sign-magnitude bits -> integers in the floats' order
        i = t.contiguous().view(ints).long()
        return torch.where(i >= 0, i, -i - 2 ** (bits - 1))

    return (ordered(a) - ordered(b)).abs()


# Differences up to this many ulps are reported as rounding (fusion or formula order),
# beyond it as a changed value: the two are different bugs to the minimiser.
ROUNDING_ULPS = 4


def mismatch(ours: torch.Tensor, theirs: torch.Tensor) -> str | None:
    """Why ``ours`` is not bit for bit ``theirs`` (NaN == NaN at the same positions), or None.

    The message's head (up to the first ": ") names the kind of difference."""
    if ours.dtype != theirs.dtype or ours.shape != theirs.shape:
        return (f"output differs in type: approxbp {ours.dtype}{list(ours.shape)}, "
                f"inductor {theirs.dtype}{list(theirs.shape)}")
    nan_o, nan_t = ours.isnan(), theirs.isnan()
    n = ours.numel()
    if not torch.equal(nan_o, nan_t):
        return (f"NaN at different positions: {int((nan_o ^ nan_t).sum())} of {n} elements "
                f"(approxbp {int(nan_o.sum())} NaN, inductor {int(nan_t.sum())})")
    a, b = ours[~nan_o], theirs[~nan_t]
    if torch.equal(a, b):
        return None
    differ = a != b
    finite = differ & a.isfinite() & b.isfinite()
    nonfinite = differ & ~finite

    def first(mask):
        i = int(mask.nonzero()[0, 0])
        return f"first: approxbp {a[i].item()!r} vs inductor {b[i].item()!r}"

    if nonfinite.any():
        return (f"forward differs in non-finite values: {int(nonfinite.sum())} of {n} elements "
                f"({int(differ.sum())} differ in all); {first(nonfinite)}")
    worst = int(ulps(a[finite], b[finite]).max())
    kind = "by rounding" if worst <= ROUNDING_ULPS else "beyond rounding"
    diff = (a[finite].double() - b[finite].double()).abs().max().item()
    return (f"forward differs {kind}: {int(differ.sum())} of {n} elements, max {worst} ulp "
            f"(|diff| {diff:.3g}); {first(differ)}")


def check(spec) -> dict:
    """Compile ``spec``'s model with inductor and with approxbp; assert the forwards agree bit for bit.

    Raises :class:`PeerFailed` if inductor fails, whatever approxbp raises if
    it fails, and ``AssertionError`` on a forward mismatch. Returns a summary.
    """
    model, x = spec.build()
    try:
        theirs = _run(spec, model, x, "inductor")
    except Exception as e:
        raise PeerFailed(f"{type(e).__name__}: {str(e)[:300]}") from e
    reports = []
    ours = _run(spec, model, x, approxbp_fx.backend(spec.config(), on_report=reports.append))
    why = mismatch(ours, theirs)
    assert why is None, why
    # Read defensively: the report is for the summary only, and its shape is the core's business.
    sites = [d for r in reports for d in getattr(r, "sites", ())]
    return {
        "sites": len(sites),
        "rewritten": sum(bool(getattr(d, "rewritten", False)) for d in sites),
        "nan_out": int(theirs.isnan().sum()),
        "inf_out": int(theirs.isinf().sum()),
    }
