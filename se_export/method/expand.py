"""The Sparse Expansion pipeline: sequential, layer by layer, with resumable progress.

For each decoder layer, only that layer's calibration activations are live:

1. run the layer on the captured hidden states, stopping at the MLP, to get the first group's
   input (gate/up share it);
2. per linear group: fit the router (``se``), accumulate one Hessian per cluster, prune every
   expert with SparseGPT (batched over experts), install ``RoutedSparseLinear`` modules;
3. the next group's input is produced by the *expanded* previous group ("true sequential",
   default) or by the dense one (``true_sequential=False``, what the official code does);
4. produce the next layer's inputs: where the adapter names the residual stream the MLP adds
   to, from captured activations (residual + expanded MLP on the captured MLP input, reusing
   the last group's calibration input in true-sequential mode; checked against a full layer
   pass on the first chunk), otherwise by running the expanded layer again.

After every layer its modules and report are written to ``<out>/.se-partial`` (atomically), so
an interrupted run resumes from the last finished layer with an identical result.

``magnitude`` needs no data: its masks come from the weights alone, so it skips the calibration
passes (and their reconstruction-error diagnostic) and takes seconds instead of minutes.
"""

from __future__ import annotations

import gc
import hashlib
import json
import resource
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..adapters import MlpAdapter, adapter_for, decoder_layers, linear_weight, set_submodule
from ..errors import SEError
from ..formats.partial import load_partial_layer, save_partial_layer
from ..formats.quantization import QUANT_METHODS, QuantSpec, parse_quant, round_to_nearest
from ..formats.sparse_format import FORMATS, pack_experts
from ..modeling.modules import RoutedSparseLinear, decoded_expert_cache
from ..progress import progress_bar
from . import baselines
from .capture import (
    RowBuffer,
    capture_decoder_inputs,
    capture_input,
    capture_inputs,
    count_rows,
    layer_output,
    stack_rows,
)
from .layer_sparsity import LAYER_SPARSITY_MODES, layer_sparsities
from .router import fit_router
from .sparsegpt import ClusterHessians, input_gram, reconstruction_error, sparsegpt_prune
from .sparsity import SparsitySpec, parse_sparsity


def _wanda(weight: torch.Tensor, gram: torch.Tensor | None, spec: SparsitySpec) -> torch.Tensor:
    return baselines.wanda_mask(weight, torch.diagonal(gram).float(), spec)


def _magnitude(weight: torch.Tensor, _gram: torch.Tensor | None, spec: SparsitySpec) -> torch.Tensor:
    return baselines.magnitude_mask(weight, spec)


@dataclass(frozen=True)
class Method:
    """How a pruning method expands a linear group. ``routed``: a router and K experts (else one);
    ``mask``: a keep-mask from the weights and the inputs' Gram matrix, without weight updates
    (None: SparseGPT with its OBS update on each expert's Hessian); ``data_free``: the mask needs
    no calibration activations at all."""

    routed: bool = False
    mask: Callable[[torch.Tensor, torch.Tensor | None, SparsitySpec], torch.Tensor] | None = None
    data_free: bool = False


METHODS: dict[str, Method] = {
    "se": Method(routed=True),
    "sparsegpt": Method(),
    "wanda": Method(mask=_wanda),
    "magnitude": Method(mask=_magnitude, data_free=True),
}
DATA_FREE_METHODS = tuple(name for name, m in METHODS.items() if m.data_free)  # no calibration passes
VALUE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32,
                "int8": torch.int8, "int4": torch.int8}  # int4 codes are int8 in memory, packed on disk
_LAYER_CACHE_BYTES = 4 << 30  # decoded experts of the layer being calibrated
# Hessians and their factors in one pruning pass (experts_per_chunk): 512 MiB is all 16 experts up
# to 1024 inputs, 7 at the default model's 1536, 1 from 4096 on; passes of fewer experts cost no
# measurable time and cut the peak (BENCHMARKS.md, "Memory of the pruning stage").
_PRUNE_BUDGET_BYTES = 512 << 20


@dataclass
class ExpandConfig:
    """Everything that determines the expanded weights (hashed to guard ``--resume``)."""

    method: str = "se"
    experts: int = 16
    sparsity: str = "0.5"
    pca_factor: int = 32
    seed: int = 0
    true_sequential: bool = True
    min_cluster_tokens: int = 128
    restarts: int = 3
    blocksize: int = 128
    percdamp: float = 0.01
    value_dtype: str = "fp16"
    group_size: int | None = None  # input columns per scale of int8/int4 values (None: the dtype's default)
    quant_method: str = "joint"  # int8/int4 with SparseGPT: "joint" (inside the sweep) or "rtn" (rounded after it)
    format: str = "auto"
    batch_size: int = 8
    layers: list[int] | None = None
    experts_per_layer: list[int] | None = None  # overrides ``experts`` (see allocation.py)
    layer_sparsity: str = "uniform"  # or "owl": per-layer sparsity at the same total (layer_sparsity.py)
    owl_lambda: float = 0.08  # OWL: densities spread over 2 * lambda
    owl_threshold: float = 5.0  # OWL: an outlier scores above this many times the layer's mean
    hessian_prior: float = 0.0  # each expert's Hessian gets this many x in_features tokens of the pooled one

    def experts_for(self, layer: int) -> int:
        return self.experts_per_layer[layer] if self.experts_per_layer else self.experts

    def check(self) -> SparsitySpec:
        """Validate the settings; return the parsed sparsity."""
        if self.method not in METHODS:
            raise SEError(f"unknown method '{self.method}': use one of {', '.join(METHODS)}")
        if self.experts < 1:
            raise SEError(f"--experts must be >= 1 (got {self.experts})")
        routed = METHODS[self.method].routed
        if self.experts_per_layer and (not routed or min(self.experts_per_layer) < 1):
            raise SEError("per-layer expert counts need --method se and at least one expert per layer")
        if not routed and self.experts != 1:
            raise SEError(f"--method {self.method} prunes one expert; drop --experts or use --method se")
        if self.value_dtype not in VALUE_DTYPES:
            raise SEError(f"unknown value dtype '{self.value_dtype}': use one of {', '.join(VALUE_DTYPES)}")
        quant = parse_quant(self.value_dtype, self.group_size)
        if self.quant_method not in QUANT_METHODS:
            raise SEError(f"unknown --quant-method '{self.quant_method}': use one of {', '.join(QUANT_METHODS)}")
        if self.quant_method != "joint" and quant is None:
            raise SEError(f"--quant-method {self.quant_method} rounds int8/int4 values: add --value-dtype int8 or int4")
        if self.format not in ("auto", *FORMATS):
            raise SEError(f"unknown format '{self.format}': use auto or one of {', '.join(FORMATS)}")
        if self.pca_factor < 0:
            raise SEError("--pca-factor must be >= 0 (0 or 1 disables PCA)")
        if self.hessian_prior < 0:
            raise SEError(f"--hessian-prior must be >= 0 (got {self.hessian_prior:g}; 0 disables it)")
        spec = parse_sparsity(self.sparsity)
        if self.layer_sparsity not in LAYER_SPARSITY_MODES:
            raise SEError(f"unknown --layer-sparsity '{self.layer_sparsity}': use one of {', '.join(LAYER_SPARSITY_MODES)}")
        if self.layer_sparsity != "uniform":
            if spec.structured:
                raise SEError(f"--layer-sparsity {self.layer_sparsity} varies the fraction of zeros per layer, which "
                              f"{spec} fixes: use an unstructured sparsity such as 0.5")
            if self.owl_lambda <= 0 or self.owl_threshold <= 0:
                raise SEError("--owl-lambda and --owl-threshold must be > 0")
        return spec

    def key(self, extra: dict) -> str:
        fields = asdict(self)
        for name, default in _KEY_DEFAULTS.items():  # options newer than a checkpoint keep its key
            if fields[name] == default:
                del fields[name]
        blob = json.dumps({"config": fields, **extra}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()


_KEY_DEFAULTS = {"layer_sparsity": "uniform", "owl_lambda": 0.08, "owl_threshold": 5.0, "hessian_prior": 0.0}


@dataclass
class ExpandResult:
    layers: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    resumed_layers: int = 0
    layer_sparsity: dict[int, float] = field(default_factory=dict)  # target of every expanded layer


class ExpansionInterrupted(RuntimeError):
    """Raised by ``stop_after_layer`` (tests simulate a crash with it)."""


@dataclass
class LayerCapture:
    """Activations of one layer kept for building the next layer's input without a layer pass."""

    residual: torch.Tensor  # [tokens, hidden]: what the MLP output is added to
    mlp_input: torch.Tensor  # [tokens, in]: the first group's input
    last_input: torch.Tensor | None = None  # [tokens, in]: the expanded last group's input


_REUSE_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-9}  # relative to the output's largest value


def _group_seed(seed: int, layer: int, group: int) -> int:
    return (seed * 1_000_003 + layer * 1009 + group) % (2**63)


def expand_group(
    layer: nn.Module,
    layer_index: int,
    group_index: int,
    names: tuple[str, ...],
    x: torch.Tensor | None,
    cfg: ExpandConfig,
    spec: SparsitySpec,
    adapter: MlpAdapter,
    prefix: str,
) -> tuple[dict[str, RoutedSparseLinear], dict]:
    """Expand the linears ``names`` (sharing input ``x [tokens, in]``) of one layer.

    ``x`` is None for a data-free method: no Gram, Hessians or reconstruction error."""
    start = time.perf_counter()
    dense = [linear_weight(layer.get_submodule(n), adapter) for n in names]
    weight = torch.cat([w.float() for w, _ in dense])
    bounds, row = [], 0
    for w, _ in dense:
        bounds.append((row, row + w.shape[0]))
        row += w.shape[0]
    in_features = weight.shape[1]
    report: dict = {"linears": list(names), "tokens": 0 if x is None else int(x.shape[0])}

    timing: dict[str, float] = {}
    tick = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal tick
        now = time.perf_counter()
        timing[name] = round(timing.get(name, 0.0) + now - tick, 4)
        tick = now

    method = METHODS[cfg.method]
    if x is None and not method.data_free:
        raise SEError(f"--method {cfg.method} needs calibration activations")
    gram = None if x is None else input_gram(x).double()  # shared by the router's PCA and the Hessians
    lap("gram")
    if method.routed:
        router, labels, rrep = fit_router(
            x, cfg.experts_for(layer_index), pca_factor=cfg.pca_factor, seed=_group_seed(cfg.seed, layer_index, group_index),
            restarts=cfg.restarts, min_cluster_tokens=cfg.min_cluster_tokens, gram=gram)
        router_weight, router_bias = router.fold()
        report["router"] = rrep.as_dict()
    else:
        labels = None
        router_weight, router_bias = torch.zeros(in_features, 1), torch.zeros(1)
    num_experts = router_weight.shape[1]
    lap("router")

    prior = round(cfg.hessian_prior * in_features) if method.routed else 0
    clusters = None if x is None else ClusterHessians(x, labels, num_experts, total=gram, prior_tokens=prior)
    lap("hessians")
    quant = parse_quant(cfg.value_dtype, cfg.group_size, in_features)
    scales = None
    if method.mask is None:  # SparseGPT: quantized jointly, inside the sweep (or rounded after it)
        joint = cfg.quant_method == "joint"
        pruned, keep, scales = _prune_experts(weight, clusters, spec, cfg, bounds, report, lap, quant if joint else None)
        if quant is not None and not joint:
            pruned, scales = round_to_nearest(pruned, keep, quant)
            lap("prune")
    else:  # a mask without weight updates: quantized by rounding to nearest
        keep = torch.cat([method.mask(weight[a:b], gram, spec) for a, b in bounds]).unsqueeze(0)
        pruned = weight.unsqueeze(0) * keep
        if quant is not None:
            pruned, scales = round_to_nearest(pruned, keep, quant)
        lap("prune")
        if clusters is not None:
            hessians = clusters.hessians([0])
            lap("hessians")
            report["reconstruction_error"] = reconstruction_error(weight, pruned, hessians)
    if clusters is not None:
        report["cluster_sizes"] = clusters.counts.tolist()

    value_dtype = VALUE_DTYPES[cfg.value_dtype]
    group_name = f"{prefix}.{names[0]}"
    modules: dict[str, RoutedSparseLinear] = {}
    for name, (a, b), (_, bias) in zip(names, bounds, dense, strict=True):
        packed = pack_experts(pruned[:, a:b], keep[:, a:b], cfg.format, value_dtype, quant,
                              None if scales is None else scales[:, a:b])
        expert_bias = None if bias is None else bias.float().expand(num_experts, -1).contiguous()
        modules[name] = RoutedSparseLinear(packed, router_weight, router_bias, expert_bias, router_group=group_name)
    report["format"] = {n: m.format for n, m in modules.items()}
    report["sparsity"] = {n: 1.0 - m.values.numel() / (m.num_experts * m.out_features * m.in_features)
                          for n, m in modules.items()}
    lap("pack")
    report["timing"] = timing
    report["seconds"] = round(time.perf_counter() - start, 3)
    return modules, report


def experts_per_chunk(in_features: int, num_experts: int, budget: int | None = None) -> int:
    """How many experts' Hessians one pruning pass holds: ~8 fp32 ``[in, in]`` copies each live
    at once (Hessian, damped and reversed copies, Cholesky factor, its inverse) within ``budget``
    bytes, so a wide linear is pruned a few experts at a time instead of all K at once."""
    budget = _PRUNE_BUDGET_BYTES if budget is None else budget
    return max(1, min(num_experts, budget // (8 * 4 * in_features * in_features)))


def _prune_experts(weight: torch.Tensor, clusters: ClusterHessians, spec: SparsitySpec, cfg: ExpandConfig,
                   bounds: list[tuple[int, int]], report: dict, lap: Callable[[str], None],
                   quant: QuantSpec | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """SparseGPT for every expert, batched over as many experts as the memory budget allows;
    fills the report's damping, dead inputs and reconstruction errors; returns (pruned, keep,
    scales), the pruned weights dequantized when ``quant`` quantizes them in the same sweep."""
    num_experts = clusters.num_experts
    chunk = experts_per_chunk(weight.shape[1], num_experts)
    order = clusters.expert_order()  # the derived Hessian last, whatever the chunk size
    pruned = torch.empty(num_experts, *weight.shape)
    keep = torch.empty(num_experts, *weight.shape, dtype=torch.bool)
    scales = None if quant is None else torch.empty(num_experts, weight.shape[0], quant.groups(weight.shape[1]))
    damping, dead, errors = [0.0] * num_experts, [0] * num_experts, [0.0] * num_experts
    for c in range(0, num_experts, chunk):
        ids = order[c : c + chunk]
        hessians = clusters.hessians(ids)
        lap("hessians")
        result = sparsegpt_prune(weight, hessians, spec, blocksize=cfg.blocksize, percdamp=cfg.percdamp,
                                 row_segments=bounds, quant=quant)
        lap("prune")
        index = torch.tensor(ids)
        pruned[index], keep[index] = result.weight, result.keep
        if scales is not None:
            scales[index] = result.scales
        for i, k in enumerate(ids):
            damping[k], dead[k] = result.damping[i], result.dead_inputs[i]
        for k, error in zip(ids, reconstruction_error(weight, result.weight, hessians), strict=True):
            errors[k] = error
        del result, hessians
        lap("pack")  # the reconstruction-error diagnostic is booked with packing, as before
    report["damping"], report["dead_inputs"], report["reconstruction_error"] = damping, dead, errors
    return pruned, keep, scales


# ---------------------------------------------------------------- the pipeline


def check_group_size(cfg: ExpandConfig, layers: nn.ModuleList, adapter: MlpAdapter, selected: set[int]) -> None:
    """Refuse an int8/int4 group size wider than the narrowest selected linear, before any work."""
    if parse_quant(cfg.value_dtype, cfg.group_size) is not None and selected:
        narrowest = min(linear_weight(layers[i].get_submodule(n), adapter)[0].shape[1]
                        for i in selected for group in adapter.groups for n in group)
        parse_quant(cfg.value_dtype, cfg.group_size, narrowest)


@torch.no_grad()
def expand_model(
    model: nn.Module,
    calib: torch.Tensor | None,
    cfg: ExpandConfig,
    *,
    workdir: Path | None = None,
    show_progress: bool = True,
    stop_after_layer: int | None = None,
) -> ExpandResult:
    """Expand the MLP linears of ``model`` in place, calibrated on ``calib [N, L]`` token ids
    (None for a data-free method)."""
    spec = cfg.check()
    data_free = METHODS[cfg.method].data_free
    if calib is None and not data_free:
        raise SEError(f"--method {cfg.method} needs calibration text")
    model.eval()
    adapter = adapter_for(model.config)
    layers = decoder_layers(model, adapter)
    if cfg.experts_per_layer is not None and len(cfg.experts_per_layer) != len(layers):
        raise SEError(f"{len(cfg.experts_per_layer)} per-layer expert counts for {len(layers)} layers")
    if METHODS[cfg.method].routed and max(cfg.experts_per_layer or [cfg.experts]) > calib.numel():
        raise SEError(f"--experts {cfg.experts} is larger than the {calib.numel()} calibration tokens: "
                      "use fewer experts or more --calib-samples/--seqlen")
    selected = set(range(len(layers)) if cfg.layers is None else cfg.layers)
    if bad := [i for i in selected if not 0 <= i < len(layers)]:
        raise SEError(f"--layers {bad} out of range: the model has {len(layers)} layers (0..{len(layers) - 1})")
    check_group_size(cfg, layers, adapter, selected)
    last = max(selected, default=-1)
    start = time.perf_counter()
    result = ExpandResult()
    result.layer_sparsity = layer_sparsities(model, layers, adapter, calib, sorted(selected), spec.fraction,
                                             mode=cfg.layer_sparsity, lam=cfg.owl_lambda,
                                             threshold=cfg.owl_threshold, batch_size=cfg.batch_size)
    specs = {i: spec if spec.structured or s == spec.fraction else SparsitySpec(fraction=s)
             for i, s in result.layer_sparsity.items()}

    states, kwargs_list = ([], []) if data_free else capture_decoder_inputs(model, layers, calib, cfg.batch_size)
    reuse = adapter.residual is not None and adapter.mlp is not None and len(adapter.groups[-1]) == 1
    with progress_bar(show_progress) as bar:
        task = bar.add_task("expanding", total=last + 1)
        for index in range(last + 1):
            layer = layers[index]
            prefix = f"{adapter.layers}.{index}"
            bar.update(task, description=f"layer {index}/{last}")
            if index in selected:
                loaded = load_partial_layer(workdir, index, prefix) if workdir else None
                capture = None
                if loaded is not None:
                    modules, report = loaded
                    for name, module in modules.items():
                        set_submodule(layer, name, module)
                    result.resumed_layers += 1
                else:
                    if data_free:
                        report = _expand_layer_from_weights(layer, index, prefix, cfg, specs[index], adapter)
                    else:
                        report, capture = _expand_layer(layer, index, prefix, states, kwargs_list, cfg, specs[index],
                                                        adapter)
                    report["target_sparsity"] = specs[index].fraction
                    modules = {n: layer.get_submodule(n) for g in adapter.groups for n in g}
                    if workdir:
                        save_partial_layer(workdir, index, prefix, modules, report)
                result.layers.append(report)
            if index < last and not data_free:
                with decoded_expert_cache(_LAYER_CACHE_BYTES):
                    if index in selected and reuse:
                        states, reuse = next_layer_states(layer, adapter, states, kwargs_list, capture)
                    else:
                        states = [layer_output(layer(h, **kw)) for h, kw in zip(states, kwargs_list, strict=True)]
                capture = None
            gc.collect()
            bar.update(task, advance=1)
            if stop_after_layer is not None and index >= stop_after_layer and index < last:
                raise ExpansionInterrupted(f"stopped after layer {index}")
    result.seconds = round(time.perf_counter() - start, 2)
    result.peak_rss_mb = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return result


def _capture_mlp_input(layer, adapter: MlpAdapter, states, kwargs_list) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The first group's input and (where the adapter names it) the residual the MLP adds to,
    from one run of the layer up to the MLP."""
    first_linear = layer.get_submodule(adapter.groups[0][0])
    rows = count_rows(states)
    if adapter.residual is None:
        return stack_rows((capture_input(first_linear, lambda h=h, kw=kw: layer(h, **kw))
                           for h, kw in zip(states, kwargs_list, strict=True)), rows), None
    targets = [layer.get_submodule(adapter.residual), first_linear]
    residual, first = RowBuffer(rows), RowBuffer(rows)
    for h, kw in zip(states, kwargs_list, strict=True):
        residual_part, first_part = capture_inputs(targets, lambda h=h, kw=kw: layer(h, **kw))
        residual.add(residual_part)
        first.add(first_part)
    return first.result(), residual.result()


def next_layer_states(layer, adapter: MlpAdapter, states: list[torch.Tensor], kwargs_list: list[dict],
                      capture: LayerCapture | None) -> tuple[list[torch.Tensor], bool]:
    """The expanded layer's outputs (the next layer's inputs) as residual + expanded MLP, without
    running attention again; returns ``(states, ok)``. The first chunk is checked against a full
    layer pass: if the adapter's residual claim does not hold, the full pass is used (ok=False)."""
    if capture is None:  # a resumed layer: capture exactly what an uninterrupted run keeps
        mlp_input, residual = _capture_mlp_input(layer, adapter, states, kwargs_list)
        capture = LayerCapture(residual, mlp_input)
    last = layer.get_submodule(adapter.groups[-1][0])
    act = capture.last_input
    if act is None:
        act = _group_input(layer, adapter, len(adapter.groups) - 1, capture.mlp_input, None)
    flat = capture.residual  # residual + expanded MLP, in place: the capture is not used again
    for at, c in zip(range(0, act.shape[0], 8192), act.split(8192), strict=True):
        flat[at:at + c.shape[0]] += last(c)
    out, row = [], 0
    for h in states:
        n = h.numel() // h.shape[-1]
        out.append(flat[row:row + n].reshape(h.shape).to(h.dtype))
        row += n
    reference = layer_output(layer(states[0], **kwargs_list[0]))
    tolerance = _REUSE_TOLERANCE.get(reference.dtype, 2e-2) * reference.abs().max().clamp_min(1.0)
    if (out[0] - reference).abs().max() <= tolerance:
        return out, True
    warnings.warn(f"{type(layer).__name__}: residual + MLP differs from the layer's output; the adapter's "
                  f"'residual' entry is wrong for this model, running full layer passes instead", stacklevel=2)
    return [layer_output(layer(h, **kw)) for h, kw in zip(states, kwargs_list, strict=True)], False


def _expand_layer_from_weights(layer, index: int, prefix: str, cfg: ExpandConfig, spec: SparsitySpec,
                               adapter: MlpAdapter) -> dict:
    """A data-free method's layer: every group from its weights alone, no layer passes."""
    layer_start = time.perf_counter()
    reports = []
    for g, names in enumerate(adapter.groups):
        modules, report = expand_group(layer, index, g, names, None, cfg, spec, adapter, prefix)
        for name, module in modules.items():
            set_submodule(layer, name, module)
        reports.append(report)
    return {"layer": index, "groups": reports, "true_sequential": cfg.true_sequential,
            "seconds": round(time.perf_counter() - layer_start, 3)}


def _expand_layer(layer, index, prefix, states, kwargs_list, cfg, spec,
                  adapter: MlpAdapter) -> tuple[dict, LayerCapture | None]:
    layer_start = time.perf_counter()
    groups = adapter.groups

    def run_layer_to(target: nn.Module) -> torch.Tensor:
        return stack_rows((capture_input(target, lambda h=h, kw=kw: layer(h, **kw))
                           for h, kw in zip(states, kwargs_list, strict=True)), count_rows(states))

    first_input, residual = _capture_mlp_input(layer, adapter, states, kwargs_list)
    inputs = {0: first_input}
    if not cfg.true_sequential:  # every group calibrated on the dense layer's activations
        for g in range(1, len(groups)):
            inputs[g] = _group_input(layer, adapter, g, inputs[0], run_layer_to)
    reports = []
    for g, names in enumerate(groups):
        if g not in inputs:
            with decoded_expert_cache(_LAYER_CACHE_BYTES):
                inputs[g] = _group_input(layer, adapter, g, inputs[0], run_layer_to)
        modules, report = expand_group(layer, index, g, names, inputs[g], cfg, spec, adapter, prefix)
        last_input = inputs[g] if g == len(groups) - 1 and cfg.true_sequential else None
        if g and cfg.true_sequential:
            del inputs[g]
        for name, module in modules.items():
            set_submodule(layer, name, module)
        reports.append(report)
    if not cfg.true_sequential:  # routers fit on dense activations meet the expanded ones at inference
        for g in range(1, len(groups)):
            is_last = g == len(groups) - 1
            routed = METHODS[cfg.method].routed
            if not routed and not (is_last and residual is not None):
                continue
            with decoded_expert_cache(_LAYER_CACHE_BYTES):
                actual = _group_input(layer, adapter, g, inputs[0], run_layer_to)
            if routed:
                router = layer.get_submodule(groups[g][0])
                reports[g]["inference_routing_agreement"] = routing_agreement(router, inputs.pop(g), actual)
            if is_last:
                last_input = actual
    capture = None if residual is None else LayerCapture(residual, inputs[0], last_input)
    return {"layer": index, "groups": reports, "true_sequential": cfg.true_sequential,
            "seconds": round(time.perf_counter() - layer_start, 3)}, capture


def routing_agreement(module: RoutedSparseLinear, calibrated_on: torch.Tensor, sees: torch.Tensor) -> float:
    """Share of tokens the router sends to the same expert on the activations it was calibrated on
    as on the activations it sees at inference (they differ when calibration used dense outputs)."""
    def route(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.argmin(c @ module.router_weight + module.router_bias, 1) for c in x.split(8192)])
    return float((route(calibrated_on) == route(sees)).float().mean())


def _group_input(layer, adapter: MlpAdapter, g: int, first_input: torch.Tensor, run_layer_to) -> torch.Tensor:
    """Input of group g: from the MLP alone when the adapter names it, else from the whole layer."""
    target = layer.get_submodule(adapter.groups[g][0])
    if adapter.mlp is None:
        return run_layer_to(target)
    mlp = layer.get_submodule(adapter.mlp)
    chunks = first_input.split(8192)
    return stack_rows((capture_input(target, lambda c=c: mlp(c.unsqueeze(0))) for c in chunks), first_input.shape[0])
