"""Perplexity on non-overlapping windows: PPL = exp(mean NLL over every predicted token)."""

from __future__ import annotations

import math
import time

import torch
from torch.nn import functional as F

from .progress import progress_bar


@torch.no_grad()
def perplexity(model: torch.nn.Module, windows: torch.Tensor, show_progress: bool = True, batch: int = 1) -> dict:
    """Mean next-token NLL of ``windows [W, L]`` and its exp; each window is its own context.

    ``batch`` windows run per forward pass (more tokens per expert for expanded models, the same
    result up to float rounding). ``window_nll`` keeps every window's mean NLL, so a prefix subset
    or a paired comparison of two models can be computed later without re-running."""
    model.eval()
    per_window: list[float] = []
    start = time.perf_counter()
    with progress_bar(show_progress) as bar:
        task = bar.add_task("perplexity", total=windows.shape[0])
        for chunk in windows.split(max(1, batch)):
            logits = model(chunk, use_cache=False).logits[:, :-1].float()
            nll = F.cross_entropy(logits.transpose(1, 2), chunk[:, 1:], reduction="none").mean(dim=1)
            per_window += [float(v) for v in nll]
            bar.update(task, advance=chunk.shape[0],
                       description=f"perplexity {math.exp(sum(per_window) / len(per_window)):.2f}")
    mean = sum(per_window) / max(1, len(per_window))  # equal-length windows: mean over windows = over tokens
    return {"perplexity": math.exp(mean), "nll": mean, "windows": int(windows.shape[0]),
            "seqlen": int(windows.shape[1]), "tokens": int(windows.shape[0] * (windows.shape[1] - 1)),
            "seconds": round(time.perf_counter() - start, 2), "window_nll": per_window}
