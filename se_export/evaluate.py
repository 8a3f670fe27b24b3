"""Perplexity on non-overlapping windows: PPL = exp(mean NLL over every predicted token)."""

from __future__ import annotations

import math
import time

import torch
from torch.nn import functional as F

from .progress import progress_bar


@torch.no_grad()
def perplexity(model: torch.nn.Module, windows: torch.Tensor, show_progress: bool = True) -> dict:
    """Mean next-token NLL of ``windows [W, L]`` and its exp; each window is its own context."""
    model.eval()
    total_nll = 0.0
    total_tokens = 0
    start = time.perf_counter()
    with progress_bar(show_progress) as bar:
        task = bar.add_task("perplexity", total=windows.shape[0])
        for window in windows:
            logits = model(window.unsqueeze(0), use_cache=False).logits[0, :-1].float()
            nll = F.cross_entropy(logits, window[1:], reduction="sum")
            total_nll += float(nll)
            total_tokens += window.numel() - 1
            bar.update(task, advance=1, description=f"perplexity {math.exp(total_nll / total_tokens):.2f}")
    mean = total_nll / max(1, total_tokens)
    return {"perplexity": math.exp(mean), "nll": mean, "windows": int(windows.shape[0]),
            "seqlen": int(windows.shape[1]), "tokens": total_tokens,
            "seconds": round(time.perf_counter() - start, 2)}
