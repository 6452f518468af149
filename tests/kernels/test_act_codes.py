"""Tests for ``approxbp_fx/kernels/act_codes.py``: the ``approxbp::act_pack`` and
``approxbp::code_grad`` ops, their torch (CPU) implementations and their Triton
kernels, against :mod:`approxbp_fx.codes`.

Three groups:

* ``TestTorchOps``: the ops through ``torch.ops.approxbp`` on CPU, hand-checked
  bytes, and ``torch.library.opcheck`` (fake impl agrees with the real one).
* ``TestInterpreter``: the Triton launchers on CPU tensors under
  ``TRITON_INTERPRET=1``. ``triton.jit`` reads that variable when it decorates
  a function, i.e. when ``act_codes`` is first imported, and by then the test
  process has long imported it without the variable. So one subprocess (per
  module) imports the package with the variable set, runs every case, and
  hands the outputs back through a ``torch.save`` file; the comparisons happen
  here, one pytest case each.
* ``TestCUDA``: the compiled kernels on a GPU (skipped without one).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from approxbp_fx.activations import ACTIVATIONS
from approxbp_fx.codes import code_grad_of, nonfinite_flag, pack_codes, packed_numel
from approxbp_fx.coefficients import BITS, table
from approxbp_fx.kernels import act_codes

REPO_ROOT = Path(__file__).resolve().parents[2]
DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# The k=2 GELU table, written out so the hand-checked bytes below do not depend
# on coefficients.py.
GELU2_THRESHOLDS = [-3.18588, -0.00118, 3.19083]
GELU2_LEVELS = [0.0, -0.04922, 1.04874, 1.0]

# dx = grad * level is one float32 multiply and one rounding on both sides:
# bit-exact, except bfloat16 under the interpreter (truncation, one ulp).
DX_TOL_INTERPRETER = {
    torch.float32: (0.0, 0.0),
    torch.float16: (0.0, 0.0),
    torch.bfloat16: (0.0, 8e-3),  # one bf16 ulp: 2**-7 relative
    torch.float64: (0.0, 0.0),
}


# ---------------------------------------------------------------------------
# Inputs and references
# ---------------------------------------------------------------------------


def _tables(activation: str, bits: int) -> tuple[list[float], list[float]]:
    tab = table(activation, bits)
    thresholds, levels = [float(t) for t in tab.thresholds], [float(v) for v in tab.levels]
    assert len(thresholds) == 2**bits - 1 and len(levels) == 2**bits
    return thresholds, levels


def _make_x(shape, dtype: torch.dtype, thresholds, seed: int) -> torch.Tensor:
    """Random values with the edge cases mixed in: each threshold exactly (in
    ``dtype``) and its neighbours either side, NaN, +-inf, +-0, large values.
    (The ops output codes and a flag only, so opcheck takes NaN inputs too.)"""
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    flat = (torch.randn(n, generator=g) * 4).to(dtype)
    t = torch.tensor(thresholds, dtype=torch.float32).to(dtype)
    up = torch.nextafter(t, torch.full_like(t, math.inf))
    down = torch.nextafter(t, torch.full_like(t, -math.inf))
    specials = [math.inf, 0.0, -0.0, 1e4, -1e4, 30.0, -30.0, math.nan, -math.inf]
    specials = torch.tensor(specials, dtype=dtype)
    specials = torch.cat([t, up, down, specials])
    k = min(n, specials.numel())
    if k:
        pos = torch.randperm(n, generator=g)[:k]
        flat[pos] = specials[torch.randperm(specials.numel(), generator=g)[:k]]
    return flat.view(shape)


def _make_grad(shape, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randn(shape, generator=g).to(dtype)


# The non-finite flag as code_grad receives it: clear (dx is grad * level) or set (all NaN).
CLEAR, SET = torch.tensor(False), torch.tensor(True)


def _ref_dx(grad, codes, flag, levels, bits, out_dtype) -> torch.Tensor:
    return code_grad_of(grad, codes, flag.to(grad.device), levels, bits, out_dtype)


def _assert_codes(codes: torch.Tensor, x: torch.Tensor, thresholds, bits: int) -> None:
    assert codes.dtype == torch.uint8 and codes.dim() == 1 and codes.is_contiguous()
    assert codes.numel() == packed_numel(x.numel(), bits)
    ref = pack_codes(x, thresholds, bits)
    assert torch.equal(codes, ref), f"{(codes != ref).sum().item()} of {codes.numel()} code bytes differ"


def _assert_flag(flag: torch.Tensor, x: torch.Tensor) -> None:
    assert flag.dtype == torch.bool and flag.dim() == 0 and flag.device == x.device
    assert flag.item() == bool((~torch.isfinite(x)).any()), x


def _assert_dx(dx, grad, codes, levels, bits, out_dtype, tol=(0.0, 0.0), flag=CLEAR) -> None:
    ref = _ref_dx(grad, codes, flag, levels, bits, out_dtype)
    assert dx.dtype == out_dtype and dx.shape == grad.shape and dx.is_contiguous()
    if flag.item():
        assert dx.isnan().all(), f"{(~dx.isnan()).sum().item()} of {dx.numel()} values escaped the NaN poison"
        return
    atol, rtol = tol
    if atol == 0 and rtol == 0:
        assert torch.equal(dx, ref), f"{(dx != ref).sum().item()} of {dx.numel()} values differ"
    else:
        torch.testing.assert_close(dx, ref, atol=atol, rtol=rtol)


# ---------------------------------------------------------------------------
# Cases shared by the interpreter and CUDA tests
# ---------------------------------------------------------------------------


def _case(cid, activation, bits, shape, dtype, out_dtype=None, *, transpose=False, grad_dtype=None, force_int64=False):
    # ``activation`` picks the table (thresholds, levels); ``out_dtype`` is code_grad's.
    return dict(
        id=cid,
        activation=activation,
        bits=bits,
        shape=tuple(shape),
        dtype=dtype,
        out_dtype=out_dtype or dtype,
        transpose=transpose,
        grad_dtype=grad_dtype or dtype,
        force_int64=force_int64,
    )


def _dt(d: torch.dtype) -> str:
    return str(d).removeprefix("torch.")


def _build_cases() -> list[dict]:
    cases = []
    # Every activation x bits x dtype at an odd size that spans several programs.
    for act in ACTIVATIONS:
        for bits in BITS:
            for dt in DTYPES:
                cases.append(_case(f"{act}-b{bits}-{_dt(dt)}-4097", act, bits, (4097,), dt))
    # Small / empty / one-program sizes, every bits and dtype, activations in turn.
    i = 0
    for n in (0, 1, 7, 1023):
        for bits in BITS:
            for dt in DTYPES:
                act = ACTIVATIONS[i % len(ACTIVATIONS)]
                i += 1
                cases.append(_case(f"{act}-b{bits}-{_dt(dt)}-{n}", act, bits, (n,), dt))
    # 2-D transposed (non-contiguous) inputs, mixed input/output dtypes.
    for bits in BITS:
        act = ACTIVATIONS[bits - 1]
        f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
        cases.append(_case(f"{act}-b{bits}-T-f32to_bf16", act, bits, (65, 33), f32, bf16, transpose=True))
        cases.append(
            _case(f"{act}-b{bits}-T-bf16to_f32", act, bits, (33, 31), bf16, f32, transpose=True, grad_dtype=f16)
        )
    # 0-d input; float64 (act_pack falls back to torch, code_grad's kernel takes it).
    cases.append(_case("silu-b2-f16-0d", "silu", 2, (), torch.float16))
    cases.append(_case("quick_gelu-b3-f64", "quick_gelu", 3, (129,), torch.float64))
    # int64 offsets, forced on small inputs.
    for bits in BITS:
        cases.append(_case(f"gelu-b{bits}-f16-int64", "gelu", bits, (3001,), torch.float16, force_int64=True))
    return cases


CASES = _build_cases()


def _no_bf16_subnormals(x: torch.Tensor) -> torch.Tensor:
    """Moves bfloat16 subnormals to the smallest normal of the same sign.

    The Triton 3.6 interpreter widens subnormal bfloat16 to float32 wrongly
    (9.2e-41 -> 0.0, 1e-39 -> 4.4e-39), which flips the code of the threshold
    0.0's bfloat16 neighbours. The GPU widens exactly; the CUDA tests keep them.
    """
    if x.dtype != torch.bfloat16:
        return x
    tiny = torch.finfo(torch.bfloat16).tiny
    sub = (x != 0) & (x.abs() < tiny)
    return torch.where(sub, torch.full_like(x, tiny).copysign(x), x)


def _materialise(case: dict, seed: int, *, interpreter: bool = False) -> dict:
    """The tensors of a case: x (maybe non-contiguous), grad, reference codes."""
    thresholds, levels = _tables(case["activation"], case["bits"])
    shape = case["shape"]
    x = _make_x(shape, case["dtype"], thresholds, seed)
    if interpreter:
        x = _no_bf16_subnormals(x)
    grad = _make_grad(shape, case["grad_dtype"], seed)
    if case["transpose"]:
        x, grad = x.t(), grad.t()
        assert not x.is_contiguous() or x.numel() <= 1
    codes = pack_codes(x, thresholds, case["bits"])
    return dict(case, x=x, grad=grad, codes=codes, thresholds=thresholds, levels=levels)


def _check_case(m: dict, codes, flag, dx, dx_poisoned, dx_tol) -> None:
    """``dx`` came from code_grad with the flag clear, ``dx_poisoned`` with it set."""
    _assert_codes(codes, m["x"], m["thresholds"], m["bits"])
    _assert_flag(flag, m["x"])
    _assert_dx(dx, m["grad"], m["codes"], m["levels"], m["bits"], m["out_dtype"], dx_tol)
    _assert_dx(dx_poisoned, m["grad"], m["codes"], m["levels"], m["bits"], m["out_dtype"], flag=SET)


def _run_case(m: dict, act_pack, code_grad, **launch) -> tuple:
    """(codes, flag, dx with the flag clear, dx with it set) from one implementation."""
    codes, flag = act_pack(m["x"], m["thresholds"], m["bits"], **launch)
    dev = m["grad"].device
    dx = [
        code_grad(m["grad"], m["codes"], f.to(dev), m["levels"], m["bits"], m["out_dtype"], **launch)
        for f in (CLEAR, SET)
    ]
    return (codes, flag, *dx)


# ---------------------------------------------------------------------------
# Hand-checked bytes (these pin the layout independently of codes.py)
# ---------------------------------------------------------------------------

# (bits, thresholds, x, expected bytes)
HAND_CODES = [
    # codes [0, 1, 2, 3] at bits 0, 2, 4, 6: 0b11_10_01_00
    (2, GELU2_THRESHOLDS, [-5.0, -1.0, 1.0, 5.0], [228]),
    # 1 bit, 9 elements: 1,0,1,1,0,0,0,1 -> 0b10001101, then a lone 1 in a padded byte
    (1, [0.0], [1.0, -1.0, 1.0, 1.0, -1.0, -1.0, -1.0, 1.0, 1.0], [141, 1]),
    # 3 bits: 2 codes per byte (a nibble of storage each) at bits 0 and 3, as
    # (i % per) * bits says; bits 6-7 stay 0. Codes 1, 7 | 4, (pad)
    (3, [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0], [0.5, 6.5, 3.5], [1 | 7 << 3, 4]),
    # 4 bits: x == threshold is not above it (code 2, not 3); NaN is code 0
    (4, [float(j) for j in range(15)], [2.0, 14.5, math.nan], [2 | 15 << 4, 0]),
]
# Byte 228 is codes [0, 1, 2, 3], so with grad [1, 2, 3, 4] dx is grad * levels
# in order (float32 products).
HAND_DX = (torch.tensor([1.0, 2.0, 3.0, 4.0]) * torch.tensor(GELU2_LEVELS, dtype=torch.float32)).tolist()


# ---------------------------------------------------------------------------
# The torch (CPU) implementation, through torch.ops
# ---------------------------------------------------------------------------


class TestTorchOps:
    @pytest.mark.parametrize("bits,thresholds,x,expected", HAND_CODES)
    def test_hand_checked_bytes(self, bits, thresholds, x, expected):
        codes, flag = torch.ops.approxbp.act_pack(torch.tensor(x), thresholds, bits)
        assert codes.tolist() == expected
        assert flag.item() == any(math.isnan(v) for v in x)

    @pytest.mark.parametrize("poison", [math.nan, math.inf, -math.inf])
    def test_any_non_finite_element_sets_the_flag(self, poison):
        x = torch.randn(1001)
        assert not torch.ops.approxbp.act_pack(x, GELU2_THRESHOLDS, 2)[1].item()
        x[517] = poison
        assert torch.ops.approxbp.act_pack(x, GELU2_THRESHOLDS, 2)[1].item()

    def test_hand_checked_dx(self):
        grad = torch.tensor([1.0, 2.0, 3.0, 4.0])
        codes = torch.tensor([228], dtype=torch.uint8)
        dx = torch.ops.approxbp.code_grad(grad, codes, CLEAR, GELU2_LEVELS, 2, torch.float32)
        assert dx.tolist() == HAND_DX
        dx = torch.ops.approxbp.code_grad(grad, codes, SET, GELU2_LEVELS, 2, torch.float32)
        assert dx.isnan().all()

    @pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
    def test_against_reference(self, case):
        m = _materialise(case, seed=0)
        _check_case(m, *_run_case(m, torch.ops.approxbp.act_pack, torch.ops.approxbp.code_grad), (0.0, 0.0))

    @pytest.mark.parametrize("bits", BITS)
    @pytest.mark.parametrize("shape,transpose", [((7,), False), ((5, 9), True), ((0,), False), ((2, 3, 4), False)])
    def test_opcheck(self, bits, shape, transpose):
        thresholds, levels = _tables("gelu", bits)
        x = _make_x(shape, torch.float32, thresholds, seed=bits)
        grad = _make_grad(shape, torch.bfloat16, seed=bits)
        if transpose:
            x, grad = x.t(), grad.t()
        torch.library.opcheck(torch.ops.approxbp.act_pack.default, (x, thresholds, bits))
        codes = pack_codes(x, thresholds, bits)
        torch.library.opcheck(torch.ops.approxbp.code_grad.default, (grad, codes, CLEAR, levels, bits, torch.float32))

    def test_bad_arguments(self):
        x = torch.randn(8)
        with pytest.raises(RuntimeError, match="thresholds"):
            torch.ops.approxbp.act_pack(x, [0.0, 1.0], 2)
        with pytest.raises(RuntimeError, match="bits"):
            torch.ops.approxbp.act_pack(x, [0.0] * 31, 5)
        with pytest.raises(RuntimeError, match="do not cover"):
            torch.ops.approxbp.code_grad(x, torch.zeros(3, dtype=torch.uint8), CLEAR, GELU2_LEVELS, 2, torch.float32)
        codes = torch.zeros(2, dtype=torch.uint8)
        for bad_flag in (CLEAR[None], torch.tensor(0, dtype=torch.uint8)):
            with pytest.raises(RuntimeError, match="0-d bool"):
                torch.ops.approxbp.code_grad(x, codes, bad_flag, GELU2_LEVELS, 2, torch.float32)

    @pytest.mark.skipif(not act_codes.HAS_TRITON, reason="Triton is not installed")
    def test_cuda_kernels_registered(self):
        for name in ("approxbp::act_pack", "approxbp::code_grad"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA"), name

    @pytest.mark.parametrize("bits", BITS)
    def test_int64_offsets_when_needed(self, bits):
        # idx64 once the largest offset a launch forms (masked tail included)
        # passes int32; int32 up to there.
        per, elems = 8 // bits, act_codes._ELEMS_PER_PROGRAM
        last_fit = (2**31 - 1) // elems * elems  # numel filling the last int32-safe program
        assert act_codes._launch_geometry(last_fit, bits)[4] is False
        assert act_codes._launch_geometry(last_fit, bits, index_limit=0)[4] is True
        assert act_codes._launch_geometry(last_fit + 1, bits)[4] is True
        assert act_codes._launch_geometry(2**33 + 3, bits)[4] is True
        per_, n_bytes, block_b, grid, _ = act_codes._launch_geometry(4097, bits)
        assert (per_, n_bytes) == (per, packed_numel(4097, bits)) and grid * block_b >= n_bytes

    @pytest.mark.skipif(not act_codes.HAS_TRITON, reason="Triton is not installed")
    def test_device_scalars_cached(self):
        # The launchers must not copy the tables host -> device on every call.
        a = act_codes._device_scalars(GELU2_THRESHOLDS, torch.device("cpu"))
        b = act_codes._device_scalars(list(GELU2_THRESHOLDS), torch.device("cpu"))
        assert a is b and a.dtype == torch.float32 and a.tolist() == pytest.approx(GELU2_THRESHOLDS)
        cpu = torch.device("cpu")
        assert act_codes._device_scalars([0.0], cpu) is not act_codes._device_scalars([-0.0], cpu)


# ---------------------------------------------------------------------------
# The Triton kernels under the interpreter (CPU tensors, subprocess)
# ---------------------------------------------------------------------------

_INTERPRETER_SCRIPT = textwrap.dedent(
    r"""
    import os, sys, time, warnings
    assert os.environ.get("TRITON_INTERPRET") == "1"
    import torch
    from approxbp_fx.kernels import act_codes as ac

    kind = type(ac._act_pack_kernel).__name__
    assert kind == "InterpretedFunction", f"kernels were not interpreted: {kind}"
    # numpy warns when exp(-x) overflows to inf for very negative x; that inf
    # is intended (x / inf -> -0, as torch gives).
    warnings.simplefilter("ignore", RuntimeWarning)

    inp = torch.load(sys.argv[1], weights_only=False)
    out = {"cases": {}, "hand_codes": [], "hand_dx": None}
    t0 = time.perf_counter()
    for m in inp["cases"]:
        # torch.save keeps strides: the transposed inputs arrive non-contiguous.
        assert m["x"].is_contiguous() != (m["transpose"] and m["x"].numel() > 1), m["id"]
        limit = 0 if m["force_int64"] else ac.INT32_INDEX_LIMIT
        codes, flag = ac.launch_act_pack(m["x"], m["thresholds"], m["bits"], index_limit=limit)
        dx = [
            ac.launch_code_grad(
                m["grad"], m["codes"], torch.tensor(f), m["levels"], m["bits"], m["out_dtype"], index_limit=limit
            )
            for f in (False, True)
        ]
        out["cases"][m["id"]] = (codes, flag, *dx)
    for bits, thresholds, x, _ in inp["hand_codes"]:
        out["hand_codes"].append(ac.launch_act_pack(torch.tensor(x), thresholds, bits))
    # The flag across several programs: clear on finite input, set by one NaN
    # in the last program's tail or by one -inf in the first.
    finite = torch.linspace(-6, 6, 5001)
    flags = []
    for pos, val in ((None, 0.0), (5000, float("nan")), (0, float("-inf"))):
        x = finite.clone()
        if pos is not None:
            x[pos] = val
        flags.append(ac.launch_act_pack(x, inp["thresholds"], 2)[1].item())
    out["flags"] = flags
    out["hand_dx"] = ac.launch_code_grad(
        torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([228], dtype=torch.uint8), torch.tensor(False),
        inp["levels"], 2, torch.float32,
    )
    # A strided (non-contiguous) codes tensor.
    big = torch.stack([inp["strided_codes"], torch.zeros_like(inp["strided_codes"])], 1).reshape(-1)
    out["strided_dx"] = ac.launch_code_grad(
        inp["strided_grad"], big[::2], torch.tensor(False), inp["levels"], 2, torch.float16
    )
    out["seconds"] = time.perf_counter() - t0
    torch.save(out, sys.argv[2])
    """
)


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    """Run every interpreter case in one ``TRITON_INTERPRET=1`` subprocess."""
    if not act_codes.HAS_TRITON:
        pytest.skip("Triton is not installed")
    d = tmp_path_factory.mktemp("act_codes_interp")
    cases = [_materialise(c, seed=i, interpreter=True) for i, c in enumerate(CASES)]
    strided_grad = _make_grad((1001,), torch.float32, seed=99)
    strided_codes = pack_codes(_make_x((1001,), torch.float32, GELU2_THRESHOLDS, 99), GELU2_THRESHOLDS, 2)
    torch.save(
        dict(
            cases=cases,
            hand_codes=HAND_CODES,
            thresholds=GELU2_THRESHOLDS,
            levels=GELU2_LEVELS,
            strided_grad=strided_grad,
            strided_codes=strided_codes,
        ),
        d / "in.pt",
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-c", _INTERPRETER_SCRIPT, str(d / "in.pt"), str(d / "out.pt")],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != 0:
        pytest.fail(f"interpreter subprocess failed ({proc.returncode}):\n{proc.stderr[-6000:]}", pytrace=False)
    out = torch.load(d / "out.pt", weights_only=False)
    out["inputs"] = {m["id"]: m for m in cases}
    out["strided"] = (strided_grad, strided_codes)
    return out


class TestInterpreter:
    @pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
    def test_against_reference(self, interpreted, case):
        m = interpreted["inputs"][case["id"]]
        codes, flag, dx, dx_poisoned = interpreted["cases"][case["id"]]
        _check_case(m, codes, flag, dx, dx_poisoned, DX_TOL_INTERPRETER[m["out_dtype"]])

    def test_hand_checked_bytes(self, interpreted):
        got = [c.tolist() for c, _ in interpreted["hand_codes"]]
        assert got == [expected for *_, expected in HAND_CODES]
        flags = [f.item() for _, f in interpreted["hand_codes"]]
        assert flags == [any(map(math.isnan, x)) for _, _, x, _ in HAND_CODES]

    def test_flag_across_programs(self, interpreted):
        assert interpreted["flags"] == [False, True, True]

    def test_hand_checked_dx(self, interpreted):
        assert interpreted["hand_dx"].tolist() == HAND_DX

    def test_strided_codes(self, interpreted):
        grad, codes = interpreted["strided"]
        _assert_dx(interpreted["strided_dx"], grad, codes, GELU2_LEVELS, 2, torch.float16)


# ---------------------------------------------------------------------------
# The compiled kernels on a GPU
# ---------------------------------------------------------------------------


def _cuda(m: dict) -> dict:
    m = dict(m)
    for k in ("x", "grad", "codes"):
        m[k] = m[k].cuda()
    return m


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.skipif(not act_codes.HAS_TRITON, reason="Triton is not installed")
class TestCUDA:
    @pytest.fixture(autouse=True)
    def _compiled(self):
        kind = type(act_codes._act_pack_kernel).__name__
        if kind == "InterpretedFunction":
            pytest.skip("TRITON_INTERPRET=1 in this process: the CUDA tests need compiled kernels")

    @pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
    def test_launchers(self, case):
        limit = 0 if case["force_int64"] else act_codes.INT32_INDEX_LIMIT
        m = _cuda(_materialise(case, seed=0))
        out = _run_case(m, act_codes.launch_act_pack, act_codes.launch_code_grad, index_limit=limit)
        assert all(t.is_cuda for t in out)
        _check_case(m, *out, (0.0, 0.0))

    @pytest.mark.parametrize("case", CASES[:: len(DTYPES) + 1], ids=[c["id"] for c in CASES[:: len(DTYPES) + 1]])
    def test_torch_ops_dispatch_to_kernels(self, case):
        m = _cuda(_materialise(case, seed=1))
        _check_case(m, *_run_case(m, torch.ops.approxbp.act_pack, torch.ops.approxbp.code_grad), (0.0, 0.0))

    @pytest.mark.parametrize("bits", BITS)
    def test_opcheck(self, bits):
        thresholds, levels = _tables("silu", bits)
        x = _make_x((37, 11), torch.float16, thresholds, seed=bits).cuda().t()
        grad = _make_grad((11, 37), torch.float32, seed=bits).cuda()
        torch.library.opcheck(torch.ops.approxbp.act_pack.default, (x, thresholds, bits))
        codes = pack_codes(x, thresholds, bits)
        flag = CLEAR.cuda()
        torch.library.opcheck(torch.ops.approxbp.code_grad.default, (grad, codes, flag, levels, bits, torch.bfloat16))

    @pytest.mark.parametrize("bits", (2, 3))
    def test_large(self, bits):
        n = 2**24 + 3
        thresholds, levels = _tables("gelu", bits)
        x = (torch.randn(n, device="cuda") * 4).to(torch.bfloat16)
        grad = torch.randn(n, device="cuda", dtype=torch.bfloat16)
        x[n // 2] = math.nan  # one non-finite element among 2**24: the flag must see it
        codes, flag = act_codes.launch_act_pack(x, thresholds, bits)
        _assert_codes(codes, x, thresholds, bits)
        _assert_flag(flag, x)
        dx = act_codes.launch_code_grad(grad, codes, CLEAR.cuda(), levels, bits, torch.bfloat16)
        _assert_dx(dx, grad, codes, levels, bits, torch.bfloat16)

    @pytest.mark.slow
    def test_past_int32_offsets(self):
        # 2**31 + 5 bf16 elements (about 17 GiB in all): the int64 kernels for
        # real. The reference would need ~30 GiB more, so check the tail only.
        n = 2**31 + 5
        thresholds, levels = _tables("gelu", 2)
        if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
            pytest.skip("needs ~20 GiB free on the GPU")
        x = torch.randn(n, device="cuda", dtype=torch.bfloat16)
        codes, _ = act_codes.launch_act_pack(x, thresholds, 2)
        start = (n // 4 - 4096) * 4  # byte-aligned (4 codes per byte)
        assert torch.equal(codes[start // 4 :], pack_codes(x[start:], thresholds, 2))
        grad = x  # any values will do
        dx = act_codes.launch_code_grad(grad, codes, CLEAR.cuda(), levels, 2, torch.bfloat16)
        _assert_dx(dx[start:], grad[start:], codes[start // 4 :], levels, 2, torch.bfloat16)

    def test_no_host_copy_after_first_call(self):
        thresholds, _ = _tables("gelu", 2)
        x = torch.randn(1000, device="cuda")
        act_codes.launch_act_pack(x, thresholds, 2)
        n_cached = act_codes._cached_scalars.cache_info().currsize
        act_codes.launch_act_pack(x, thresholds, 2)
        assert act_codes._cached_scalars.cache_info().currsize == n_cached
