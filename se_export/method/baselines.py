"""Baseline one-shot pruners without weight updates: magnitude and Wanda (Sun et al., 2023)."""

from __future__ import annotations

import torch

from .sparsity import SparsitySpec


def _keep_nm(score: torch.Tensor, spec: SparsitySpec) -> torch.Tensor:
    """Keep the N highest scores in every group of M consecutive inputs (a short tail group keeps
    the same fraction)."""
    out, cols = score.shape
    keep = torch.ones_like(score, dtype=torch.bool)
    full = cols - cols % spec.group_m
    if full:
        groups = score[:, :full].reshape(out, -1, spec.group_m)
        idx = torch.argsort(groups, dim=2, stable=True)[:, :, : spec.prune_n]
        keep[:, :full] = ~torch.zeros_like(groups, dtype=torch.bool).scatter_(2, idx, True).reshape(out, full)
    tail = cols - full
    n_prune = round(tail * spec.fraction)
    if tail and n_prune:
        idx = torch.argsort(score[:, full:], dim=1, stable=True)[:, :n_prune]
        keep[:, full:] = ~torch.zeros_like(score[:, full:], dtype=torch.bool).scatter_(1, idx, True)
    return keep


def _keep_top(score: torch.Tensor, fraction: float) -> torch.Tensor:
    """Prune exactly round(fraction * numel) lowest scores along the last dim."""
    count = round(score.shape[-1] * fraction)
    keep = torch.ones_like(score, dtype=torch.bool)
    if count:
        idx = torch.argsort(score, dim=-1, stable=True)[..., :count]
        keep.scatter_(-1, idx, False)
    return keep


def magnitude_mask(weight: torch.Tensor, spec: SparsitySpec) -> torch.Tensor:
    """Keep mask of layer-wise magnitude pruning (N:M per group when structured)."""
    score = weight.float().abs()
    if spec.structured:
        return _keep_nm(score, spec)
    return _keep_top(score.reshape(1, -1), spec.fraction).reshape(weight.shape)


def wanda_mask(weight: torch.Tensor, input_sq_norms: torch.Tensor, spec: SparsitySpec) -> torch.Tensor:
    """Keep mask of Wanda: score ``|W_ij| * ||X_j||``, compared within each output row.

    ``input_sq_norms`` is ``sum_t x_tj^2`` per input (the diagonal of ``X^T X``).
    """
    score = weight.float().abs() * input_sq_norms.float().clamp(min=0).sqrt().unsqueeze(0)
    if spec.structured:
        return _keep_nm(score, spec)
    return _keep_top(score, spec.fraction)
