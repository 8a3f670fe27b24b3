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

from ..formats.sparse_format import PackedExperts


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Route tokens of ``x [..., in]`` (unless ``expert_ids`` is given) and apply their expert.

    Returns ``(y [..., out] in x.dtype, expert_ids int32 [...])``. The experts are in the packed
    format named by ``format`` (``se_export.sparse_format``).
    """
    num_experts = router_weight.shape[1]
    in_features = x.shape[-1]
    if router_weight.shape[0] != in_features:
        raise ValueError(f"router_weight is {tuple(router_weight.shape)} but x has {in_features} features")
    packed = PackedExperts(format, num_experts, out_features, in_features, values, indices, row_ptr)
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


@routed_sparse_matmul.register_fake
def _(x, router_weight, router_bias, values, indices, row_ptr, bias, expert_ids, out_features, format):
    y = x.new_empty(*x.shape[:-1], out_features)
    ids = x.new_empty(x.shape[:-1], dtype=torch.int32)
    return y, ids
