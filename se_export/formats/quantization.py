"""Quantized expert values: integer codes with one signed fp16 scale per expert, row and group.

A kept weight ``w`` in column ``c`` of row ``r`` of expert ``k`` is stored as the integer code
``q = clamp(round(w / s), qmin, qmax)`` with ``s = scales[k, r, c // group_size]``, and stands
for the weight ``q * s`` (computed in fp32, which holds it exactly: at most 8 bits of code times
11 bits of fp16 significand). Codes use the full two's-complement range (``[-128, 127]`` for
int8, ``[-8, 7]`` for int4) and the scale carries a sign: a group's largest-magnitude kept weight
``p`` gets the code ``qmin`` (the scale is ``-p / 2^(bits-1)``), so all 2^bits levels serve the
group at no extra bits, and a pruned weight and a zero code still mean the same thing (no zero
point). Measured against the alternatives on the default model (BENCHMARKS.md, "int4 grids"):
this grid's perplexity is lower than the symmetric ``[-7, 7]`` one's and than a per-group zero
point's (which costs 4 more bits per group), and clipping the range to the least squared rounding
error (GPTQ's ``mse`` search) made it worse. Checkpoints written with the symmetric grid (codes in
``[-7, 7]``, positive scales) are the same format and still read.

Scales are rounded to fp16 when they are chosen, so the weights the SparseGPT sweep compensates
for are exactly the ones stored. A group with no kept weight (or only zeros) gets scale 1.

In memory and in the op, codes are int8 ``[nnz]`` in the packed order of the values (int4 codes
too, in ``[-8, 7]``). On disk, int4 codes are packed two per byte (``pack_int4``): value ``i``
is the low nibble of byte ``i // 2`` when ``i`` is even, the high nibble when it is odd, in
two's complement; a row may start in the middle of a byte, since rows are located by
``row_ptr`` in values, not in bytes. The last byte's unused high nibble is zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import SEError

QUANT_BITS = {"int8": 8, "int4": 4}
# how SparseGPT-based methods quantize: inside the column sweep (later columns absorb the rounding
# error, as GPTQ does) or by rounding the finished weights to nearest (the baseline the sweep beats)
QUANT_METHODS = ("joint", "rtn")
# input columns per scale when --group-size is not given: the sizes that met the quality targets on
# the default model at K=16, 50% (int8 at 128: +1.1% perplexity; int4 at 128: +11%, at 32: +6%)
DEFAULT_GROUP_SIZE = {"int8": 128, "int4": 32}
# the grid new checkpoints record ("quant_grid" in the manifest); checkpoints without the field have
# the symmetric one (codes in [-qmax, qmax], positive scales), which every reader takes as well
QUANT_GRID = "full-range"


@dataclass(frozen=True)
class QuantSpec:
    """How expert values are quantized: ``bits`` (8 or 4) and ``group_size`` input columns per scale."""

    bits: int
    group_size: int = 128

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise SEError(f"quantized values are int8 or int4, not {self.bits} bits")
        if self.group_size < 1:
            raise SEError(f"--group-size must be >= 1 (got {self.group_size})")

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1))

    @property
    def name(self) -> str:
        return f"int{self.bits}"

    def groups(self, in_features: int) -> int:
        return math.ceil(in_features / self.group_size)


def parse_quant(value_dtype: str, group_size: int | None = None, in_features: int | None = None) -> QuantSpec | None:
    """The QuantSpec of ``--value-dtype`` (None for a float dtype; ``group_size`` None takes the
    dtype's default). A group size that does not divide the input features leaves a short last
    group, which is fine; one larger than them is refused."""
    if value_dtype not in QUANT_BITS:
        return None
    group_size = DEFAULT_GROUP_SIZE[value_dtype] if group_size is None else group_size
    spec = QuantSpec(QUANT_BITS[value_dtype], group_size)
    if in_features is not None and group_size > in_features:
        raise SEError(f"--group-size {group_size} is larger than the {in_features} input features: "
                      "use a group size of at most the smallest linear's input features (e.g. 128)")
    return spec


def group_scales(weight: torch.Tensor, keep: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """fp32 scales ``[..., out, groups]`` (fp16-representable) of the kept weights ``[..., out, in]``."""
    inn = weight.shape[-1]
    pad = spec.groups(inn) * spec.group_size - inn
    kept, mask = weight.float() * keep, keep.float()
    if pad:
        kept, mask = (torch.nn.functional.pad(t, (0, pad)) for t in (kept, mask))
    grouped = kept.reshape(*kept.shape[:-1], -1, spec.group_size)
    return choose_scales(grouped, mask.reshape(grouped.shape) > 0, spec)


def choose_scales(groups: torch.Tensor, kept: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """The fp16-rounded signed scale of each group ``[..., n]`` of weights (``kept`` marks the ones
    that count): the largest-magnitude kept weight ``p`` maps to ``qmin`` (scale ``p / qmin``);
    1 for a group without a kept non-zero weight."""
    groups = groups.to(torch.promote_types(groups.dtype, torch.float32)) * kept  # fp64 stays fp64
    peak = groups.gather(-1, groups.abs().argmax(-1, keepdim=True)).squeeze(-1)
    scale = (peak / spec.qmin).to(torch.float16).to(groups.dtype)
    return torch.where(scale != 0, scale, torch.ones_like(scale))


def column_scales(scales: torch.Tensor, in_features: int, group_size: int) -> torch.Tensor:
    """Per-column scales ``[..., out, in]`` from per-group ``[..., out, groups]``."""
    return scales.float().repeat_interleave(group_size, dim=-1)[..., :in_features]


def quantize(weight: torch.Tensor, scales: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """int8 codes ``[..., out, in]`` of ``weight`` on the grid ``scales`` (per group)."""
    s = column_scales(scales, weight.shape[-1], spec.group_size)
    return torch.clamp(torch.round(weight.float() / s), spec.qmin, spec.qmax).to(torch.int8)


def round_to_nearest(weight: torch.Tensor, keep: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """RTN of already pruned weights: ``(dequantized weights, scales)``; pruned weights stay 0."""
    scales = group_scales(weight, keep, spec)
    codes = quantize(weight, scales, spec)
    return codes.float() * column_scales(scales, weight.shape[-1], spec.group_size) * keep, scales


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes in ``[-8, 7]`` ``[n]`` to uint8 ``[ceil(n / 2)]``: even values in the low nibble."""
    flat = codes.reshape(-1).to(torch.int16) & 0x0F
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    pairs = flat.view(-1, 2)
    return (pairs[:, 0] | (pairs[:, 1] << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor, count: int) -> torch.Tensor:
    """Inverse of ``pack_int4``: int8 codes ``[count]`` (sign-extended nibbles)."""
    if packed.numel() != math.ceil(count / 2):
        raise SEError(f"corrupt int4 values: {packed.numel()} bytes for {count} codes; re-run se-export expand")
    b = packed.to(torch.int16)
    nibbles = torch.stack([b & 0x0F, (b >> 4) & 0x0F], dim=1).reshape(-1)[:count]
    return torch.where(nibbles > 7, nibbles - 16, nibbles).to(torch.int8)
