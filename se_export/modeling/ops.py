"""The ``se::routed_sparse_matmul`` operator: route each token to one sparse expert, multiply.

Its eager body is the golden reference every backend (ONNX Runtime, TensorRT) is validated
against, so it favours clarity and exactness over speed: fp32 routing scores and fp32
accumulation, output in the dtype of ``x``. Tokens are grouped by expert and each expert present
runs one matmul, so there is no per-token Python loop.

Routing is the folded nearest-centroid router (docs/routed_sparse_matmul.md): ``argmin_k (x G + b)_k``;
ties go to the lowest expert index (``torch.argmin`` semantics).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..formats.quantization import QuantSpec, unpack_int4
from ..formats.sparse_format import PackedExperts, popcount_bytes


def route(x: torch.Tensor, router_weight: torch.Tensor, router_bias: torch.Tensor) -> torch.Tensor:
    """Expert index (int32, shape of x without the last dim) of every token; scores in fp32."""
    scores = torch.matmul(x.to(torch.float32), router_weight.to(torch.float32)) + router_bias.to(torch.float32)
    return torch.argmin(scores, dim=-1).to(torch.int32)


def grouped_expert_matmul(
    flat_x: torch.Tensor,
    expert_ids: torch.Tensor,
    num_experts: int,
    out_features: int,
    expert_weight: Callable[[int], torch.Tensor],
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """``y[t] = W[e_t] x[t] + bias[e_t]`` in fp32, one matmul per expert that has tokens.

    ``expert_weight(k)`` returns the dense fp32 ``[out, in]`` weight of expert k; it is only
    called for experts that received tokens.
    """
    ids = expert_ids.reshape(-1).to(torch.int64)
    y = torch.empty(flat_x.shape[0], out_features, dtype=torch.float32)
    if ids.numel() == 0:
        return y
    order = torch.argsort(ids, stable=True)
    counts = torch.bincount(ids, minlength=num_experts).tolist()
    start = 0
    for k, count in enumerate(counts):
        if count == 0:
            continue
        rows = order[start : start + count]
        start += count
        xk = flat_x.index_select(0, rows).to(torch.float32)
        yk = xk @ expert_weight(k).t()
        if bias is not None:
            yk += bias[k].to(torch.float32)
        y.index_copy_(0, rows, yk)
    return y


def check_expert_ids(expert_ids: torch.Tensor, num_experts: int, token_shape: torch.Size) -> None:
    if tuple(expert_ids.shape) != tuple(token_shape):
        raise ValueError(f"expert_ids shape {tuple(expert_ids.shape)} != token shape {tuple(token_shape)}")
    if expert_ids.numel() and (int(expert_ids.min()) < 0 or int(expert_ids.max()) >= num_experts):
        raise ValueError(f"expert_ids outside [0, {num_experts})")


@torch.library.custom_op("se::routed_sparse_matmul", mutates_args=())
def routed_sparse_matmul(
    x: torch.Tensor,
    router_weight: torch.Tensor,
    router_bias: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    row_ptr: torch.Tensor,
    bias: torch.Tensor | None,
    expert_ids: torch.Tensor | None,
    out_features: int,
    format: str,
    scales: torch.Tensor | None = None,
    group_size: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Route tokens of ``x [..., in]`` (unless ``expert_ids`` is given) and apply their expert.

    Returns ``(y [..., out] in x.dtype, expert_ids int32 [...])``. The experts are in the packed
    format named by ``format`` (``se_export.sparse_format``). Quantized experts (op version 2)
    pass int8 codes, or int4 codes two per byte as uint8, with fp16 ``scales [K, out, groups]``
    of ``group_size`` columns each; the weights are ``code * scale`` (computed in fp32).
    """
    num_experts = router_weight.shape[1]
    in_features = x.shape[-1]
    if router_weight.shape[0] != in_features:
        raise ValueError(f"router_weight is {tuple(router_weight.shape)} but x has {in_features} features")
    packed = quantized_experts(format, num_experts, out_features, in_features, values, indices, row_ptr, scales,
                               group_size)
    if bias is not None and bias.numel() == 0:  # the ONNX form passes "no bias" as an empty tensor
        bias = None
    flat = x.reshape(-1, in_features)
    if expert_ids is None:
        ids = route(flat, router_weight, router_bias)
    else:
        check_expert_ids(expert_ids, num_experts, x.shape[:-1])
        ids = expert_ids.reshape(-1).to(torch.int32)
    y = grouped_expert_matmul(
        flat, ids, num_experts, out_features, lambda k: packed.unpack_expert(k, torch.float32), bias
    )
    return y.to(x.dtype).reshape(*x.shape[:-1], out_features), ids.reshape(x.shape[:-1]).clone()


def int4_value_count(format: str, indices: torch.Tensor, row_ptr: torch.Tensor, in_features: int) -> int:
    """How many codes nibble-packed int4 values hold (their bytes leave it ambiguous by one): the
    last row's start plus its length (csr16: one column per value; bitmap: the last row's bits)."""
    if format == "csr16":
        return int(indices.numel())
    width = (in_features + 7) // 8
    return int(row_ptr.reshape(-1)[-1]) + int(popcount_bytes(indices.reshape(-1)[-width:]).sum())


def quantized_experts(format: str, num_experts: int, out_features: int, in_features: int, values: torch.Tensor,
                      indices: torch.Tensor, row_ptr: torch.Tensor, scales: torch.Tensor | None,
                      group_size: int) -> PackedExperts:
    """The op's inputs as PackedExperts (int codes, int4 unpacked from nibbles, with their scales)."""
    if scales is None or scales.numel() == 0:
        return PackedExperts(format, num_experts, out_features, in_features, values, indices, row_ptr)
    if values.dtype not in (torch.int8, torch.uint8):
        raise ValueError(f"scales come with int8 codes or uint8 int4 pairs, not {values.dtype} values")
    bits = 8 if values.dtype == torch.int8 else 4
    quant = QuantSpec(bits, group_size)
    if tuple(scales.shape) != (num_experts, out_features, quant.groups(in_features)):
        raise ValueError(f"scales are {tuple(scales.shape)}, expected "
                         f"{(num_experts, out_features, quant.groups(in_features))} for group_size {group_size}")
    if bits == 4:
        values = unpack_int4(values, int4_value_count(format, indices, row_ptr, in_features))
    return PackedExperts(format, num_experts, out_features, in_features, values, indices, row_ptr, scales, quant)


@routed_sparse_matmul.register_fake
def _(x, router_weight, router_bias, values, indices, row_ptr, bias, expert_ids, out_features, format, scales=None,
      group_size=0):
    y = x.new_empty(*x.shape[:-1], out_features)
    ids = x.new_empty(x.shape[:-1], dtype=torch.int32)
    return y, ids
