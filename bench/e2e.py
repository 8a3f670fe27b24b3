"""End to end, batch 1: prefill latency and decode tokens/s of dense vs expanded models, in PyTorch
(eager, RoutedSparseLinear on the C++ kernels) and in ONNX Runtime (CPU, custom op), plus the
peak RSS of each (every run is its own subprocess) and the bytes of each checkpoint/export.
Targets run in turn, round after round; each ratio to the baseline is taken within a round.

    .venv/bin/python bench/e2e.py --torch default out/demo-ckpt out/ckpt-se16-70 \\
        --ort out/onnx-dense out/onnx-se out/onnx-se70
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def _torch_run(model_spec: str, prompt_len: int, decode_tokens: int, repeats: int) -> dict:
    import torch

    from se_export.export.onnx_export import cache_argument, returned_cache
    from se_export.models import load_model

    torch.set_grad_enabled(False)
    loaded = load_model(model_spec)
    model = loaded.model.eval()
    arg = cache_argument(model)
    ids = torch.from_numpy(np.random.default_rng(0).integers(0, model.config.vocab_size, size=(1, prompt_len)))

    def prefill():
        from transformers import DynamicCache

        out = model(input_ids=ids, use_cache=True, **{arg: DynamicCache(config=model.config)})
        return out.logits, returned_cache(out)

    prefill()  # warm-up
    pre, dec = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        logits, cache = prefill()
        pre.append(time.perf_counter() - t)
        token = logits[:, -1:].argmax(-1)
        t = time.perf_counter()
        for _ in range(decode_tokens):
            out = model(input_ids=token, use_cache=True, **{arg: cache})
            cache = returned_cache(out)
            token = out.logits[:, -1:].argmax(-1)
        dec.append(decode_tokens / (time.perf_counter() - t))
    path = Path(model_spec)
    size = sum(f.stat().st_size for f in path.glob("*.safetensors")) if path.is_dir() else 0
    return {"prefill_ms": statistics.median(pre) * 1e3, "decode_tokens_per_s": statistics.median(dec),
            "weights_bytes": size or sum(p.numel() * p.element_size() for p in model.state_dict().values())}


def _ort_run(folder: str, prompt_len: int, decode_tokens: int, repeats: int) -> dict:
    from se_export.eval.bench_ort import bench_one, ort_loader

    r = bench_one(Path(folder), prompt_len, decode_tokens, repeats, ort_loader(0))
    return {"prefill_ms": r["prefill_ms"], "decode_tokens_per_s": r["decode_tokens_per_s"],
            "weights_bytes": r["model_bytes"]}


def child(args) -> None:
    fn = _torch_run if args.child == "torch" else _ort_run
    result = fn(args.target, args.prompt_len, args.decode_tokens, args.repeats)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result))


def run_child(backend: str, target: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", backend, "--target", target, "--prompt-len", str(args.prompt_len),
           "--decode-tokens", str(args.decode_tokens), "--repeats", str(args.repeats)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"{backend} {target} failed:\n{proc.stderr[-2000:]}")
    return {"backend": backend, "model": target, **json.loads(line[7:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--torch", nargs="*", default=[], help="models/checkpoints (first = baseline)")
    parser.add_argument("--ort", nargs="*", default=[], help="se-export onnx folders (first = baseline)")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="prefill + decode repeats per process (median)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over all targets; ratios per round, median")
    parser.add_argument("--out", type=Path, default=Path("bench/results/e2e.json"))
    parser.add_argument("--child", choices=["torch", "ort"], help=argparse.SUPPRESS)
    parser.add_argument("--target", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    rows = []
    for backend, targets in (("torch", args.torch), ("ort", args.ort)):
        # every round runs each target once, in turn; ratios are taken within a round and their
        # median quoted: this VM's speed drifts by tens of percent between minutes, so timings
        # of the baseline and an expanded model from different minutes are not comparable
        runs: dict[str, list[dict]] = {t: [] for t in targets}
        for rnd in range(args.rounds):
            base = None
            for target in targets:
                row = run_child(backend, target, args)
                base = base or row
                row["decode_vs_first"] = row["decode_tokens_per_s"] / base["decode_tokens_per_s"]
                row["prefill_vs_first"] = base["prefill_ms"] / row["prefill_ms"]
                runs[target].append(row)
                print(f"round {rnd + 1}/{args.rounds} {backend:5s} {target:28s} prefill {row['prefill_ms']:8.1f} ms  "
                      f"decode {row['decode_tokens_per_s']:6.1f} tok/s ({row['decode_vs_first']:.2f}x)  "
                      f"peak RSS {row['peak_rss_mb']:.0f} MB", flush=True)
        for target in targets:
            rs = runs[target]
            row = {"backend": backend, "model": target, "rounds": rs, "weights_bytes": rs[0]["weights_bytes"],
                   "peak_rss_mb": max(r["peak_rss_mb"] for r in rs)}
            for key in ("prefill_ms", "decode_tokens_per_s", "decode_vs_first", "prefill_vs_first"):
                row[key] = statistics.median(r[key] for r in rs)
            row["decode_vs_first_range"] = [min(r["decode_vs_first"] for r in rs), max(r["decode_vs_first"] for r in rs)]
            rows.append(row)
    lines = ["| backend | model | prefill ms | prefill vs first | decode tok/s | decode vs first (range) | peak RSS MB "
             "| weights MB |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lo, hi = r["decode_vs_first_range"]
        lines.append(f"| {r['backend']} | {r['model']} | {r['prefill_ms']:.1f} | {r['prefill_vs_first']:.2f}x | "
                     f"{r['decode_tokens_per_s']:.1f} | {r['decode_vs_first']:.2f}x ({lo:.2f}-{hi:.2f}) | "
                     f"{r['peak_rss_mb']:.0f} | {r['weights_bytes'] / 1e6:.0f} |")
    print("\n".join(lines))
    from se_export.atomic import atomic_write_text

    atomic_write_text(args.out, json.dumps({"prompt_len": args.prompt_len, "decode_tokens": args.decode_tokens,
                                            "rounds": args.rounds, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
