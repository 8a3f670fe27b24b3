"""Wasserstein neurons (Sawmya et al., ICLR 2025): how far a neuron's standardized output
distribution is from N(0, 1), plus the paper's mapping difficulty.

The distance is exact for the empirical distribution: with sorted standardized outputs
``z_(1) <= ... <= z_(n)``, ``W1 = sum_i int_{(i-1)/n}^{i/n} |z_(i) - Phi^-1(u)| du``, and each
integral has a closed form in ``Phi`` and ``phi`` (no random normal sample, so it is
deterministic). ``NeuronStats`` accumulates outputs chunk by chunk into a fixed buffer and gives
exactly the one-shot result.
"""

from __future__ import annotations

import math

import torch

_SQRT2 = math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _phi(x: torch.Tensor) -> torch.Tensor:
    return torch.exp(-0.5 * x * x) * _INV_SQRT_2PI


def _cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * torch.erfc(-x / _SQRT2)


def standardize(values: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit (population) std per column; constant columns become all zeros."""
    v = values.double()
    mean = v.mean(0)
    std = v.std(0, correction=0)
    return (v - mean) / torch.where(std > 0, std, torch.ones_like(std))


def wasserstein_to_normal(values: torch.Tensor) -> torch.Tensor:
    """W1 between each column's standardized empirical distribution and N(0, 1), ``[neurons]``.

    Per atom ``c = z_(i)`` on quantile interval ``[a, b] = Phi^-1([(i-1)/n, i/n])``:
    ``int_a^b |c - t| phi(t) dt = 2 G(m) - G(a) - G(b)`` with ``G(x) = c Phi(x) + phi(x)`` and
    ``m = clamp(c, a, b)``, and ``G(-inf) = 0``, ``G(inf) = c``.
    """
    z = torch.sort(standardize(values), dim=0).values
    n = z.shape[0]
    u = torch.arange(n + 1, dtype=torch.float64) / n
    edges = torch.special.ndtri(u)  # -inf ... +inf
    a, b = edges[:-1].unsqueeze(1), edges[1:].unsqueeze(1)
    m = torch.minimum(torch.maximum(z, a), b)

    def g(x: torch.Tensor) -> torch.Tensor:  # exact at +-inf too: Phi -> 0/1, phi -> 0
        return z * _cdf(x) + _phi(x)

    return (2 * g(m) - g(a.expand_as(z)) - g(b.expand_as(z))).sum(0)


def wasserstein_between(a: torch.Tensor, b: torch.Tensor) -> float:
    """W1 between two 1-D empirical distributions of equal size (mean gap of sorted samples)."""
    if a.numel() != b.numel():
        raise ValueError("samples must have the same size")
    return float((torch.sort(a.double()).values - torch.sort(b.double()).values).abs().mean())


def mapping_difficulty(x: torch.Tensor, y: torch.Tensor, pairs: int = 2048, seed: int = 0,
                       pool: int = 8192) -> torch.Tensor:
    """How strongly each neuron maps similar inputs to dissimilar outputs, ``[neurons]``.

    For ``pairs`` seeded anchor tokens, take each one's nearest neighbour (L2) among ``pool``
    seeded tokens; MD is the mean output gap ``|y_a - y_nn(a)|`` of these close pairs divided by
    the mean gap over random pairs. A smooth neuron gives neighbours similar outputs (MD << 1);
    an entangled one separates close inputs (MD towards 1 and above). Scale-free in x and y.
    Random pairs alone cannot show this: in high dimension their input distances concentrate.
    """
    gen = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    cand = torch.randperm(n, generator=gen)[: min(pool, n)]
    anchors = cand[torch.randperm(cand.numel(), generator=gen)[: min(pairs, cand.numel())]]
    xa, xc = x[anchors].float(), x[cand].float()
    d = (xa * xa).sum(1, keepdim=True) - 2 * xa @ xc.t() + (xc * xc).sum(1)
    d[anchors.unsqueeze(1) == cand.unsqueeze(0)] = float("inf")  # not itself
    near = cand[d.argmin(1)]
    other = torch.randint(n, (anchors.numel(),), generator=gen)
    close_gap = (y[anchors].double() - y[near].double()).abs().mean(0)
    random_gap = (y[anchors].double() - y[other].double()).abs().mean(0)
    return close_gap / random_gap.clamp(min=1e-30)


class NeuronStats:
    """Outputs of one layer's neurons, gathered chunk by chunk into a fixed-size buffer."""

    def __init__(self, neurons: int, capacity: int) -> None:
        self.buffer = torch.empty(capacity, neurons, dtype=torch.float32)
        self.count = 0

    def update(self, chunk: torch.Tensor) -> None:
        take = min(chunk.shape[0], self.buffer.shape[0] - self.count)
        self.buffer[self.count : self.count + take] = chunk[:take].float()
        self.count += take

    @property
    def full(self) -> bool:
        return self.count >= self.buffer.shape[0]

    def values(self) -> torch.Tensor:
        return self.buffer[: self.count]

    def finalize(self) -> dict[str, torch.Tensor]:
        v = self.values()
        return {"wd": wasserstein_to_normal(v).float(), "mean": v.double().mean(0).float(),
                "std": v.double().std(0, correction=0).float()}
