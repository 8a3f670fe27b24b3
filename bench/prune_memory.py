"""Peak memory of pruning one wide linear's K experts: all K Hessians at once (fp64 sums, one
batched SparseGPT pass; what expansion did before 2026-11-27) against the chunked path the
expansion uses now (each expert's Hessian on demand, a memory budget's worth of experts per pass).
Each variant runs in its own process so that its peak RSS is its own. Synthetic activations and
clusters; prints a table and writes JSON.

    .venv/bin/python bench/prune_memory.py --in-features 4096 --out-features 1024 --experts 16
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from se_export.atomic import atomic_write_text


def _inputs(tokens: int, in_features: int, experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    basis = torch.randn(64, in_features, generator=gen)
    x = torch.randn(tokens, 64, generator=gen) @ basis + 0.1 * torch.randn(tokens, in_features, generator=gen)
    labels = torch.randint(0, experts, (tokens,), generator=gen)
    return x, labels, torch.randn(1024, in_features, generator=gen) * 0.02


def run_variant(variant: str, tokens: int, in_features: int, out_features: int, experts: int) -> dict:
    from se_export.method import expand
    from se_export.method.sparsegpt import ClusterHessians, input_gram, sparsegpt_prune
    from se_export.method.sparsity import parse_sparsity

    x, labels, weight = _inputs(tokens, in_features, experts)
    weight = weight[:out_features]
    spec = parse_sparsity("0.5")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    gram = input_gram(x).double()
    if variant == "all-at-once":
        # the previous path: every expert's fp64 sum held at once, then their fp32 Hessians
        clusters = ClusterHessians(x, labels, experts, total=gram)
        order = clusters.expert_order()
        sums = torch.empty(experts, in_features, in_features, dtype=torch.float64)
        for k in order:
            sums[k] = clusters.sum64(k)
        scale = 2.0 / clusters.counts.clamp(min=1).double()
        result = sparsegpt_prune(weight, (sums * scale[:, None, None]).float(), spec)
        kept = float(result.keep.float().mean())
    else:
        cfg = expand.ExpandConfig(experts=experts)
        report: dict = {}
        _, keep = expand._prune_experts(weight, ClusterHessians(x, labels, experts, total=gram), spec, cfg,
                                        [(0, out_features)], report, lambda _name: None)
        kept = float(keep.float().mean())
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"variant": variant, "seconds": round(seconds, 2), "peak_rss_mb": round(peak, 1),
            "rss_before_mb": round(before, 1), "kept": round(kept, 4),
            "experts_per_pass": experts if variant == "all-at-once" else expand.experts_per_chunk(in_features, experts)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--in-features", type=int, default=4096)
    parser.add_argument("--out-features", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--variant", choices=["all-at-once", "chunked"], help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=Path("bench/results/prune_memory.json"))
    args = parser.parse_args()
    shape = (args.tokens, args.in_features, args.out_features, args.experts)
    if args.variant:  # child process: one variant, JSON on stdout
        print(json.dumps(run_variant(args.variant, *shape)))
        return
    rows = []
    for variant in ("all-at-once", "chunked"):
        cmd = [sys.executable, __file__, "--variant", variant, "--tokens", str(args.tokens), "--in-features",
               str(args.in_features), "--out-features", str(args.out_features), "--experts", str(args.experts)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            rows.append({"variant": variant, "error": done.stderr.strip().splitlines()[-1:] or [f"exit {done.returncode}"]})
        else:
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"| variant | experts per pass | seconds | peak RSS MB | kept | ({args.experts} experts, {args.out_features} x "
          f"{args.in_features}, {args.tokens} tokens)")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        if "error" in r:
            print(f"| {r['variant']} | - | - | failed: {r['error'][0]} | - |")
        else:
            print(f"| {r['variant']} | {r['experts_per_pass']} | {r['seconds']} | {r['peak_rss_mb']} | {r['kept']} |")
    atomic_write_text(args.out, json.dumps({"shape": dict(zip(("tokens", "in", "out", "experts"), shape, strict=True)),
                                            "threads": torch.get_num_threads(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
