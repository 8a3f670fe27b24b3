import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from se_export.errors import SEError
from se_export.sparse_format import (
    PackedExperts,
    bitmap_to_mask,
    mask_to_bitmap,
    pack_experts,
    packed_nbytes,
    validate_packed,
)


@settings(max_examples=40, deadline=None)
@given(k=st.integers(1, 4), out=st.integers(1, 24), inn=st.integers(1, 70),
       density=st.floats(0.0, 1.0), fmt=st.sampled_from(["bitmap", "csr16", "auto"]),
       dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32]), seed=st.integers(0, 2**16))
def test_pack_roundtrip_equals_masked_dense(k, out, inn, density, fmt, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(k, out, inn, generator=gen)
    mask = torch.rand(k, out, inn, generator=gen) < density
    packed = pack_experts(weight, mask, fmt, dtype)
    validate_packed(packed)
    expected = torch.where(mask, weight.to(dtype), torch.zeros((), dtype=dtype))
    assert torch.equal(packed.unpack(), expected)
    assert torch.equal(packed.mask(), mask)
    assert packed.expert_nnz() == mask.sum((1, 2)).tolist()
    assert packed.nbytes() == packed_nbytes(packed.format, k, out, inn, packed.nnz, packed.values.element_size())


def test_bitmap_bit_order_is_lsb_first():
    mask = torch.zeros(1, 10, dtype=torch.bool)
    mask[0, 0] = mask[0, 9] = True
    bits = mask_to_bitmap(mask)
    assert bits.tolist() == [[1, 2]]
    assert torch.equal(bitmap_to_mask(bits, 10), mask)


def test_auto_picks_csr16_only_when_it_is_smaller():
    weight = torch.randn(2, 64, 256)
    dense_ish = pack_experts(weight, torch.rand(2, 64, 256) < 0.5, "auto")
    very_sparse = pack_experts(weight, torch.rand(2, 64, 256) < 0.03, "auto")
    assert dense_ish.format == "bitmap"
    assert very_sparse.format == "csr16"
    # at fp16 and 50% density the bitmap costs 2 + 2/8... bytes per kept weight plus row pointers
    per_kept = (dense_ish.nbytes() - 2 * 64 * 4) / dense_ish.nnz
    assert per_kept == pytest.approx(2 + 256 / 8 / (dense_ish.nnz / 128), rel=1e-6)
    assert math.isclose(packed_nbytes("csr16", 2, 64, 256, 100, 2), 100 * 4 + 2 * 64 * 4)


def test_corrupt_packed_experts_are_rejected():
    packed = pack_experts(torch.randn(2, 8, 16), torch.rand(2, 8, 16) < 0.5, "bitmap")
    broken = PackedExperts("bitmap", 2, 8, 16, packed.values[:-1], packed.indices, packed.row_ptr)
    with pytest.raises(SEError, match="corrupt"):
        validate_packed(broken)
    csr = pack_experts(torch.randn(1, 4, 8), torch.ones(1, 4, 8, dtype=torch.bool), "csr16")
    bad_cols = csr.indices.clone()
    bad_cols[0] = 9
    with pytest.raises(SEError, match="out of range"):
        validate_packed(PackedExperts("csr16", 1, 4, 8, csr.values, bad_cols, csr.row_ptr))
