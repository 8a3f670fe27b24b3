import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from se_export.errors import SEError
from se_export.formats.sparse_format import (
    PackedExperts,
    bitmap_to_mask,
    kept_values,
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


@settings(max_examples=40, deadline=None)
@given(k=st.integers(1, 4), out=st.integers(1, 24), inn=st.integers(1, 70), density=st.floats(0.0, 1.0),
       dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]),
       value_dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32]), sliced=st.booleans(),
       seed=st.integers(0, 2**16))
def test_kept_values_equal_boolean_indexing(k, out, inn, density, dtype, value_dtype, sliced, seed):
    """The fast path (numpy compress) against torch's boolean indexing, on whole tensors and on a
    non-contiguous column slice (what expansion packs), every input dtype (bf16 takes the torch path)."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(k, out, inn + 3, generator=gen).to(dtype)
    mask = torch.rand(k, out, inn + 3, generator=gen) < density
    if sliced:
        weight, mask = weight[..., 1:inn + 1], mask[..., 1:inn + 1]
    got = kept_values(weight, mask, value_dtype)
    assert got.dtype == value_dtype
    assert torch.equal(got, weight[mask].to(value_dtype))


def test_bitmap_bit_order_is_lsb_first():
    mask = torch.zeros(1, 10, dtype=torch.bool)
    mask[0, 0] = mask[0, 9] = True
    bits = mask_to_bitmap(mask)
    assert bits.tolist() == [[1, 2]]
    assert torch.equal(bitmap_to_mask(bits, 10), mask)


def test_auto_picks_the_measured_faster_format():
    weight = torch.randn(2, 64, 256)
    dense_ish = pack_experts(weight, torch.rand(2, 64, 256) < 0.5, "auto")
    sparse = pack_experts(weight, torch.rand(2, 64, 256) < 0.15, "auto")
    very_sparse = pack_experts(weight, torch.rand(2, 64, 256) < 0.03, "auto")
    assert dense_ish.format == "bitmap"
    # 15% dense: the bitmap is smaller (2 + 1/(8 x 0.15) bytes per kept weight vs 4) but slower
    assert packed_nbytes("bitmap", 2, 64, 256, sparse.nnz, 2) < packed_nbytes("csr16", 2, 64, 256, sparse.nnz, 2)
    assert sparse.format == "csr16"
    assert very_sparse.format == "csr16"
    wide = torch.zeros(1, 1, 70000, dtype=torch.bool)  # columns beyond 16 bits: bitmap whatever the density
    wide[0, 0, :10] = True
    assert pack_experts(torch.ones(1, 1, 70000), wide, "auto").format == "bitmap"
    # at fp16 and 50% density the bitmap costs 2 + 2/8... bytes per kept weight plus row pointers
    per_kept = (dense_ish.nbytes() - 2 * 64 * 4) / dense_ish.nnz
    assert per_kept == pytest.approx(2 + 256 / 8 / (dense_ish.nnz / 128), rel=1e-6)
    assert math.isclose(packed_nbytes("csr16", 2, 64, 256, 100, 2), 100 * 4 + 2 * 64 * 4)


def test_corrupt_packed_experts_are_rejected():
    packed = pack_experts(torch.randn(2, 8, 16), torch.rand(2, 8, 16) < 0.5, "bitmap")
    broken = PackedExperts("bitmap", 2, 8, 16, packed.values[:-1], packed.indices, packed.row_ptr)
    with pytest.raises(SEError, match="corrupt"):
        validate_packed(broken)
    odd = pack_experts(torch.randn(1, 3, 13), torch.ones(1, 3, 13, dtype=torch.bool), "bitmap")
    padded = odd.indices.clone()
    padded[0, 1, 1] |= 0x80  # column 15 of a 13-wide row: the kernels would read past x
    with pytest.raises(SEError, match="columns past in_features=13"):
        validate_packed(PackedExperts("bitmap", 1, 3, 13, torch.cat([odd.values, odd.values[:1]]), padded, odd.row_ptr))
    shifted = packed.row_ptr.clone()
    shifted[3] += 1  # same total, one row starting a value late
    with pytest.raises(SEError, match="row_ptr differs from the bitmap"):
        validate_packed(PackedExperts("bitmap", 2, 8, 16, packed.values, packed.indices, shifted))
    csr = pack_experts(torch.randn(1, 4, 8), torch.ones(1, 4, 8, dtype=torch.bool), "csr16")
    bad_cols = csr.indices.clone()
    bad_cols[0] = 9
    with pytest.raises(SEError, match="out of range"):
        validate_packed(PackedExperts("csr16", 1, 4, 8, csr.values, bad_cols, csr.row_ptr))


def test_clone_holds_the_same_experts_in_fresh_memory():
    mask = torch.rand(2, 5, 9, generator=torch.Generator().manual_seed(0)) < 0.5
    packed = pack_experts(torch.randn(2, 5, 9) * mask, mask, "bitmap", torch.float16)
    copy = packed.clone()
    for field in ("values", "indices", "row_ptr"):
        assert torch.equal(getattr(copy, field), getattr(packed, field))
        assert getattr(copy, field).data_ptr() != getattr(packed, field).data_ptr()
    assert torch.equal(copy.unpack_expert(1), packed.unpack_expert(1))
