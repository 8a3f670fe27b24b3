"""Routed sparse CUDA kernels (plugins/cuda) vs dense cuBLAS (torch.matmul), same GPU, same run.

For real LLM MLP shapes (in x out, and transposes), batch 1/16/128 and sparsity 50/70/90%, it
times the routed sparse layer (router + GEMV or grouped kernel, K experts, fp16 activations and
values) and the dense fp16 layer, with CUDA events (median of repeats after warm-up), and reports
time, achieved GB/s (bytes of the experts the batch touches + activations, over time) and the
speed-up. Prints a Markdown table and writes JSON; without a GPU it says so and exits 0.

    .venv/bin/python bench/cuda_kernels.py                        # full grid
    .venv/bin/python bench/cuda_kernels.py --shapes 4096x11008 --batches 1 --sparsities 0.7
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from se_export.atomic import atomic_write_text
from se_export.sparse_format import pack_experts

SHAPES = ["576x1536", "1536x576", "2048x8192", "8192x2048", "4096x11008", "11008x4096"]


def cuda_time_ms(fn, warmup: int = 5, repeats: int = 30) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def make_experts(k: int, out: int, inn: int, sparsity: float, fmt: str, seed: int):
    gen = torch.Generator().manual_seed(seed)
    dense = torch.randn(k, out, inn, generator=gen, dtype=torch.float16)
    mask = torch.rand(k, out, inn, generator=gen) >= sparsity
    return pack_experts(dense.float() * mask, mask, fmt, torch.float16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=SHAPES)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16, 128])
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.5, 0.7, 0.9])
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--formats", nargs="+", default=["bitmap", "csr16"])
    parser.add_argument("--out", type=Path, default=Path("bench/results/cuda_kernels.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU: skipping the CUDA kernel benchmark (run it where one is present)")
        return
    from se_export.cuda_kernels import CudaExperts

    device = torch.cuda.get_device_name()
    rows = []
    print(f"GPU: {device}, K={args.experts}, fp16 activations and values\n")
    print("| in x out | batch | sparsity | format | sparse ms | dense ms | speed-up | sparse GB/s | dense GB/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for shape in args.shapes:
        inn, out = map(int, shape.split("x"))
        w = torch.randn(out, inn, device="cuda", dtype=torch.float16)
        for s in args.sparsities:
            for fmt in args.formats:
                packed = make_experts(args.experts, out, inn, s, fmt, seed=inn + out)
                gen = torch.Generator().manual_seed(0)
                g, b = torch.randn(inn, args.experts, generator=gen), torch.randn(args.experts, generator=gen)
                experts = CudaExperts(packed, g, b)
                per_expert = packed.nbytes() / args.experts
                for batch in args.batches:
                    x = torch.randn(batch, inn, device="cuda", dtype=torch.float16)
                    y = torch.empty(batch, out, device="cuda", dtype=torch.float16)
                    sparse_ms = cuda_time_ms(lambda x=x, y=y, e=experts: e.matmul(x, out=y))
                    dense_ms = cuda_time_ms(lambda x=x, w=w: torch.matmul(x, w.t()))
                    act = batch * (inn + out) * 2
                    touched = min(batch, args.experts) * per_expert
                    row = {"shape": shape, "batch": batch, "sparsity": s, "format": fmt, "experts": args.experts,
                           "sparse_ms": sparse_ms, "dense_ms": dense_ms, "speedup": dense_ms / sparse_ms,
                           "sparse_gbps": (touched + act) / sparse_ms / 1e6,
                           "dense_gbps": (out * inn * 2 + act) / dense_ms / 1e6}
                    rows.append(row)
                    print(f"| {shape} | {batch} | {s:.0%} | {fmt} | {sparse_ms:.4f} | {dense_ms:.4f} | "
                          f"{row['speedup']:.2f}x | {row['sparse_gbps']:.0f} | {row['dense_gbps']:.0f} |", flush=True)
    atomic_write_text(args.out, json.dumps({"device": device, "torch": torch.__version__, "rows": rows}, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
