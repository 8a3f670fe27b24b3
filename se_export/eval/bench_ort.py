"""``se-export bench ort`` / ``bench trt``: prefill latency and decode tokens/s of exports in ONNX
Runtime (CPU), or of TensorRT engines, through the same step-model interface.

All targets run in one process, one after another, on the same prompt, so their numbers compare.
Decode is timed step by step with the KV cache after a prefill of ``prompt_len`` tokens; with
``--interleave N`` the exports take turns in N decode blocks each, so every ratio pairs timings
taken seconds apart (``bench_interleaved``).
"""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..backends.ort_runtime import OrtCausalLM, StepModel

# opens one target (an export folder, an engine): the step model and what the result rows say of it
Loader = Callable[[Path], tuple[StepModel, dict]]


def ort_loader(threads: int = 0, provider: str = "cpu") -> Loader:
    """Export folders in ONNX Runtime (``provider``: cpu, or cuda with onnxruntime-gpu)."""
    def load(folder: Path) -> tuple[StepModel, dict]:
        return OrtCausalLM(folder, threads=threads, provider=provider), {
            "onnx_dir": str(folder), "provider": provider, "model_bytes": _model_bytes(folder)}
    return load


def trt_loader(plugin: Path | None = None) -> Loader:
    """TensorRT engines of ``se-export trt`` (the export folder is the engine's, or the one its
    build record names)."""
    def load(engine: Path) -> tuple[StepModel, dict]:
        from ..backends.trt_build import read_engine_info
        from ..backends.trt_runtime import TrtCausalLM
        from ..errors import SEError

        engine = Path(engine)
        if not engine.is_file():
            raise SEError(f"no engine at {engine}: build one with se-export trt ONNX_DIR --out {engine}")
        trt_onnx = read_engine_info(engine).get("trt_onnx")
        folder = Path(trt_onnx).parent if trt_onnx else engine.parent
        return TrtCausalLM(folder, engine, plugin), {"engine": str(engine), "onnx_dir": str(folder),
                                                     "model_bytes": engine.stat().st_size}
    return load


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


def bench_one(target: Path, prompt_len: int, decode_tokens: int, repeats: int, load: Loader) -> dict:
    rss0 = _rss_mb()
    t0 = time.perf_counter()
    lm, described = load(Path(target))
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
    return {**described, "dtype": m["dtype"], "portable": m["portable"],
            "custom_op_nodes": m.get("custom_op_nodes", 0), "prompt_len": prompt_len, "decode_tokens": decode_tokens,
            "prefill_ms": statistics.median(prefill) * 1e3, "decode_tokens_per_s": statistics.median(decode),
            "session_load_s": round(load_s, 2), "rss_growth_mb": round(_rss_mb() - rss0, 1)}


def bench_ort(folders: list[Path], prompt_len: int = 128, decode_tokens: int = 32, repeats: int = 3,
              threads: int = 0, load: Loader | None = None) -> dict:
    """Every target in turn; ratios against the first. ``load`` defaults to ONNX Runtime."""
    load = load or ort_loader(threads)
    rows = [bench_one(Path(f), prompt_len, decode_tokens, repeats, load) for f in folders]
    base = rows[0]
    for r in rows:
        r["decode_speedup_vs_first"] = r["decode_tokens_per_s"] / base["decode_tokens_per_s"]
        r["prefill_speedup_vs_first"] = base["prefill_ms"] / r["prefill_ms"]
    return {"runs": rows, "threads": threads}


def bench_interleaved(folders: list[Path], prompt_len: int = 128, decode_tokens: int = 32, blocks: int = 8,
                      threads: int = 0, load: Loader | None = None) -> dict:
    """Decode tokens/s of every export, timed in alternating blocks (A, B, A, B, ...).

    Why: a shared VM's speed drifts by tens of percent between minutes, so a ratio of two exports
    is only fair between timings taken seconds apart; each block's ratio to the first export is
    paired in time, and their median is quoted. Every block restarts from the same prefill cache,
    so all blocks time the same steps (and decode the same tokens, which the result keeps).
    """
    if blocks < 1 or decode_tokens < 1:
        raise ValueError("interleaved timing needs at least one block of at least one decode step")
    opened = [(load or ort_loader(threads))(Path(f)) for f in folders]
    models = [lm for lm, _ in opened]
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
    for i, (_, described) in enumerate(opened):
        ratios = [a / b for a, b in zip(speed[i], speed[0], strict=True)]
        rows.append({**described, "custom_op_nodes": models[i].manifest.get("custom_op_nodes", 0),
                     "decode_tokens_per_s": statistics.median(speed[i]), "block_tokens_per_s": speed[i],
                     "decode_speedup_vs_first": statistics.median(ratios),
                     "decode_speedup_range": [min(ratios), max(ratios)], "tokens": tokens[i].tolist()})
    return {"interleaved_blocks": blocks, "prompt_len": prompt_len, "decode_tokens": decode_tokens,
            "threads": threads, "runs": rows}


def format_interleaved_table(results: dict) -> str:
    lines = [f"decode in {results['interleaved_blocks']} alternating blocks of {results['decode_tokens']} steps "
             f"(past {results['prompt_len']}); ratios paired per block",
             "| target | custom ops | decode tok/s (median) | decode vs first (median) | range over blocks | model MB |",
             "|---|---:|---:|---:|---|---:|"]
    for r in results["runs"]:
        lo, hi = r["decode_speedup_range"]
        lines.append(f"| {r.get('engine', r['onnx_dir'])} | {r['custom_op_nodes']} | {r['decode_tokens_per_s']:.1f} | "
                     f"{r['decode_speedup_vs_first']:.2f}x | {lo:.2f}-{hi:.2f}x | {r['model_bytes'] / 1e6:.1f} |")
    return "\n".join(lines)


def format_table(results: dict) -> str:
    lines = ["| target | custom ops | prefill ms | decode tok/s | decode vs first | prefill vs first | model MB |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results["runs"]:
        lines.append(f"| {r.get('engine', r['onnx_dir'])} | {r['custom_op_nodes']} | {r['prefill_ms']:.1f} | "
                     f"{r['decode_tokens_per_s']:.1f} | {r['decode_speedup_vs_first']:.2f}x | "
                     f"{r['prefill_speedup_vs_first']:.2f}x | {r['model_bytes'] / 1e6:.1f} |")
    return "\n".join(lines)
