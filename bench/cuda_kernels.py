"""Routed sparse CUDA kernels (plugins/cuda) vs dense cuBLAS (torch.mm), same GPU, same run.

For real LLM MLP shapes (in x out, and transposes), batches 1/16/128/512 and sparsity 50/70/90%,
it times the routed sparse layer (router + GEMV or grouped kernel, K experts, fp16 activations,
fp16 values or int8/int4 codes with the default group scales (--values), both storage formats)
and the dense fp16 layer, and reports time, achieved GB/s, the
speed-up and its share of the byte-ratio limit (dense bytes / bytes the batch's experts hold), and
the router's share of the layer (routed call minus the same call with the routing given).

How it times, so the ratios mean what they say:
  * GPU time: a sequence of calls is captured once in a CUDA graph and replayed; the median over
    replays (CUDA events) divided by the calls. Launch gaps and the ctypes call stay out. The
    eager time per call (what a Python loop sees, host launch included) is reported beside it.
  * Cold L2: the sequence rotates over enough copies of the dense weight and of the packed
    experts (and, at batch 1, over the experts) that no call finds its weights in the L2 cache,
    as in a real model where every other layer's weights pass through it between two calls.
    Without this, one 4096x11008 expert at 70% (33 MB) sits in an H100's 50 MB L2 while the dense
    weight (90 MB) does not.
  * The experts are packed on the GPU by se_export.formats.sparse_format (the checkpoint's own packer).
  * Up to --gemv-sweep-max tokens it also times the path the default GEMV threshold does not
    take (GEMV vs grouped), the evidence for that threshold; and the taken path's variants kept
    for comparison beside the default, all with the routing given (GEMV_VARIANTS: scalar csr16
    loads; GROUPED_VARIANTS: none at present).

Prints a Markdown table and writes JSON (after every shape, atomically); without a GPU it says
so and exits 0.

    .venv/bin/python bench/cuda_kernels.py                        # full grid
    .venv/bin/python bench/cuda_kernels.py --shapes 4096x11008 --batches 1 --sparsities 0.7
    .venv/bin/python bench/cuda_kernels.py --values fp16 int8 int4 --out bench/results/cuda_quant.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from se_export.atomic import atomic_write_text
from se_export.formats.quantization import DEFAULT_GROUP_SIZE, QuantSpec, round_to_nearest
from se_export.formats.sparse_format import PackedExperts, pack_experts

SHAPES = ["576x1536", "1536x576", "2048x8192", "8192x2048", "4096x11008", "11008x4096"]
COLD_FACTOR = 3  # rotate over at least this many L2 capacities of weights
# The variants kept for comparison (environment the kernels read per call): the GEMV's, per
# format, and the grouped kernel's (none at present: comparisons on an H100 chose its design and
# the losing variants were deleted)
GEMV_VARIANTS = {"bitmap": {}, "csr16": {"scalar": {"SE_CUDA_GEMV_VECTORS": "0"}}}
GROUPED_VARIANTS: dict[str, dict[str, str]] = {}
KERNELS_HEADER = Path(__file__).resolve().parent.parent / "plugins" / "cuda" / "se_cuda_kernels.h"


def default_gemv_max_tokens() -> int:
    """SE_CUDA_DEFAULT_GEMV_MAX_TOKENS, read from the kernels' header: batches up to it run the GEMV."""
    found = re.search(r"#define SE_CUDA_DEFAULT_GEMV_MAX_TOKENS (\d+)", KERNELS_HEADER.read_text())
    if found is None:
        raise SystemExit(f"SE_CUDA_DEFAULT_GEMV_MAX_TOKENS is not defined in {KERNELS_HEADER}")
    return int(found.group(1))


def graph_ms(calls: list[Callable[[], object]], replays: int = 10) -> tuple[float, str]:
    """Median GPU milliseconds per call of the sequence, captured in a CUDA graph (eager if the
    capture fails, which the returned mode says)."""
    for fn in calls:  # warm-up: sizes workspaces, loads modules, outside the capture
        fn()
    torch.cuda.synchronize()
    mode = "graph"
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for fn in calls:
                fn()
        run = graph.replay
    except RuntimeError:
        torch.cuda.synchronize()
        mode = "eager"

        def run() -> None:
            for fn in calls:
                fn()
    run()
    times = []
    for _ in range(replays):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) / len(calls))
    return statistics.median(times), mode


def eager_ms(calls: list[Callable[[], object]], replays: int = 5) -> float:
    """Median milliseconds per call of a plain Python loop over the sequence (host launch included)."""
    times = []
    for _ in range(replays):
        torch.cuda.synchronize()
        t = time.perf_counter()
        for fn in calls:
            fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e3 / len(calls))
    return statistics.median(times)


def copy_bandwidth_gbps(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy (bytes read + written over time): the memory ceiling of this card."""
    a = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms, _ = graph_ms([lambda: b.copy_(a)], replays=10)
    return 2 * nbytes / ms / 1e6


def make_experts(k: int, out: int, inn: int, sparsity: float, fmt: str, seed: int,
                 values: str = "fp16") -> PackedExperts:
    """Random experts at ``sparsity`` with fp16 values, or int8/int4 codes rounded to the grid of
    the dtype's default group size."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    dense = torch.randn(k, out, inn, generator=gen, device="cuda", dtype=torch.float16)
    mask = torch.rand(k, out, inn, generator=gen, device="cuda") >= sparsity
    if values == "fp16":
        return pack_experts(dense * mask, mask, fmt, torch.float16)
    spec = QuantSpec(int(values[3:]), min(inn, DEFAULT_GROUP_SIZE[values]))
    dequantized, scales = round_to_nearest(dense.float() * mask, mask, spec)
    return pack_experts(dequantized, mask, fmt, torch.int8, spec, scales)


def device_bytes(packed: PackedExperts) -> int:
    """Bytes the kernels read of these experts: int4 codes two per byte, plus index, row pointers, scales."""
    value_bytes = (packed.nnz * packed.quant.bits + 7) // 8 if packed.quant is not None else packed.values.nbytes
    return packed.nbytes() - packed.values.nbytes + value_bytes


def call_sequences(sets: list, weights: list[torch.Tensor], xs: list[torch.Tensor], given: list[torch.Tensor],
                   y: torch.Tensor, n: int, per_set: int, gemv_max: int = 0) -> tuple[list, list, list]:
    """``n`` calls each of the routed layer, the layer with the routing given (call ``i`` uses
    expert set ``i // per_set`` and ids ``given[i]``, cyclically) and the dense layer; ``gemv_max``
    is the routed calls' GEMV threshold (0: the kernels' default)."""
    routed = [lambda i=i: sets[i % len(sets)].matmul(xs[i % len(xs)], out=y, gemv_max_tokens=gemv_max)
              for i in range(n)]
    with_ids = [lambda i=i: sets[(i // per_set) % len(sets)].matmul(xs[i % len(xs)], given[i % len(given)], out=y)
                for i in range(n)]
    dense = [lambda i=i: torch.mm(xs[i % len(xs)], weights[i % len(weights)].t(), out=y) for i in range(n)]
    return routed, with_ids, dense


def bench_shape(shape: str, args, l2_bytes: int, rows: list[dict]) -> None:
    from se_export.backends.cuda_kernels import CudaExperts

    inn, out = map(int, shape.split("x"))
    k = args.experts
    gemv_max = default_gemv_max_tokens()
    w_bytes = out * inn * 2
    dense_copies = max(1, math.ceil(COLD_FACTOR * l2_bytes / w_bytes))
    weights = [torch.randn(out, inn, device="cuda", dtype=torch.float16) for _ in range(dense_copies)]
    gen = torch.Generator().manual_seed(0)
    g, b = torch.randn(inn, k, generator=gen), torch.randn(k, generator=gen)
    for s, fmt, values in itertools.product(args.sparsities, args.formats, args.values):
        packed = make_experts(k, out, inn, s, fmt, seed=inn + out, values=values)
        total = device_bytes(packed)
        sets = [CudaExperts(p, g, b) for p in
                [packed, *(packed.clone() for _ in range(math.ceil(COLD_FACTOR * l2_bytes / total) - 1))]]
        per_expert = total / k
        for batch in args.batches:
            xs = [torch.randn(batch, inn, device="cuda", dtype=torch.float16) for _ in range(args.inputs)]
            ys = torch.empty(batch, out, device="cuda", dtype=torch.float16)
            routed = [sets[0].matmul(x)[1] for x in xs]
            touched_experts = statistics.mean(len(torch.unique(r)) for r in routed)
            if batch == 1:  # rotate the expert too: one expert of a big layer fits in L2
                given = [torch.full((1,), i % k, dtype=torch.int32, device="cuda") for i in range(k)]
                n = max(len(sets) * k, dense_copies, args.min_calls)
            else:
                given = routed
                n = max(len(sets), dense_copies, args.min_calls)
            sparse_routed, sparse_given, dense = call_sequences(sets, weights, xs, given, ys, n, k if batch == 1 else 1)
            sparse_ms, mode_s = graph_ms(sparse_routed)
            if 1 < batch <= args.gemv_sweep_max:  # the other path, for the GEMV threshold's choice
                forced = 1 if batch <= gemv_max else 1_000_000
                other_ms, _ = graph_ms(call_sequences(sets, weights, xs, given, ys, n, 1, forced)[0])
            else:
                other_ms = None
            given_ms, _ = graph_ms(sparse_given)
            variants_ms = {}  # the taken path's variants kept for comparison, same routing
            for name, env in (GEMV_VARIANTS[fmt] if batch <= gemv_max else GROUPED_VARIANTS).items():
                os.environ.update(env)
                try:
                    variants_ms[name], _ = graph_ms(sparse_given)
                finally:
                    for key in env:
                        del os.environ[key]
            dense_ms, mode_d = graph_ms(dense)
            eager_sparse, eager_dense = eager_ms(sparse_routed), eager_ms(dense)
            act = batch * (inn + out) * 2
            touched = touched_experts * per_expert
            row = {"shape": shape, "batch": batch, "sparsity": s, "format": fmt, "values": values, "experts": k,
                   "sparse_ms": sparse_ms, "sparse_given_ids_ms": given_ms, "dense_ms": dense_ms,
                   "speedup": dense_ms / sparse_ms, "byte_ratio_limit": (w_bytes + act) / (touched + act),
                   "router_share": max(0.0, 1 - given_ms / sparse_ms),
                   "sparse_gbps": (touched + act) / sparse_ms / 1e6, "dense_gbps": (w_bytes + act) / dense_ms / 1e6,
                   "eager_sparse_ms": eager_sparse, "eager_dense_ms": eager_dense,
                   "eager_speedup": eager_dense / eager_sparse, "timing": f"{mode_s}/{mode_d}",
                   "calls_per_sequence": n, "dense_copies": dense_copies, "expert_copies": len(sets),
                   "touched_experts": touched_experts,
                   "path": "gemv" if batch <= gemv_max else "grouped", "other_path_ms": other_ms,
                   "variants_given_ids_ms": variants_ms}
            rows.append(row)
            print(f"| {shape} | {batch} | {s:.0%} | {fmt} | {values} | {sparse_ms * 1e3:.1f} | {dense_ms * 1e3:.1f} | "
                  f"{row['speedup']:.2f}x | {row['speedup'] / row['byte_ratio_limit']:.0%} | "
                  f"{row['router_share']:.0%} | {row['sparse_gbps']:.0f} | {row['dense_gbps']:.0f} | "
                  f"{row['eager_speedup']:.2f}x | {'-' if other_ms is None else f'{other_ms * 1e3:.1f}'} | "
                  f"{given_ms * 1e3:.1f} | {', '.join(f'{k} {v * 1e3:.1f}' for k, v in variants_ms.items()) or '-'} |",
                  flush=True)
        sets.clear()
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=SHAPES)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16, 128, 512])
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.5, 0.7, 0.9])
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--formats", nargs="+", default=["bitmap", "csr16"])
    parser.add_argument("--values", nargs="+", default=["fp16"], choices=["fp16", "int8", "int4"],
                        help="expert values: fp16, or int8/int4 codes with fp16 group scales")
    parser.add_argument("--inputs", type=int, default=8, help="distinct activation sets the sequence rotates over")
    parser.add_argument("--min-calls", type=int, default=32, help="calls per captured sequence, at least")
    parser.add_argument("--gemv-sweep-max", type=int, default=16,
                        help="up to this batch, also time the path the default threshold does not take")
    parser.add_argument("--out", type=Path, default=Path("bench/results/cuda_kernels.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU: skipping the CUDA kernel benchmark (run it where one is present)")
        return
    props = torch.cuda.get_device_properties(0)
    l2_bytes = props.L2_cache_size
    copy_gbps = copy_bandwidth_gbps()
    meta = {"device": props.name, "torch": torch.__version__, "cuda": torch.version.cuda, "l2_bytes": l2_bytes,
            "sms": props.multi_processor_count, "copy_gbps": copy_gbps, "experts": args.experts}
    print(f"GPU: {props.name}, {props.multi_processor_count} SMs, L2 {l2_bytes / 2**20:.0f} MiB, "
          f"device copy {copy_gbps:.0f} GB/s; K={args.experts}, fp16 activations, GPU time "
          "(CUDA graph replays, cold L2)\n")
    print("| in x out | batch | sparsity | format | values | sparse µs | dense µs | speed-up | of byte limit | router | "
          "sparse GB/s | dense GB/s | eager speed-up | other path µs | ids given µs | ids given, variants µs |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows: list[dict] = []
    for shape in args.shapes:
        bench_shape(shape, args, l2_bytes, rows)
        atomic_write_text(args.out, json.dumps({**meta, "rows": rows}, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
