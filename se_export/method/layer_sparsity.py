"""Non-uniform sparsity per decoder layer at the same total: OWL's outlier-weighted allocation.

Layers differ in how many weights matter out of proportion (Yin et al., *Outlier Weighed Layerwise
Sparsity*, ICML 2024): a weight is an outlier when its Wanda score ``|W_ij| * ||X_j||`` exceeds
``threshold`` times the layer's mean score. Layers with more outliers keep more weights. Here the
layer is its MLP (the linears the expansion prunes), scored on the dense model's calibration
activations before anything is pruned. Densities are the outlier ratios mapped linearly onto a
range of width ``2 * lam``, then shifted so that the kept weights, summed over the layers, equal
those of uniform sparsity: same stored bytes and same active weights per token.
"""

from __future__ import annotations

import torch
from torch import nn

from ..adapters import MlpAdapter, linear_weight
from ..errors import SEError

LAYER_SPARSITY_MODES = ("uniform", "owl")


def outlier_ratio(weights: list[torch.Tensor], input_sq_norms: list[torch.Tensor], threshold: float) -> float:
    """Share of the layer's weights whose ``|W_ij| * ||X_j||`` exceeds ``threshold`` x the mean
    over all of the layer's linears (``weights[i] [out, in]``, ``input_sq_norms[i] [in]``)."""
    scores = torch.cat([(w.double().abs() * n.double().clamp_min(0).sqrt()).reshape(-1)
                        for w, n in zip(weights, input_sq_norms, strict=True)])
    return float((scores > threshold * scores.mean()).double().mean())


def owl_sparsities(ratios: list[float], sizes: list[int], target: float, lam: float) -> list[float]:
    """Per-layer sparsities whose size-weighted mean is ``target``; densities spread over
    ``2 * lam`` in proportion to the outlier ``ratios`` (equal ratios: uniform)."""
    if not ratios or len(ratios) != len(sizes) or min(sizes) <= 0:
        raise SEError("OWL needs one outlier ratio and a positive weight count per layer")
    r = torch.tensor(ratios, dtype=torch.float64)
    w = torch.tensor(sizes, dtype=torch.float64)
    spread = float(r.max() - r.min())
    # ratios are shares of a layer's weights: closer than 1e-12 they are equal (no spread from noise)
    density = (r - r.min()) * (2 * lam / spread) if spread > 1e-12 else torch.zeros_like(r)
    density = density - (density * w).sum() / w.sum() + (1.0 - target)
    sparsity = 1.0 - density
    if float(sparsity.min()) < 0 or float(sparsity.max()) >= 1:
        raise SEError(f"--owl-lambda {lam:g} spreads sparsity {target:g} outside [0, 1) "
                      f"({float(sparsity.min()):.3f} to {float(sparsity.max()):.3f}): use a smaller --owl-lambda")
    return [float(s) for s in sparsity]


@torch.no_grad()
def mlp_input_sq_norms(model: nn.Module, layers: nn.ModuleList, adapter: MlpAdapter, calib: torch.Tensor,
                       batch_size: int) -> list[list[torch.Tensor]]:
    """``sum_t x_tj^2`` of every MLP linear's input, per layer and linear (in ``adapter.groups``
    order), over the calibration tokens, from forwards of the dense model."""
    names = [n for group in adapter.groups for n in group]
    sums = [[torch.zeros(linear_weight(layer.get_submodule(n), adapter)[0].shape[1], dtype=torch.float64)
             for n in names] for layer in layers]
    handles = []

    def accumulate(target: torch.Tensor):
        def hook(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            target.add_(x.double().square().sum(0))
        return hook

    try:
        for layer, layer_sums in zip(layers, sums, strict=True):
            for name, total in zip(names, layer_sums, strict=True):
                handles.append(layer.get_submodule(name).register_forward_pre_hook(accumulate(total)))
        for chunk in calib.split(batch_size):
            model(chunk, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return sums


def layer_sparsities(model: nn.Module, layers: nn.ModuleList, adapter: MlpAdapter, calib: torch.Tensor | None,
                     selected: list[int], target: float, *, mode: str, lam: float, threshold: float,
                     batch_size: int = 8, score_windows: int = 32) -> dict[int, float]:
    """Sparsity of every selected layer under ``mode`` (one of ``LAYER_SPARSITY_MODES``, checked by
    ``ExpandConfig.check``); ``uniform`` gives ``target`` everywhere.

    OWL scores on the first ``score_windows`` calibration windows: a share of outliers is a stable
    statistic long before the Hessians are, and each window costs a forward of the dense model."""
    if mode == "uniform" or not selected:
        return dict.fromkeys(selected, target)
    if calib is None:
        raise SEError("--layer-sparsity owl scores weights on calibration activations: use a method with calibration "
                      "(sparsegpt, se, wanda)")
    norms = mlp_input_sq_norms(model, layers, adapter, calib[:score_windows], batch_size)
    names = [n for group in adapter.groups for n in group]
    ratios, sizes = [], []
    for i in selected:
        weights = [linear_weight(layers[i].get_submodule(n), adapter)[0] for n in names]
        ratios.append(outlier_ratio(weights, norms[i], threshold))
        sizes.append(sum(w.numel() for w in weights))
    return dict(zip(selected, owl_sparsities(ratios, sizes, target, lam), strict=True))
