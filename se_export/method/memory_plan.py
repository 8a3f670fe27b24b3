"""Peak host memory of an expansion, estimated from the model's shapes before anything is loaded.

Why: a 1B model's expansion needs tens of GB (K copies of each MLP, the calibration activations,
per-expert Hessians); finding out after an hour that it does not fit loses the hour. The plan
walks the layers as ``expand_model`` does and adds, at each layer, what is alive at that point:

- the process (Python, torch, transformers) and the model's parameters in fp32, the MLPs of the
  layers already expanded replaced by their packed experts (K x (1 - s) of the weights);
- the calibration activations: the hidden states entering the layer and their successor, the
  MLP's input and the residual it is added to, the input of every later group of the MLP;
- the largest group's expansion: Gram matrices in fp32 and fp64, the dense weight stacked for
  every expert, the sweep's working copies of as many experts as one pruning pass holds
  (``experts_per_chunk``), the finished experts before packing, and their packed form.

Each term is a count of tensor elements in the code it mirrors, so the estimate follows the
implementation; ``bench/memory_plan.py`` checks it against the measured peak RSS.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..adapters import MlpAdapter, adapter_for, decoder_layers, linear_weight
from ..errors import SEError
from ..formats.quantization import parse_quant
from .expand import METHODS, check_group_size, experts_per_chunk
from .sparsity import parse_sparsity

PROCESS_BYTES = 600 << 20  # Python, torch, transformers and the tokenizer, resident before any tensor
_VALUE_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4, "int8": 1, "int4": 1}  # int4 codes are int8 in memory


@dataclass
class MemoryPlan:
    """Peak host bytes of an expansion and what makes it up at the worst layer."""

    peak_bytes: int
    worst_layer: int
    parts: dict[str, int] = field(default_factory=dict)
    final_model_bytes: int = 0  # parameters and packed experts once every layer is expanded

    def summary(self) -> str:
        parts = ", ".join(f"{name} {size / 2**30:.2f}" for name, size in self.parts.items() if size)
        return f"peak host memory {self.peak_bytes / 2**30:.1f} GiB at layer {self.worst_layer} ({parts} GiB)"


@dataclass(frozen=True)
class _Group:
    rows: int  # summed output features of the group's linears (pruned together)
    inputs: int
    bias_rows: int = 0  # output features of the linears with a bias (each expert keeps a copy)


def _groups(layer, adapter: MlpAdapter) -> list[_Group]:
    out = []
    for names in adapter.groups:
        dense = [linear_weight(layer.get_submodule(n), adapter) for n in names]
        out.append(_Group(sum(w.shape[0] for w, _ in dense), dense[0][0].shape[1],
                          sum(w.shape[0] for w, b in dense if b is not None)))
    return out


def _packed_bytes(group: _Group, experts: int, density: float, value_bytes: int, group_size: int | None,
                  fmt: str) -> int:
    """Packed experts of a group: values, the index (bitmap bits or 16-bit columns), row pointers
    (int64), scales (one fp16 per row and group of columns), a bias per expert."""
    weights = experts * group.rows * group.inputs
    kept = math.ceil(weights * density)
    index = kept * 2 if fmt == "csr16" else experts * group.rows * math.ceil(group.inputs / 8)
    scales = experts * group.rows * math.ceil(group.inputs / group_size) * 2 if group_size else 0
    return kept * value_bytes + index + experts * group.rows * 8 + scales + experts * group.bias_rows * 4


def _group_work(group: _Group, experts: int, tokens: int, chunk: int, density: float, value_bytes: int,
                group_size: int | None, fmt: str) -> int:
    """Bytes alive while one group is expanded (beyond its input, counted with the activations)."""
    rows, inn = group.rows, group.inputs
    gram = inn * inn * (4 + 8 + 8)  # fp32 product, its fp64 copy, ClusterHessians' fp64 partial sum
    router = tokens * (max(1, inn // 32) + experts) * 4 * 2  # PCA projections, distances (k-means)
    cluster_rows = tokens * inn * 4  # the largest cluster's rows gathered for its Hessian
    dense = rows * inn * 4  # the linears' weights stacked
    finished = experts * rows * inn * 5  # pruned fp32 weights and the keep mask of every expert
    sweep = chunk * (rows * inn * (4 * 3 + 1) + 8 * 4 * inn * inn)  # copies of W, result, mask; Hessians
    packed = _packed_bytes(group, experts, density, value_bytes, group_size, fmt)
    return gram + max(router, cluster_rows) + dense + finished + sweep + packed


def plan_expansion(model: torch.nn.Module, cfg, calib_tokens: int, *, prune_budget: int | None = None) -> MemoryPlan:
    """Peak host memory of ``expand_model(model, calib, cfg)`` with ``calib_tokens`` calibration
    tokens. ``model`` may live on the meta device: only shapes are read."""
    spec = parse_sparsity(cfg.sparsity)
    adapter = adapter_for(model.config)
    layers = decoder_layers(model, adapter)
    selected = set(range(len(layers)) if cfg.layers is None else cfg.layers)
    check_group_size(cfg, layers, adapter, {i for i in selected if 0 <= i < len(layers)})
    quant = parse_quant(cfg.value_dtype, cfg.group_size)
    value_bytes = _VALUE_BYTES[cfg.value_dtype]
    group_size = quant.group_size if quant else None
    fmt = "csr16" if cfg.format == "csr16" else "bitmap"
    density = 1.0 - spec.fraction
    if cfg.layer_sparsity != "uniform":  # OWL moves density between layers: the densest one is budgeted
        density = min(1.0, density + 2 * cfg.owl_lambda)
    data_free = METHODS[cfg.method].data_free
    tokens = 0 if data_free else calib_tokens
    params = sum(p.numel() for p in model.parameters())
    hidden = model.get_input_embeddings().weight.shape[1]

    model_bytes = params * 4
    best = MemoryPlan(0, 0)
    for index in range(max(selected, default=-1) + 1):
        if index not in selected:
            continue
        groups = _groups(layers[index], adapter)
        experts = cfg.experts_for(index)
        activations = 0
        if tokens:
            later_inputs = sum(g.inputs for g in groups[1:]) if not cfg.true_sequential else groups[-1].inputs
            activations = tokens * (2 * hidden + 2 * groups[0].inputs + later_inputs) * 4
        work = max(_group_work(g, experts, tokens, experts_per_chunk(g.inputs, experts, prune_budget), density,
                               value_bytes, group_size, fmt) for g in groups)
        total = PROCESS_BYTES + model_bytes + activations + work
        if total > best.peak_bytes:
            best = MemoryPlan(total, index, {"process": PROCESS_BYTES, "model": model_bytes,
                                             "activations": activations, "expansion": work})
        for g in groups:  # the layer's dense MLP leaves, its packed experts stay
            dense_bytes = (g.rows * g.inputs + g.bias_rows) * 4
            model_bytes += _packed_bytes(g, experts, density, value_bytes, group_size, fmt) - dense_bytes
    best.final_model_bytes = model_bytes
    return best


def check_fits(plan: MemoryPlan, available: int | None, limit_gb: float | None = None) -> None:
    """Refuse a plan above ``limit_gb`` (``--max-memory-gb``) or above the memory available now."""
    cap = available if limit_gb is None else int(limit_gb * 2**30)
    if cap is None or plan.peak_bytes <= cap:
        return
    what = f"--max-memory-gb {limit_gb:g}" if limit_gb is not None else f"the {cap / 2**30:.1f} GiB available"
    raise SEError(f"this expansion needs about {plan.peak_bytes / 2**30:.1f} GiB of host memory at layer "
                  f"{plan.worst_layer}, more than {what}: use fewer --experts or --calib-samples, or a shorter --seqlen")
