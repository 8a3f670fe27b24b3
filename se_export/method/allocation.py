"""Spend a fixed expert budget where entanglement is: per-layer expert counts from the layers'
Wasserstein profile.

All MLP layers of the supported models have the same shape, so the total number of experts is
the total stored bytes (at fixed sparsity) and each token still runs one expert per linear: the
budget in bytes and in active weights is that of uniform K, up to the router's in*K_l
multiply-adds, which the report counts.
"""

from __future__ import annotations

import torch

from ..errors import SEError


def layer_scores(wds: list[torch.Tensor], top: float = 0.03) -> list[float]:
    """Mean WD of each layer's top-``top`` neurons: how entangled its hardest neurons are."""
    scores = []
    for wd in wds:
        count = max(1, round(top * wd.numel()))
        scores.append(float(torch.topk(wd.double(), count).values.mean()))
    return scores


def allocate_experts(scores: list[float], experts: int, min_experts: int = 1, max_factor: int = 4) -> list[int]:
    """Integers proportional to ``scores`` summing to ``experts * layers`` (largest remainder),
    each within ``[min_experts, max_factor * experts]``."""
    n = len(scores)
    if n == 0 or experts < 1:
        raise SEError("nothing to allocate: need at least one layer and --experts >= 1")
    total = experts * n
    hi = max_factor * experts
    s = torch.tensor(scores, dtype=torch.float64).clamp(min=1e-12)
    counts = torch.full((n,), float(min_experts), dtype=torch.float64)
    free = torch.ones(n, dtype=torch.bool)
    remaining = total - min_experts * n
    # water-filling: share what is left in proportion to the scores, capping at hi
    for _ in range(n):
        share = remaining * s * free / (s * free).sum()
        over = free & (counts + share > hi)
        if not bool(over.any()):
            counts = counts + share
            break
        remaining -= float((hi - counts[over]).sum())
        counts[over] = hi
        free &= ~over
    base = counts.floor()
    left = int(total - base.sum())
    order = torch.argsort(counts - base, descending=True, stable=True)
    base[order[:left]] += 1
    return [int(v) for v in base.tolist()]
