"""``RoutedSparseLinear``: the nn.Module that replaces an expanded linear layer.

It owns a folded router and K packed sparse experts and calls ``se::routed_sparse_matmul``.
Experts with int8/int4 values run the C++ kernels too (codes decoded in registers); where those
are not built, the reference semantics (dequantize, then the same grouped product) in PyTorch.
Where the kernels are built, evaluation runs on the packed experts (no dense copy: a model needs
its packed bytes and little more). Without them, decoding a packed expert in PyTorch costs more
than multiplying it, so ``decoded_expert_cache`` keeps a byte-bounded LRU of decoded fp32 experts
(``default_cache_bytes`` sizes it from the memory actually free) that runs the same grouped
product (``ops.grouped_expert_matmul``) without repeating the decode; calibration keeps one
layer's decoded experts the same way.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterator

import torch
from torch import nn

from ..backends import kernels
from ..errors import SEError
from ..formats.quantization import QuantSpec, pack_int4
from ..formats.sparse_format import PackedExperts, validate_packed
from ..host_memory import available_memory_bytes
from . import ops


class _DecodedExpertCache:
    """LRU of decoded expert weights keyed by (module, expert); ``budget`` bytes at most."""

    def __init__(self) -> None:
        self.budget = 0
        self.used = 0
        self.entries: OrderedDict[tuple[int, int], torch.Tensor] = OrderedDict()

    def get(self, module: RoutedSparseLinear, k: int) -> torch.Tensor:
        key = (id(module), k)
        hit = self.entries.get(key)
        if hit is not None:
            self.entries.move_to_end(key)
            return hit
        weight = module.packed().unpack_expert(k, torch.float32)
        size = weight.numel() * weight.element_size()
        while self.entries and self.used + size > self.budget:
            _, old = self.entries.popitem(last=False)
            self.used -= old.numel() * old.element_size()
        if size <= self.budget:
            self.entries[key] = weight
            self.used += size
        return weight

    def clear(self) -> None:
        self.entries.clear()
        self.used = 0


_CACHE = _DecodedExpertCache()
_GOLDEN = False  # inside ``golden_reference``: the PyTorch op, never the C++ kernels
_SHARED_ROUTING: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None


@contextlib.contextmanager
def shared_routing() -> Iterator[None]:
    """Within the block, linears of one ``router_group`` that see the same input tensor route once.

    The first layer of a group (gate) routes and returns ``expert_ids``; the next (up) passes
    them back to the op. Exporters use this so the graph holds one router per gated MLP; the
    result is identical because both layers share the router and the input.
    """
    global _SHARED_ROUTING
    previous, _SHARED_ROUTING = _SHARED_ROUTING, {}
    try:
        yield
    finally:
        _SHARED_ROUTING = previous


def shared_expert_ids(router_group: str, x: torch.Tensor) -> torch.Tensor | None:
    """Routing computed for this very input by another linear of the group (``shared_routing``)."""
    if _SHARED_ROUTING is None or not router_group:
        return None
    hit = _SHARED_ROUTING.get(router_group)
    return hit[1] if hit is not None and hit[0] is x else None


def remember_expert_ids(router_group: str, x: torch.Tensor, ids: torch.Tensor) -> None:
    """Offer this input's routing to the next linear of the group (inside ``shared_routing``)."""
    if _SHARED_ROUTING is not None and router_group:
        _SHARED_ROUTING[router_group] = (x, ids)


def default_cache_bytes(max_gb: float = 8.0) -> int:
    """Decoded-expert cache for evaluation: none where the C++ kernels run the packed experts
    (they are faster than decoded copies and need no memory), else up to ``max_gb`` within half
    of the memory actually free."""
    if kernels.available():
        return 0
    limit = int(max_gb * (1 << 30))
    free = available_memory_bytes()
    return limit if free is None else max(0, min(limit, free // 2))


@contextlib.contextmanager
def golden_reference() -> Iterator[None]:
    """Within the block, expanded linears run the PyTorch reference op (each expert decoded in
    PyTorch when its tokens come, then dropped), not the C++ kernels: what validation compares
    a backend against must not share that backend's kernels."""
    global _GOLDEN
    previous, _GOLDEN = _GOLDEN, True
    try:
        yield
    finally:
        _GOLDEN = previous


@contextlib.contextmanager
def decoded_expert_cache(max_bytes: int) -> Iterator[None]:
    """Within the block, keep up to ``max_bytes`` of decoded experts between forward calls."""
    previous = _CACHE.budget
    _CACHE.budget = max_bytes
    try:
        yield
    finally:
        _CACHE.budget = previous
        _CACHE.clear()


class RoutedSparseLinear(nn.Module):
    """A linear layer replaced by K sparse experts and a nearest-centroid router.

    ``router_group`` names the routing this layer shares with others (gate and up of a gated
    MLP see the same input and use one router); exporters use it to route once.
    """

    def __init__(
        self,
        packed: PackedExperts,
        router_weight: torch.Tensor,
        router_bias: torch.Tensor,
        bias: torch.Tensor | None = None,
        router_group: str = "",
    ) -> None:
        super().__init__()
        self.in_features = packed.in_features
        self.out_features = packed.out_features
        self.num_experts = packed.num_experts
        self.format = packed.format
        self.quant = packed.quant
        self.router_group = router_group
        self.record_routing = False
        self.last_expert_ids: torch.Tensor | None = None
        # set by validation to replay another backend's routing (one id per token of the next call)
        self.forced_expert_ids: torch.Tensor | None = None
        self.register_buffer("router_weight", router_weight.to(torch.float32))
        self.register_buffer("router_bias", router_bias.to(torch.float32))
        self.register_buffer("values", packed.values)
        self.register_buffer("indices", packed.indices)
        self.register_buffer("row_ptr", packed.row_ptr)
        self.register_buffer("bias", None if bias is None else bias)
        self.register_buffer("scales", packed.scales)

    def packed(self) -> PackedExperts:
        return PackedExperts(self.format, self.num_experts, self.out_features, self.in_features,
                             self.values, self.indices, self.row_ptr, self.scales, self.quant)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _CACHE.budget > 0:
            flat = x.reshape(-1, self.in_features)
            given = self.shared_expert_ids(x)
            ids = given.reshape(-1) if given is not None else ops.route(flat, self.router_weight, self.router_bias)
            y = ops.grouped_expert_matmul(
                flat, ids, self.num_experts, self.out_features, lambda k: _CACHE.get(self, k), self.bias
            ).to(x.dtype).reshape(*x.shape[:-1], self.out_features)
            ids = ids.reshape(x.shape[:-1])
            self.remember_expert_ids(x, ids)
        elif self._use_kernels(x):
            given = self.shared_expert_ids(x)
            y, ids = self._bound_experts().matmul(x, self.router_weight, self.router_bias, given)
            self.remember_expert_ids(x, ids)
        else:
            given = self.shared_expert_ids(x)
            y, ids = torch.ops.se.routed_sparse_matmul(
                x, self.router_weight, self.router_bias, self.op_values(), self.indices, self.row_ptr,
                self.bias, given, self.out_features, self.format, self.scales,
                0 if self.quant is None else self.quant.group_size,
            )
            self.remember_expert_ids(x, ids)
        if self.record_routing:
            self.last_expert_ids = ids
        return y

    def op_values(self) -> torch.Tensor:
        """The values as the op takes them: int4 codes two per byte once ``pack_for_export`` ran
        (the exported graph stores them so), else the stored tensor (int8 codes for int4 too)."""
        packed = getattr(self, "int4_values", None)
        return self.values if packed is None else packed

    def pack_for_export(self) -> None:
        """Give int4 experts a nibble-packed copy of their codes for the exported graph to store."""
        if self.quant is not None and self.quant.bits == 4:
            self.register_buffer("int4_values", pack_int4(self.values), persistent=False)

    def _use_kernels(self, x: torch.Tensor) -> bool:
        """Plain eager CPU inference runs the C++ kernels (shared with ONNX Runtime) when built."""
        return (not _GOLDEN and type(x) is torch.Tensor and x.device.type == "cpu"
                and x.dtype in (torch.float32, torch.float16)
                and not (x.requires_grad and torch.is_grad_enabled()) and not torch.compiler.is_compiling()
                and not torch.jit.is_tracing() and kernels.available())

    def _bound_experts(self):
        key = (self.values.data_ptr(), self.indices.data_ptr(), self.row_ptr.data_ptr(),
               None if self.bias is None else self.bias.data_ptr(), None if self.scales is None else self.scales.data_ptr())
        bound = getattr(self, "_bound", None)
        if bound is None or bound[0] != key:
            bound = (key, kernels.BoundExperts(self.packed(), self.bias))
            self._bound = bound
        return bound[1]

    def forced_ids(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.forced_expert_ids is None:
            return None
        return self.forced_expert_ids.to(torch.int64).reshape(x.shape[:-1])

    def shared_expert_ids(self, x: torch.Tensor) -> torch.Tensor | None:
        forced = self.forced_ids(x)
        return forced if forced is not None else shared_expert_ids(self.router_group, x)

    def remember_expert_ids(self, x: torch.Tensor, ids: torch.Tensor) -> None:
        remember_expert_ids(self.router_group, x, ids)

    def meta(self) -> dict:
        """What a checkpoint manifest records to rebuild this module (tensors go separately)."""
        meta = {"format": self.format, "experts": self.num_experts, "in": self.in_features,
                "out": self.out_features, "router_group": self.router_group, "bias": self.bias is not None,
                "nnz": int(self.values.numel()), "value_dtype": str(self.values.dtype).removeprefix("torch.")}
        if self.quant is not None:
            meta.update(value_dtype=self.quant.name, group_size=self.quant.group_size)
        return meta

    @classmethod
    def from_tensors(cls, prefix: str, meta: dict, tensors: dict[str, torch.Tensor]) -> RoutedSparseLinear:
        """Rebuild from ``meta()`` and the tensors saved under ``prefix.<buffer>``, checking them."""
        try:
            quant = QuantSpec(int(meta["value_dtype"].removeprefix("int")), int(meta["group_size"])) \
                if meta.get("value_dtype") in ("int8", "int4") else None
            packed = PackedExperts(meta["format"], int(meta["experts"]), int(meta["out"]), int(meta["in"]),
                                   tensors[f"{prefix}.values"], tensors[f"{prefix}.indices"],
                                   tensors[f"{prefix}.row_ptr"], tensors[f"{prefix}.scales"] if quant else None, quant)
            router_weight = tensors[f"{prefix}.router_weight"]
            router_bias = tensors[f"{prefix}.router_bias"]
            bias = tensors[f"{prefix}.bias"] if meta.get("bias") else None
        except KeyError as exc:
            raise SEError(f"corrupt checkpoint: tensor {exc} is missing; re-run se-export expand") from None
        validate_packed(packed)
        if (tuple(router_weight.shape) != (packed.in_features, packed.num_experts)
                or router_bias.numel() != packed.num_experts):
            raise SEError(f"corrupt checkpoint: router of {prefix} does not match its experts; re-run se-export expand")
        return cls(packed, router_weight, router_bias, bias, router_group=meta.get("router_group", ""))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"experts={self.num_experts}, format={self.format}, bias={self.bias is not None}"
                + (f", values={self.quant.name}, group_size={self.quant.group_size}" if self.quant else ""))
