"""Checkpoint mask storage: deflate-coded bitmaps and derived row pointers round-trip exactly."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from se_export.errors import SEError
from se_export.formats.mask_codec import (
    CODEC,
    decode_masks,
    encode_masks,
    row_ptr_from_bitmap,
    stored_expert_bytes,
)
from se_export.formats.sparse_format import pack_experts


def _module(k, out, inn, density, fmt, seed):
    gen = torch.Generator().manual_seed(seed)
    packed = pack_experts(torch.randn(k, out, inn, generator=gen), torch.rand(k, out, inn, generator=gen) < density, fmt)
    meta = {"format": packed.format, "experts": k, "out": out, "in": inn}
    return packed, meta


@settings(max_examples=40, deadline=None)
@given(k=st.integers(1, 4), out=st.integers(1, 24), inn=st.integers(1, 70), density=st.floats(0.0, 1.0),
       fmt=st.sampled_from(["bitmap", "csr16"]), seed=st.integers(0, 2**16))
def test_encode_decode_restores_every_tensor(k, out, inn, density, fmt, seed):
    packed, meta = _module(k, out, inn, density, fmt, seed)
    tensors = {f"m.{n}": t for n, t in packed.tensors().items()} | {"other": torch.arange(3)}
    stored, storage = encode_masks(tensors, {"m": meta})
    # both formats store the same thing: the coded bitmap of the mask
    assert set(stored) == {"m.values", f"m.mask.{CODEC}", "other"} and storage == {"m": {"mask": CODEC}}
    restored = decode_masks(dict(stored), {"m": meta}, storage)
    assert restored.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert restored[name].dtype == tensor.dtype and torch.equal(restored[name], tensor), name


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 40), width=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_row_ptr_is_the_running_popcount(rows, width, seed):
    bitmap = torch.randint(0, 256, (rows, width), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    counts = [sum(bin(int(b)).count("1") for b in row) for row in bitmap]
    expected = [sum(counts[:r]) for r in range(rows)]
    assert row_ptr_from_bitmap(bitmap).tolist() == expected
    assert row_ptr_from_bitmap(bitmap).dtype == torch.int32


def test_coded_mask_is_smaller_than_the_raw_bitmap_near_its_entropy():
    packed, meta = _module(16, 256, 576, 0.3, "bitmap", 0)
    raw_bytes = packed.nbytes()
    stored, _ = encode_masks({f"m.{n}": t for n, t in packed.tensors().items()}, {"m": meta})
    coded = stored[f"m.mask.{CODEC}"].numel()
    entropy = -(0.3 * math.log2(0.3) + 0.7 * math.log2(0.7))  # bits of information per mask bit
    assert coded < 0.92 * packed.indices.numel()
    assert coded > entropy * packed.indices.numel() * 0.99  # no coder beats the entropy of iid bits
    assert stored_expert_bytes(stored, {"m": meta}) == raw_bytes - packed.indices.numel() - packed.row_ptr.numel() * 4 + coded


def test_csr16_experts_store_no_16_bit_columns_on_disk():
    packed, meta = _module(4, 64, 256, 0.1, "csr16", 2)
    stored, _ = encode_masks({f"m.{n}": t for n, t in packed.tensors().items()}, {"m": meta})
    # 10% dense: 16 bits per kept weight in memory, under 6 on disk (entropy: 4.7)
    assert stored[f"m.mask.{CODEC}"].numel() * 8 < 6 * packed.nnz < packed.indices.numel() * 16


def test_damaged_or_mismatched_streams_are_rejected():
    packed, meta = _module(2, 8, 20, 0.5, "bitmap", 1)
    stored, storage = encode_masks({f"m.{n}": t for n, t in packed.tensors().items()}, {"m": meta})
    stream = stored[f"m.mask.{CODEC}"]
    flipped = stream.clone()
    flipped[len(flipped) // 2] ^= 0x55
    for bad in (flipped, stream[: len(stream) - 3]):
        with pytest.raises(SEError, match="mask of m cannot be decoded"):
            decode_masks({**stored, f"m.mask.{CODEC}": bad}, {"m": meta}, storage)
    with pytest.raises(SEError, match="decodes to 48 bytes, expected 96"):
        decode_masks(dict(stored), {"m": {**meta, "out": 24, "in": 16}}, storage)
    with pytest.raises(SEError, match="is missing"):
        decode_masks({"m.values": packed.values}, {"m": meta}, storage)
    with pytest.raises(SEError, match="upgrade se-export"):
        decode_masks(dict(stored), {"m": meta}, {"m": {"mask": "brotli"}})
