"""``se-export bench ort``: prefill latency and decode tokens/s of exports in ONNX Runtime (CPU).

All exports run in one process, one after another, on the same prompt, so their numbers compare.
Decode is timed step by step with the KV cache after a prefill of ``prompt_len`` tokens; with
``--interleave N`` the exports take turns in N decode blocks each, so every ratio pairs timings
taken seconds apart (``bench_interleaved``).
"""

from __future__ import annotations

import resource
import statistics
import time
from pathlib import Path

import numpy as np

from ..backends.ort_runtime import OrtCausalLM


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _greedy(logits: np.ndarray) -> np.ndarray:
    """The next token of each sequence: argmax of the last position's logits."""
    return logits[:, -1].astype(np.float32).argmax(-1)[:, None]


def _model_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).glob("model.onnx*"))


def bench_one(folder: Path, prompt_len: int, decode_tokens: int, repeats: int, threads: int) -> dict:
    rss0 = _rss_mb()
    t0 = time.perf_counter()
    lm = OrtCausalLM(folder, threads=threads)
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    ids = rng.integers(0, lm.manifest["vocab_size"], size=(1, prompt_len))
    lm.run(ids[:, :8])  # warm-up
    prefill, decode = [], []
    for _ in range(max(1, repeats)):
        t = time.perf_counter()
        logits, past, _ = lm.run(ids)
        prefill.append(time.perf_counter() - t)
        token = _greedy(logits)
        t = time.perf_counter()
        for _ in range(decode_tokens):
            logits, past, _ = lm.run(token, past)
            token = _greedy(logits)
        decode.append(decode_tokens / (time.perf_counter() - t))
    m = lm.manifest
    return {"onnx_dir": str(folder), "dtype": m["dtype"], "portable": m["portable"],
            "custom_op_nodes": m.get("custom_op_nodes", 0), "prompt_len": prompt_len, "decode_tokens": decode_tokens,
            "prefill_ms": statistics.median(prefill) * 1e3, "decode_tokens_per_s": statistics.median(decode),
            "session_load_s": round(load_s, 2), "rss_growth_mb": round(_rss_mb() - rss0, 1),
            "model_bytes": _model_bytes(folder)}


def bench_ort(folders: list[Path], prompt_len: int = 128, decode_tokens: int = 32, repeats: int = 3,
              threads: int = 0) -> dict:
    rows = [bench_one(Path(f), prompt_len, decode_tokens, repeats, threads) for f in folders]
    base = rows[0]
    for r in rows:
        r["decode_speedup_vs_first"] = r["decode_tokens_per_s"] / base["decode_tokens_per_s"]
        r["prefill_speedup_vs_first"] = base["prefill_ms"] / r["prefill_ms"]
    return {"runs": rows, "threads": threads}


def bench_interleaved(folders: list[Path], prompt_len: int = 128, decode_tokens: int = 32, blocks: int = 8,
                      threads: int = 0) -> dict:
    """Decode tokens/s of every export, timed in alternating blocks (A, B, A, B, ...).

    Why: a shared VM's speed drifts by tens of percent between minutes, so a ratio of two exports
    is only fair between timings taken seconds apart; each block's ratio to the first export is
    paired in time, and their median is quoted. Every block restarts from the same prefill cache,
    so all blocks time the same steps (and decode the same tokens, which the result keeps).
    """
    if blocks < 1 or decode_tokens < 1:
        raise ValueError("interleaved timing needs at least one block of at least one decode step")
    models = [OrtCausalLM(Path(f), threads=threads) for f in folders]
    ids = np.random.default_rng(0).integers(0, models[0].manifest["vocab_size"], size=(1, prompt_len))
    starts = []
    for lm in models:
        lm.run(ids[:, :8])  # warm-up
        logits, past, _ = lm.run(ids)
        starts.append((_greedy(logits), past))
    speed: list[list[float]] = [[] for _ in models]
    tokens: list[np.ndarray] = [np.zeros((1, 0), np.int64)] * len(models)
    for _ in range(blocks):
        for i, lm in enumerate(models):
            token, past = starts[i]
            out = []
            t = time.perf_counter()
            for _ in range(decode_tokens):
                logits, past, _ = lm.run(token, past)
                token = _greedy(logits)
                out.append(token)
            speed[i].append(decode_tokens / (time.perf_counter() - t))
            tokens[i] = np.concatenate(out, axis=1)
    rows = []
    for i, folder in enumerate(folders):
        ratios = [a / b for a, b in zip(speed[i], speed[0], strict=True)]
        rows.append({"onnx_dir": str(folder), "custom_op_nodes": models[i].manifest.get("custom_op_nodes", 0),
                     "decode_tokens_per_s": statistics.median(speed[i]), "block_tokens_per_s": speed[i],
                     "decode_speedup_vs_first": statistics.median(ratios),
                     "decode_speedup_range": [min(ratios), max(ratios)], "tokens": tokens[i].tolist(),
                     "model_bytes": _model_bytes(folder)})
    return {"interleaved_blocks": blocks, "prompt_len": prompt_len, "decode_tokens": decode_tokens,
            "threads": threads, "runs": rows}


def format_interleaved_table(results: dict) -> str:
    lines = [f"decode in {results['interleaved_blocks']} alternating blocks of {results['decode_tokens']} steps "
             f"(past {results['prompt_len']}); ratios paired per block",
             "| export | custom ops | decode tok/s (median) | decode vs first (median) | range over blocks | model MB |",
             "|---|---:|---:|---:|---|---:|"]
    for r in results["runs"]:
        lo, hi = r["decode_speedup_range"]
        lines.append(f"| {r['onnx_dir']} | {r['custom_op_nodes']} | {r['decode_tokens_per_s']:.1f} | "
                     f"{r['decode_speedup_vs_first']:.2f}x | {lo:.2f}-{hi:.2f}x | {r['model_bytes'] / 1e6:.1f} |")
    return "\n".join(lines)


def format_table(results: dict) -> str:
    lines = ["| export | custom ops | prefill ms | decode tok/s | decode vs first | prefill vs first | model MB |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results["runs"]:
        lines.append(f"| {r['onnx_dir']} | {r['custom_op_nodes']} | {r['prefill_ms']:.1f} | "
                     f"{r['decode_tokens_per_s']:.1f} | {r['decode_speedup_vs_first']:.2f}x | "
                     f"{r['prefill_speedup_vs_first']:.2f}x | {r['model_bytes'] / 1e6:.1f} |")
    return "\n".join(lines)
