"""Compressed storage of K sparse experts: packed non-zero values plus a bitmap or 16-bit columns.

Both formats share ``values`` (the kept weights, row-major, expert after expert) and
``row_ptr`` (int32 offsets into ``values``: row r of expert k starts at ``row_ptr[k*out + r]``),
so every backend can find a row without a prefix scan. They differ in how columns are found:

* ``bitmap``: ``indices`` is uint8 ``[K, out, ceil(in/8)]``; bit j (LSB first) of byte b marks
  column ``8*b + j``. Costs 1 bit per weight: the cheaper format up to ~85% sparsity at fp16.
* ``csr16``: ``indices`` is int16 ``[nnz]`` holding unsigned 16-bit column numbers. Costs
  16 bits per kept weight: cheaper at very high sparsity.

Values are floats (fp32, fp16, bf16), or int8 codes with one fp16 scale per expert, row and
group of ``group_size`` input columns (``--value-dtype int8|int4``; ``quantization``): the
weight a code stands for is ``code * scale`` in fp32.

``auto`` picks the format the CPU kernel runs faster (csr16 at most 20% dense, else the smaller
one; see ``choose_format``). A kept weight whose value happens to be zero stays
stored: the pattern is the mask, not the values, so sparsity counts are exact.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import SEError
from .quantization import QuantSpec, column_scales, quantize

FORMATS = ("bitmap", "csr16")
_BIT_WEIGHTS = torch.tensor([1 << j for j in range(8)], dtype=torch.uint8)


@dataclass
class PackedExperts:
    """K experts of shape ``[out, in]`` in one compressed format (see module docstring)."""

    format: str
    num_experts: int
    out_features: int
    in_features: int
    values: torch.Tensor
    indices: torch.Tensor
    row_ptr: torch.Tensor
    scales: torch.Tensor | None = None  # quantized values: fp16 [K, out, groups]; None for float values
    quant: QuantSpec | None = None

    @property
    def nnz(self) -> int:
        return int(self.values.numel())

    @property
    def quantized(self) -> bool:
        return self.quant is not None

    def nbytes(self) -> int:
        """Bytes of the tensors in memory (int4 codes take a byte each until they are stored)."""
        parts = [self.values, self.indices, self.row_ptr] + ([self.scales] if self.scales is not None else [])
        return sum(t.numel() * t.element_size() for t in parts)

    def clone(self) -> PackedExperts:
        """The same experts in fresh memory (benchmarks rotate copies so every call reads DRAM)."""
        return dataclasses.replace(self, values=self.values.clone(), indices=self.indices.clone(),
                                   row_ptr=self.row_ptr.clone(),
                                   scales=None if self.scales is None else self.scales.clone())

    def expert_nnz(self) -> list[int]:
        rp = [*self.row_ptr.view(self.num_experts, -1)[:, 0].tolist(), self.nnz]
        return [rp[k + 1] - rp[k] for k in range(self.num_experts)]

    def unpack_expert(self, k: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Dense ``[out, in]`` weight of expert k (for the reference op and for tests); quantized
        values are dequantized (``code * scale`` in fp32, then ``dtype``, fp32 by default)."""
        if self.quantized:
            codes = dataclasses.replace(self, scales=None, quant=None).unpack_expert(k, torch.float32)
            return (codes * column_scales(self.scales[k], self.in_features, self.quant.group_size)).to(
                dtype or torch.float32)
        dtype = dtype or self.values.dtype
        out, inn = self.out_features, self.in_features
        start = int(self.row_ptr[k * out])
        end = int(self.row_ptr[(k + 1) * out]) if k + 1 < self.num_experts else self.nnz
        vals = self.values[start:end].to(dtype)
        dense = torch.zeros(out, inn, dtype=dtype)
        if self.format == "bitmap":
            dense.masked_scatter_(bitmap_to_mask(self.indices[k], inn), vals)
        elif self.format == "csr16":
            cols = self.indices[start:end].to(torch.int64) & 0xFFFF
            rp = self.row_ptr[k * out : (k + 1) * out].to(torch.int64)
            counts = torch.diff(rp, append=torch.tensor([end], dtype=torch.int64))
            rows = torch.repeat_interleave(torch.arange(out), counts)
            dense[rows, cols] = vals
        else:
            raise SEError(f"unknown sparse format '{self.format}': expected one of {FORMATS}")
        return dense

    def unpack(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """All experts dense, ``[K, out, in]``: only for tests and small layers."""
        return torch.stack([self.unpack_expert(k, dtype) for k in range(self.num_experts)])

    def bitmap(self) -> torch.Tensor:
        """The pattern as a ``[K, out, ceil(in/8)]`` bitmap, whatever the format (no dense copy)."""
        if self.format == "bitmap":
            return self.indices
        width = math.ceil(self.in_features / 8)
        counts = torch.diff(self.row_ptr.to(torch.int64), append=torch.tensor([self.nnz], dtype=torch.int64))
        rows = torch.repeat_interleave(torch.arange(self.num_experts * self.out_features), counts)
        cols = self.indices.to(torch.int64) & 0xFFFF
        bits = torch.zeros(self.num_experts * self.out_features * width, dtype=torch.uint8)
        bits.index_add_(0, rows * width + cols // 8, (1 << (cols % 8)).to(torch.uint8))  # distinct bits: sum = OR
        return bits.reshape(self.num_experts, self.out_features, width)

    def mask(self) -> torch.Tensor:
        """Boolean ``[K, out, in]`` pattern of stored weights."""
        bitmap = self.bitmap()
        return torch.stack([bitmap_to_mask(bitmap[k], self.in_features) for k in range(self.num_experts)])

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"values": self.values, "indices": self.indices, "row_ptr": self.row_ptr}
        return out if self.scales is None else {**out, "scales": self.scales}


def mask_to_bitmap(mask: torch.Tensor) -> torch.Tensor:
    """Bool ``[..., in]`` to uint8 ``[..., ceil(in/8)]``, LSB first."""
    inn = mask.shape[-1]
    pad = (-inn) % 8
    if pad:
        mask = torch.nn.functional.pad(mask, (0, pad))
    bits = mask.reshape(*mask.shape[:-1], -1, 8).to(torch.uint8)
    return (bits * _BIT_WEIGHTS.to(bits.device)).sum(-1, dtype=torch.uint8)


def bitmap_to_mask(bitmap: torch.Tensor, in_features: int) -> torch.Tensor:
    """uint8 ``[..., ceil(in/8)]`` to bool ``[..., in]``."""
    bits = (bitmap.unsqueeze(-1) & _BIT_WEIGHTS.to(bitmap.device)) != 0
    return bits.reshape(*bitmap.shape[:-1], -1)[..., :in_features]


def popcount_bytes(bitmap: torch.Tensor) -> torch.Tensor:
    """Set bits of every uint8, as uint8 (SWAR: a few vector ops, no unpacking to bools)."""
    x = bitmap - ((bitmap >> 1) & 0x55)
    x = (x & 0x33) + ((x >> 2) & 0x33)
    return (x + (x >> 4)) & 0x0F


def bitmap_row_counts(bitmap: torch.Tensor) -> torch.Tensor:
    """int64 set bits of every row of a ``[..., bytes]`` bitmap, flattened over the leading dims."""
    return popcount_bytes(bitmap.reshape(-1, bitmap.shape[-1])).sum(-1, dtype=torch.int64)


def kept_values(weights: torch.Tensor, mask: torch.Tensor, value_dtype: torch.dtype) -> torch.Tensor:
    """The weights where ``mask`` is True, row-major, as ``value_dtype``. On the CPU through numpy's
    ``compress``: 3-4x faster than boolean indexing, which builds an index list first (a 16-expert
    gate/up group of the default model: 42 vs 152 ms per 14M weights)."""
    if weights.device.type == "cpu" and weights.dtype in (torch.float16, torch.float32, torch.float64, torch.int8):
        kept = np.compress(mask.reshape(-1).numpy(), weights.detach().reshape(-1).numpy())
        return torch.from_numpy(kept).to(value_dtype)
    return weights[mask].to(value_dtype)


def row_ptr_from_counts(counts: torch.Tensor) -> torch.Tensor:
    """int32 offset of every row's first value: the exclusive running sum of the row counts."""
    row_ptr = torch.zeros(counts.numel(), dtype=torch.int64, device=counts.device)
    row_ptr[1:] = torch.cumsum(counts.reshape(-1).to(torch.int64), 0)[:-1]
    return row_ptr.to(torch.int32)


def csr16_columns(mask: torch.Tensor) -> torch.Tensor:
    """Column numbers of a bool ``[..., in]`` mask's set entries, row-major, as unsigned 16-bit bits."""
    return torch.nonzero(mask)[:, -1].to(torch.int32).to(torch.int16)  # wraps to unsigned 16-bit bits


def padding_bits(bitmap: torch.Tensor, in_features: int) -> int:
    """Set bits past ``in_features`` in the last byte of each row (a valid bitmap has none)."""
    used = in_features - 8 * (bitmap.shape[-1] - 1)
    if used >= 8 or bitmap.numel() == 0:
        return 0
    return int(popcount_bytes(bitmap[..., -1] >> used).sum(dtype=torch.int64))


def packed_nbytes(fmt: str, k: int, out: int, inn: int, nnz: int, value_bytes: int) -> int:
    """Bytes a format needs for these experts, without packing them."""
    row_ptr = k * out * 4
    if fmt == "bitmap":
        return k * out * math.ceil(inn / 8) + nnz * value_bytes + row_ptr
    if fmt == "csr16":
        return nnz * (value_bytes + 2) + row_ptr
    raise SEError(f"unknown sparse format '{fmt}': expected auto or one of {FORMATS}")


CSR16_MAX_DENSITY = 0.2  # at or below: csr16 even where the bitmap is smaller (see choose_format)


def choose_format(k: int, out: int, inn: int, nnz: int, value_bytes: int) -> str:
    """``--format auto``: the format the CPU kernel runs faster, by measurement.

    bench/kernel_speed.py (dense and both formats timed in turn; BENCHMARKS.md, CPU kernels): at 90%
    sparsity csr16 decodes a batch-1 row 2.2-2.8x faster than the bitmap (4096x11008: 2.2 vs 4.8 ms
    at fp16, 2.2 vs 6.1 ms at fp32) for ~23% more bytes, so experts at most 20% dense take csr16;
    denser ones take the smaller format (the bitmap at 50%, 2:4 and fp16 70%; at fp32 70% the two
    run within 7% and the bitmap is 26% smaller). csr16 needs in_features <= 65536."""
    if inn > 65536:
        return "bitmap"
    if nnz <= CSR16_MAX_DENSITY * k * out * inn:
        return "csr16"
    return min(("bitmap", "csr16"), key=lambda f: packed_nbytes(f, k, out, inn, nnz, value_bytes))


def pack_experts(
    weights: torch.Tensor, mask: torch.Tensor, fmt: str = "auto", value_dtype: torch.dtype = torch.float16,
    quant: QuantSpec | None = None, scales: torch.Tensor | None = None,
) -> PackedExperts:
    """Pack dense ``[K, out, in]`` weights where ``mask`` is True (the kept weights). With ``quant``,
    the values are the int8 codes of ``weights`` on the grid ``scales [K, out, groups]`` (weights
    already on that grid, as the joint sweep leaves them, are stored exactly)."""
    if quant is not None:
        if scales is None or tuple(scales.shape) != (*weights.shape[:2], quant.groups(weights.shape[-1])):
            raise ValueError(f"quantized packing needs scales [K, out, groups], got "
                             f"{None if scales is None else tuple(scales.shape)}")
        packed = pack_experts(quantize(weights, scales, quant), mask, fmt, torch.int8)
        return dataclasses.replace(packed, scales=scales.to(torch.float16).contiguous(), quant=quant)
    if weights.shape != mask.shape or weights.dim() != 3:
        raise ValueError(f"weights {tuple(weights.shape)} and mask {tuple(mask.shape)} must both be [K, out, in]")
    k, out, inn = weights.shape
    mask = mask.bool()
    counts = mask.sum(-1, dtype=torch.int32).reshape(-1).to(torch.int64)  # int32 sums: half the time
    nnz = int(counts.sum())
    if nnz >= 2**31:
        raise SEError(f"{nnz} stored weights exceed the int32 row pointers; expand fewer experts per linear")
    if fmt == "auto":
        fmt = choose_format(k, out, inn, nnz, torch.empty((), dtype=value_dtype).element_size())
    row_ptr = row_ptr_from_counts(counts)
    values = kept_values(weights, mask, value_dtype).contiguous()
    if fmt == "bitmap":
        indices = mask_to_bitmap(mask).contiguous()
    elif fmt == "csr16":
        if inn > 65536:
            raise SEError(f"csr16 cannot index {inn} input features (max 65536); use --format bitmap")
        indices = csr16_columns(mask).contiguous()
    else:
        raise SEError(f"unknown sparse format '{fmt}': expected auto or one of {FORMATS}")
    return PackedExperts(fmt, k, out, inn, values, indices, row_ptr)


def validate_packed(p: PackedExperts) -> None:
    """Cheap structural checks so a corrupt checkpoint fails loudly instead of mis-indexing."""
    problems = []
    if p.format not in FORMATS:
        problems.append(f"format '{p.format}'")
    if p.row_ptr.dtype != torch.int32 or p.row_ptr.numel() != p.num_experts * p.out_features:
        problems.append(f"row_ptr {tuple(p.row_ptr.shape)} {p.row_ptr.dtype}")
    elif p.row_ptr.numel() and (int(p.row_ptr[0]) != 0 or bool((torch.diff(p.row_ptr) < 0).any())
                                or int(p.row_ptr[-1]) > p.nnz):
        problems.append("row_ptr not monotone within the values")
    if p.format == "bitmap":
        expect = (p.num_experts, p.out_features, math.ceil(p.in_features / 8))
        if tuple(p.indices.shape) != expect or p.indices.dtype != torch.uint8:
            problems.append(f"bitmap {tuple(p.indices.shape)} (expected {expect})")
        elif padding_bits(p.indices, p.in_features):
            problems.append(f"bitmap marks columns past in_features={p.in_features}")
        else:
            counts = bitmap_row_counts(p.indices)
            if p.nnz != int(counts.sum()):
                problems.append("bitmap population differs from the number of values")
            elif not torch.equal(p.row_ptr, row_ptr_from_counts(counts)):
                problems.append("row_ptr differs from the bitmap's row populations")
    if p.quant is not None:
        expect = (p.num_experts, p.out_features, p.quant.groups(p.in_features))
        if p.values.dtype != torch.int8:
            problems.append(f"quantized values are {p.values.dtype}, expected int8 codes")
        elif p.nnz and (int(p.values.max()) > p.quant.qmax or int(p.values.min()) < p.quant.qmin):
            problems.append(f"{p.quant.name} codes outside [{p.quant.qmin}, {p.quant.qmax}]")
        if p.scales is None or tuple(p.scales.shape) != expect or p.scales.dtype != torch.float16:
            problems.append(f"scales {None if p.scales is None else tuple(p.scales.shape)} (expected fp16 {expect})")
        elif not bool(torch.isfinite(p.scales).all()) or bool((p.scales == 0).any()):
            problems.append("scales not finite and non-zero")
    if p.format == "csr16":
        if p.indices.numel() != p.nnz or p.indices.dtype != torch.int16:
            problems.append("csr16 column count differs from the number of values")
        elif p.nnz and int((p.indices.to(torch.int64) & 0xFFFF).max()) >= p.in_features:
            problems.append("csr16 column index out of range")
    if problems:
        raise SEError("corrupt sparse experts (" + "; ".join(problems) + "): re-run se-export expand")
