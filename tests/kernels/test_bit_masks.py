"""Tests for ``approxbp_fx/kernels/bit_masks.py``: ``approxbp::pack_bits`` / ``approxbp::unpack_bits``.

The format is the 1-bit case of :mod:`approxbp_fx.codes` (checked against
``pack_codes`` and by hand), the round trip is exact for any shape and strides,
the fake implementations agree with the real ones, bad inputs are refused, and
the aten trace :mod:`approxbp_fx.lowering` inlines computes what the op does.
"""

from __future__ import annotations

import pytest
import torch

from approxbp_fx.codes import pack_codes, packed_numel
from approxbp_fx.kernels.bit_masks import pack_bits_torch, unpack_bits_torch
from approxbp_fx.lowering import lower

pack, unpack = torch.ops.approxbp.pack_bits, torch.ops.approxbp.unpack_bits
SHAPES = [(1,), (7,), (8,), (9,), (3, 37, 11), (2, 12, 16, 16)]


def _mask(shape, seed=0) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) > 0.5


def test_the_bits_land_where_the_format_says():
    # Element i at bit i % 8 of byte i // 8; the pad bits are 0.
    m = torch.tensor([1, 0, 1, 1, 0, 0, 0, 1, 1, 1], dtype=torch.bool)
    assert pack(m).tolist() == [0b10001101, 0b00000011]


@pytest.mark.parametrize("shape", SHAPES)
def test_pack_is_the_one_bit_code_format_and_unpack_inverts_it(shape):
    m = _mask(shape)
    packed = pack(m)
    assert packed.dtype == torch.uint8 and packed.shape == (packed_numel(m.numel(), 1),)
    assert torch.equal(packed, pack_codes(m, (0.5,), 1))
    out = unpack(packed, list(shape))
    assert out.dtype == torch.bool and out.is_contiguous() and torch.equal(out, m)


def test_a_strided_mask_packs_in_logical_order():
    m = _mask((16, 24)).t()  # not contiguous
    assert torch.equal(pack(m), pack(m.contiguous()))
    assert torch.equal(unpack(pack(m), [24, 16]), m)


@pytest.mark.parametrize("shape", [(3, 37, 11), (9,)])
def test_the_fake_implementations_agree_with_the_real_ones(shape):
    m = _mask(shape)
    torch.library.opcheck(pack.default, (m,))
    torch.library.opcheck(unpack.default, (pack(m), list(shape)))


def test_bad_inputs_are_refused_with_what_was_wrong():
    with pytest.raises(RuntimeError, match="pack_bits takes a bool mask, got torch.float32"):
        pack(torch.zeros(8))
    with pytest.raises(RuntimeError, match="packed bits must be uint8, got torch.int32"):
        unpack(torch.zeros(1, dtype=torch.int32), [8])
    with pytest.raises(RuntimeError, match=r"2 bytes do not hold a mask of shape \[8\]"):
        unpack(torch.zeros(2, dtype=torch.uint8), [8])


@pytest.mark.parametrize("shape", [(3, 37, 11), (8,)])
def test_the_lowered_graph_computes_what_the_ops_do(shape):
    # After the cut both ops become the aten ops of pack_bits_torch / unpack_bits_torch.
    def f(m):
        return unpack(pack(m), list(shape))

    from torch.fx.experimental.proxy_tensor import make_fx

    m = _mask(shape, seed=3)
    gm = make_fx(f)(m)
    assert lower(gm) == 2
    assert not [n for n in gm.graph.nodes if "approxbp" in str(n.target)]
    assert torch.equal(gm(m), m)
    assert torch.equal(pack_bits_torch(m), pack(m)) and torch.equal(unpack_bits_torch(pack(m), shape), m)
