"""Matplotlib figures (PNG, headless) for the analysis and benchmark reports."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from ..atomic import atomic_path


def _save(fig, path: Path) -> None:
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def wd_histograms(wds: list[torch.Tensor], top: float, path: Path) -> None:
    """One small histogram of neuron WD per layer; the top-``top`` threshold marked in red."""
    n = len(wds)
    cols = min(6, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.0 * rows), squeeze=False)
    hi = max(float(w.max()) for w in wds)
    for i, ax in enumerate(axes.flat):
        if i >= n:
            ax.axis("off")
            continue
        w = wds[i].numpy()
        ax.hist(w, bins=50, range=(0, hi), color="#4477aa", log=True)
        ax.axvline(float(torch.quantile(wds[i].double(), 1 - top)), color="#cc3311", lw=1)
        ax.set_title(f"layer {i}", fontsize=8)
        ax.tick_params(labelsize=6)
    fig.suptitle(f"Neuron Wasserstein distance to N(0,1) per layer (red: top {top:.0%})", fontsize=10)
    _save(fig, path)


def wd_heatmap(wds: list[torch.Tensor], path: Path, bins: int = 60) -> None:
    """Layers x WD bins, colour = log10(1 + neuron count): where entanglement sits in depth."""
    hi = max(float(w.max()) for w in wds)
    counts = torch.stack([torch.histc(w.float(), bins=bins, min=0, max=hi) for w in wds])
    fig, ax = plt.subplots(figsize=(8, 0.18 * len(wds) + 1.5))
    im = ax.imshow(torch.log10(1 + counts).numpy(), aspect="auto", origin="lower", cmap="magma",
                   extent=(0, hi, -0.5, len(wds) - 0.5))
    ax.set_xlabel("Wasserstein distance to N(0,1)")
    ax.set_ylabel("layer")
    fig.colorbar(im, ax=ax, label="log10(1 + neurons)")
    ax.set_title("Neuron WD by layer")
    _save(fig, path)


def neuron_overlay(dense: torch.Tensor, variants: dict[str, tuple[torch.Tensor, float]], title: str, path: Path) -> None:
    """The dense output distribution of one neuron with sparse variants, each labelled with W1."""
    fig, ax = plt.subplots(figsize=(7, 4))
    lo, hi = torch.quantile(dense.double(), torch.tensor([0.001, 0.999], dtype=torch.float64)).tolist()
    span = hi - lo
    lo, hi = lo - 0.1 * span, hi + 0.1 * span
    ax.hist(dense.numpy(), bins=120, range=(lo, hi), density=True, color="#bbbbbb", label="dense")
    colors = ["#cc3311", "#ee7733", "#009988", "#33bbee", "#0077bb", "#332288", "#ee3377"]
    for (label, (values, dist)), color in zip(variants.items(), colors, strict=False):
        ax.hist(values.numpy(), bins=120, range=(lo, hi), density=True, histtype="step", lw=1.2, color=color,
                label=f"{label} (W1 to dense {dist:.4f})")
    ax.set_xlabel("pre-activation")
    ax.set_ylabel("density")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    _save(fig, path)


def bars(values: dict[str, float], ylabel: str, title: str, path: Path, baseline: float | None = None,
         logy: bool = False) -> None:
    """One bar per labelled value, optional dashed baseline (benchmarks)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(list(values), list(values.values()), color="#4477aa")
    if baseline is not None:
        ax.axhline(baseline, color="#cc3311", ls="--", lw=1, label=f"dense {baseline:.2f}")
        ax.legend(fontsize=8)
    if logy:
        ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    _save(fig, path)
