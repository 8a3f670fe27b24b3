"""Quantized expert values: int4 packing, packing and dequantizing experts against a float64
recomputation of the grid, and the structural checks that refuse corrupt codes or scales."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from se_export.errors import SEError
from se_export.formats.quantization import (
    QuantSpec,
    group_scales,
    pack_int4,
    parse_quant,
    round_to_nearest,
    unpack_int4,
)
from se_export.formats.sparse_format import pack_experts, validate_packed


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(-8, 7), min_size=0, max_size=301))
def test_int4_packing_round_trips_any_length(codes):
    t = torch.tensor(codes, dtype=torch.int8)
    packed = pack_int4(t)
    assert packed.dtype == torch.uint8 and packed.numel() == (len(codes) + 1) // 2
    assert torch.equal(unpack_int4(packed, len(codes)), t)
    if codes:  # value 0 is the low nibble of byte 0
        assert int(packed[0]) & 0x0F == codes[0] & 0x0F


def test_int4_unpacking_refuses_a_wrong_byte_count():
    with pytest.raises(SEError, match="corrupt int4 values"):
        unpack_int4(torch.zeros(3, dtype=torch.uint8), 8)


def reference_dequantized(weight: torch.Tensor, keep: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """The grid in float64, group by group (independent of the library's vectorised code): the
    first largest-magnitude kept weight of a group is code -2^(bits-1), its scale that weight over
    -2^(bits-1) rounded to fp16 (1 for a group without a kept non-zero)."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    w = weight.double() * keep
    out = torch.zeros_like(w)
    cols = w.shape[-1]
    for e, r in itertools.product(range(w.shape[0]), range(w.shape[1])):
        for g0 in range(0, cols, group):
            vals = w[e, r, g0:g0 + group].tolist()
            peak = max(vals, key=abs)  # the first of equal magnitudes, as argmax takes it
            scale = float(torch.tensor(peak / qmin).half()) or 1.0
            out[e, r, g0:g0 + group] = torch.tensor([min(qmax, max(qmin, round(v / scale))) * scale for v in vals])
    return out * keep


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.integers(1, 3), out=st.integers(1, 9), inn=st.integers(1, 70),
       group=st.integers(1, 80), bits=st.sampled_from([4, 8]), fmt=st.sampled_from(["bitmap", "csr16"]),
       density=st.floats(0.0, 1.0))
def test_packed_quantized_experts_dequantize_to_the_float64_grid(seed, k, out, inn, group, bits, fmt, density):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(k, out, inn, generator=gen) * torch.rand(k, out, 1, generator=gen) * 3
    keep = torch.rand(k, out, inn, generator=gen) < density
    spec = QuantSpec(bits, group)
    dequantized, scales = round_to_nearest(weight, keep, spec)
    packed = pack_experts(dequantized, keep, fmt, torch.int8, spec, scales)
    validate_packed(packed)
    expect = reference_dequantized(weight, keep, bits, group)
    for e in range(k):
        assert torch.allclose(packed.unpack_expert(e, torch.float64), expect[e], rtol=0, atol=1e-12)
    assert packed.values.dtype == torch.int8 and all(spec.qmin <= v <= spec.qmax for v in packed.values.tolist())
    assert torch.equal(packed.mask(), keep)
    # packing the dequantized weights again gives the same codes: the grid is a fixed point
    again = pack_experts(packed.unpack(torch.float32), keep, fmt, torch.int8, spec, packed.scales.float())
    assert torch.equal(again.values, packed.values)


def test_scales_come_from_kept_weights_only():
    weight = torch.tensor([[[1.0, -100.0, 0.5, 0.25]]])
    keep = torch.tensor([[[True, False, True, True]]])
    scales = group_scales(weight, keep, QuantSpec(8, 4))
    # the pruned -100 does not set the grid; the largest kept weight, 1.0, is code -128
    assert float(scales) == pytest.approx(-1.0 / 128, rel=1e-3)


def test_the_largest_weight_takes_the_extra_level():
    """int4: a group's largest-magnitude weight is code -8 (the scale takes the opposite sign), so
    16 levels serve the group; the other side reaches 7 steps."""
    spec = QuantSpec(4, 4)
    w = torch.tensor([[[0.8, -0.3, 0.1, 0.5]]])
    dequantized, scales = round_to_nearest(w, torch.ones_like(w, dtype=torch.bool), spec)
    assert float(scales) == pytest.approx(-0.1, rel=1e-3) and float(dequantized[0, 0, 0]) == pytest.approx(0.8, rel=1e-3)
    assert float(dequantized[0, 0, 3]) == pytest.approx(0.5, rel=1e-3)  # code -5


def test_validation_refuses_corrupt_codes_and_scales():
    weight, keep = torch.randn(2, 4, 16), torch.rand(2, 4, 16) < 0.5
    spec = QuantSpec(4, 8)
    dequantized, scales = round_to_nearest(weight, keep, spec)
    good = pack_experts(dequantized, keep, "bitmap", torch.int8, spec, scales)
    validate_packed(good)
    bad_codes = good.values.clone()
    bad_codes[0] = 8  # outside int4's [-8, 7]
    cases = {
        "codes outside": dataclasses.replace(good, values=bad_codes),
        "scales": dataclasses.replace(good, scales=good.scales[:, :, :1].contiguous()),
        "not finite and non-zero": dataclasses.replace(good, scales=good.scales * 0),
        "expected int8 codes": dataclasses.replace(good, values=good.values.float()),
    }
    for needle, packed in cases.items():
        with pytest.raises(SEError, match=needle):
            validate_packed(packed)


def test_value_dtype_parsing():
    assert parse_quant("fp16", 128) is None
    assert parse_quant("int4") == QuantSpec(4, 32) and parse_quant("int8") == QuantSpec(8, 128)
    assert parse_quant("int4", 64, in_features=576) == QuantSpec(4, 64)
    with pytest.raises(SEError, match="larger than the 64 input features"):
        parse_quant("int8", 128, in_features=64)
    with pytest.raises(SEError, match="group-size must be >= 1"):
        parse_quant("int8", 0)
