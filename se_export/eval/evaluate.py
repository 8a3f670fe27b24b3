"""Perplexity on non-overlapping windows: PPL = exp(mean NLL over every predicted token)."""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from ..atomic import atomic_write_text
from ..progress import progress_bar


def evaluation_digest(model: torch.nn.Module, windows: torch.Tensor, batch: int) -> str:
    """Identity of an evaluation: the token windows, the batching (it moves float rounding) and a
    fingerprint of the weights (float64 sum of every parameter and buffer), so saved NLLs are never
    continued with another model."""
    h = hashlib.sha256(windows.to(torch.int64).contiguous().numpy().tobytes())
    h.update(f"{tuple(windows.shape)} batch={batch}".encode())
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        h.update(f"{name}:{tuple(t.shape)}:{t.sum(dtype=torch.float64).item()!r}".encode())
    return h.hexdigest()


def _resumed_nll(resume: Path | None, digest: str) -> list[float]:
    """Per-window NLLs a previous, interrupted run of the same evaluation saved (else none)."""
    if resume is None or not resume.is_file():
        return []
    try:
        state = json.loads(resume.read_text())
    except (OSError, ValueError):
        return []
    return list(state["window_nll"]) if state.get("digest") == digest else []


@torch.no_grad()
def perplexity(model: torch.nn.Module, windows: torch.Tensor, show_progress: bool = True, batch: int = 1,
               resume: Path | None = None) -> dict:
    """Mean next-token NLL of ``windows [W, L]`` and its exp; each window is its own context.

    ``batch`` windows run per forward pass (more tokens per expert for expanded models, the same
    result up to float rounding). ``window_nll`` keeps every window's mean NLL, so a prefix subset
    or a paired comparison of two models can be computed later without re-running. With ``resume``
    the NLLs so far are saved there after every batch (atomically) and a re-run of the same windows
    and batching continues after them: an all-window evaluation of an expanded model takes half an
    hour on a small CPU. The caller removes the file once the result is stored."""
    model.eval()
    batch = max(1, batch)
    digest = evaluation_digest(model, windows, batch) if resume is not None else ""
    per_window = _resumed_nll(resume, digest)
    resumed = len(per_window)
    start = time.perf_counter()
    with progress_bar(show_progress) as bar:
        task = bar.add_task("perplexity", total=windows.shape[0], completed=resumed)
        for chunk in windows[resumed:].split(batch) if resumed < windows.shape[0] else ():
            logits = model(chunk, use_cache=False).logits
            for window, window_logits in zip(chunk, logits, strict=True):  # one vocab-wide softmax at a time
                nll = F.cross_entropy(window_logits[:-1].float(), window[1:])
                per_window.append(float(nll))
            del logits
            if resume is not None:
                atomic_write_text(resume, json.dumps({"digest": digest, "window_nll": per_window}))
            bar.update(task, advance=chunk.shape[0],
                       description=f"perplexity {math.exp(sum(per_window) / len(per_window)):.2f}")
    mean = sum(per_window) / max(1, len(per_window))  # equal-length windows: mean over windows = over tokens
    return {"perplexity": math.exp(mean), "nll": mean, "windows": int(windows.shape[0]),
            "seqlen": int(windows.shape[1]), "tokens": int(windows.shape[0] * (windows.shape[1] - 1)),
            "seconds": round(time.perf_counter() - start, 2), "resumed_windows": resumed, "window_nll": per_window}
