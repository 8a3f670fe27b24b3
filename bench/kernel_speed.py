"""Routed sparse CPU kernel (plugins/cpu) vs dense torch.matmul, same machine, same run, same threads.

For every weight shape (real LLM MLP shapes and their transposes), batch, sparsity and stored
value precision, it times the routed sparse layer (both storage formats; the faster one is what
``--format auto`` should pick) and the dense layer at the same precision, and reports time,
achieved GB/s, speedup, and the speedup as a fraction of the byte-ratio limit
(dense bytes / sparse bytes: what a purely memory-bound kernel would gain). Router time (K=16)
is reported as a share of the layer. From the library's dense-group batch on, where the expert
keeps at least its dense-group density (``kernels.dense_group_policy()``), it also times the PyTorch binding's
prefill path (the expert decoded once per call, then torch's GEMM): "dense groups". Every
function rotates through copies of its weights, so that each call reads them from DRAM as in a
real model's decode step (``--warm``: one copy). Prints a Markdown table and writes JSON.

    .venv/bin/python bench/kernel_speed.py                       # full grid (~12 min on 2 cores)
    .venv/bin/python bench/kernel_speed.py --shapes 4096x11008 --batches 1 512
    .venv/bin/python bench/kernel_speed.py --quant --shapes 4096x11008 576x1536 1536x576 --batches 1 512 \
        --sparsities 0.5 0.7 --out bench/results/kernels_quant.json

The byte-ratio limit is the dense bytes over the bytes of the expert's *smallest* format (values,
index, row pointers and scales), whichever format ran faster. ``--quant`` times the same expert
with int8 and int4 values (default group sizes) against its fp16-valued self and against the
dense fp32 layer, all in one interleaved run, and quotes the speedup over the fp16 expert as a
fraction of their byte ratio (smallest format of each).
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from se_export.atomic import atomic_write_text
from se_export.backends import kernels
from se_export.formats.quantization import DEFAULT_GROUP_SIZE, QuantSpec, round_to_nearest
from se_export.formats.sparse_format import pack_experts
from se_export.method.sparsity import parse_sparsity

SHAPES = ["576x1536", "1536x576", "2048x8192", "8192x2048", "4096x11008", "11008x4096"]  # in x out
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def timeit(fn, min_time: float = 0.3, max_reps: int = 50) -> float:
    """Median seconds per call after one warm-up; repeats until ``min_time`` or ``max_reps``."""
    return statistics.median(time_rounds({"f": fn}, min_time, max_reps)["f"])


def time_rounds(fns: dict, min_time: float = 0.3, max_rounds: int = 50) -> dict[str, list[float]]:
    """Seconds per call of every function, called in turn round after round (one warm-up each).

    Interleaving puts the baseline and the kernels under the same machine conditions: on a
    shared VM, memory bandwidth drifts by tens of percent between seconds, which separate timing
    loops turned into ratios that moved 1.4x-2.9x between runs."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    rounds = 0
    while rounds < 5 or (time.perf_counter() - start < min_time * len(fns) and rounds < max_rounds):
        rounds += 1
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return times


def last_level_cache_bytes() -> int:
    """The largest CPU cache's size (sysfs), 512 MiB where it cannot be read."""
    sizes = []
    for entry in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = entry.read_text().strip().upper()
        unit = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        if text.rstrip("KMG").isdigit():
            sizes.append(int(text.rstrip("KMG")) * unit)
    return max(sizes, default=512 * 2**20)


def copies_for_cold(round_bytes: int, budget: int = 3 * 2**30) -> int:
    """Copies of every weight to rotate through so that each call's weights were last read two
    last-level caches ago (at most ``budget`` bytes in all).

    Why: a real model's decode step reads every layer's weights from DRAM. With one copy, this
    Xeon's 480 MiB L3 kept part of a 4096 x 11008 expert between rounds (a round of dense, bitmap
    and csr16 weights is 312 MB), and more of it for the kernel that streams faster: 70% batch 1
    measured 3.1-3.5x with one copy against 2.4-2.8x fully cold."""
    return max(1, min(-(-2 * last_level_cache_bytes() // max(round_bytes, 1)), budget // max(round_bytes, 1)))


def sparse_mask(out: int, inn: int, sparsity: str, gen: torch.Generator) -> torch.Tensor:
    spec = parse_sparsity(sparsity)
    if spec.structured:  # N:M along the input dimension
        scores = torch.rand(out, inn // spec.group_m, spec.group_m, generator=gen)
        drop = scores.argsort(-1)[..., : spec.prune_n]
        return torch.ones_like(scores, dtype=torch.bool).scatter(-1, drop, False).reshape(out, inn)
    keep = round(out * inn * (1 - spec.fraction))
    mask = torch.zeros(out * inn, dtype=torch.bool)
    mask[torch.randperm(out * inn, generator=gen)[:keep]] = True
    return mask.reshape(out, inn)


def bench_shape(inn: int, out: int, batches: list[int], sparsities: list[str], dtypes: list[str], threads: int,
                router_experts: int, cold: bool = True) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    weight32 = torch.randn(out, inn, generator=gen)
    rows = []
    for sparsity in sparsities:
        mask = sparse_mask(out, inn, sparsity, gen)
        for dname in dtypes:
            dtype = DTYPES[dname]
            dense_w = weight32.to(dtype)
            # the kernel alone (no decoded dense groups), and the PyTorch binding's prefill path
            bound = {fmt: kernels.BoundExperts(pack_experts((weight32 * mask)[None], mask[None], fmt, dtype),
                                               dense_group_tokens=0) for fmt in ("bitmap", "csr16")}
            with_groups = kernels.BoundExperts(bound["bitmap"].packed)
            # every function rotates through its own copies of the weights (see copies_for_cold)
            round_bytes = dense_w.numel() * dense_w.element_size() + sum(b.packed.nbytes() for b in bound.values())
            n_copies = copies_for_cold(round_bytes) if cold else 1
            dense_ws = [dense_w] + [dense_w.clone() for _ in range(n_copies - 1)]
            copies = {fmt: [bd] + [kernels.BoundExperts(bd.packed.clone(), dense_group_tokens=0)
                                   for _ in range(n_copies - 1)] for fmt, bd in bound.items()}
            grouped_copies = [with_groups] + [kernels.BoundExperts(c.packed) for c in copies["bitmap"][1:]]
            g1, b1 = torch.zeros(inn, 1), torch.zeros(1)
            for batch in batches:
                x = torch.randn(batch, inn, generator=gen)
                xd = x.to(dtype)
                ws = itertools.cycle(dense_ws)
                fns = {"dense": lambda xd=xd, ws=ws: torch.matmul(xd, next(ws).t())}
                for fmt in bound:
                    fns[fmt] = lambda x=x, bs=itertools.cycle(copies[fmt]), g1=g1, b1=b1: next(bs).matmul(
                        x, g1, b1, threads=threads)
                grouped = batch >= with_groups.dense_group_tokens and bool(with_groups.dense_candidates)
                if grouped:
                    fns["dense_groups"] = lambda x=x, gs=itertools.cycle(grouped_copies), g1=g1, b1=b1: next(gs).matmul(
                        x, g1, b1, threads=threads)
                times = time_rounds(fns)
                t_dense = statistics.median(times["dense"])
                dense_bytes = out * inn * dense_w.element_size() + batch * (inn + out) * dense_w.element_size()
                row = {"in": inn, "out": out, "batch": batch, "sparsity": sparsity, "values": dname,
                       "weight_copies": n_copies, "dense_ms": t_dense * 1e3, "dense_gbps": dense_bytes / t_dense / 1e9, "rounds": len(times["dense"])}
                for fmt, bd in bound.items():
                    t = statistics.median(times[fmt])
                    nbytes = bd.packed.nbytes() + batch * (inn + out) * 4
                    row[f"{fmt}_ms"] = t * 1e3
                    row[f"{fmt}_gbps"] = nbytes / t / 1e9
                    row[f"{fmt}_bytes"] = bd.packed.nbytes()
                if grouped:  # decoded expert + torch GEMM for this one large group (bitmap storage)
                    row["dense_groups_ms"] = statistics.median(times["dense_groups"]) * 1e3
                    row["dense_groups_vs_dense"] = statistics.median(
                        g / d for g, d in zip(times["dense_groups"], times["dense"], strict=True))
                best = min(("bitmap", "csr16"), key=lambda f: row[f"{f}_ms"])
                row["best_format"] = best
                # median of the per-round ratios: each pair of calls ran under the same conditions
                row["speedup"] = statistics.median(d / s for d, s in zip(times["dense"], times[best], strict=True))
                # the limit of the expert's smallest format, whichever ran faster
                row["byte_ratio_limit"] = (out * inn * dense_w.element_size()) / min(
                    row["bitmap_bytes"], row["csr16_bytes"])
                row["fraction_of_limit"] = row["speedup"] / row["byte_ratio_limit"]
                if router_experts > 1:
                    g, b = torch.randn(inn, router_experts, generator=gen), torch.randn(router_experts, generator=gen)
                    t_route = timeit(lambda x=x, g=g, b=b: kernels.route(x, g, b, threads))
                    row["router_ms"] = t_route * 1e3
                    row["router_share"] = t_route / (t_route + row[f"{best}_ms"] / 1e3)
                rows.append(row)
                print(f"{inn}x{out} b={batch:4d} s={sparsity:4s} {dname}: dense {t_dense * 1e3:8.3f} ms, "
                      f"bitmap {row['bitmap_ms']:8.3f}, csr16 {row['csr16_ms']:8.3f} -> {row['speedup']:.2f}x "
                      f"({row['fraction_of_limit']:.0%} of the byte limit {row['byte_ratio_limit']:.2f}x)", flush=True)
    return rows


def kernel_bytes(bound: kernels.BoundExperts) -> int:
    """Bytes a call streams of these experts as the library holds them: values (int4: two per
    byte), index, row pointers, scales."""
    return sum(t.numel() * t.element_size() for t in (bound.values, bound.indices, bound.row_ptr, bound.scales)
               if t is not None)


def quantized(weight: torch.Tensor, mask: torch.Tensor, fmt: str, bits: int) -> kernels.BoundExperts:
    """The expert with int8/int4 values rounded to a grid fitted to ``weight`` (the dtype's default group)."""
    spec = QuantSpec(bits, DEFAULT_GROUP_SIZE[f"int{bits}"])
    dequantized, scales = round_to_nearest((weight * mask)[None], mask[None], spec)
    return kernels.BoundExperts(pack_experts(dequantized, mask[None], fmt, torch.int8, spec, scales),
                                dense_group_tokens=0)


def bench_quant_shape(inn: int, out: int, batches: list[int], sparsities: list[str], threads: int,
                      cold: bool = True) -> list[dict]:
    """int8 / int4 experts against the same expert with fp16 values and against dense fp32, one run."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(out, inn, generator=gen)
    rows = []
    for sparsity in sparsities:
        mask = sparse_mask(out, inn, sparsity, gen)
        variants = {"fp16": {fmt: kernels.BoundExperts(pack_experts((weight * mask)[None], mask[None], fmt, torch.float16),
                                                       dense_group_tokens=0) for fmt in ("bitmap", "csr16")}}
        for bits in (8, 4):
            variants[f"int{bits}"] = {fmt: quantized(weight, mask, fmt, bits) for fmt in ("bitmap", "csr16")}
        round_bytes = out * inn * 4 + sum(kernel_bytes(b) for v in variants.values() for b in v.values())
        n_copies = copies_for_cold(round_bytes) if cold else 1
        dense_ws = [weight] + [weight.clone() for _ in range(n_copies - 1)]

        def copy(bound: kernels.BoundExperts) -> kernels.BoundExperts:
            return kernels.BoundExperts(bound.packed.clone(), dense_group_tokens=0)

        copies = {(v, fmt): [b] + [copy(b) for _ in range(n_copies - 1)]
                  for v, fmts in variants.items() for fmt, b in fmts.items()}
        g1, b1 = torch.zeros(inn, 1), torch.zeros(1)
        for batch in batches:
            x = torch.randn(batch, inn, generator=gen)
            ws = itertools.cycle(dense_ws)
            fns = {"dense": lambda x=x, ws=ws: torch.matmul(x, next(ws).t())}
            for key, bs in copies.items():
                fns[key] = lambda x=x, bs=itertools.cycle(bs), g1=g1, b1=b1: next(bs).matmul(x, g1, b1, threads=threads)
            times = time_rounds(fns)
            best = {v: min(("bitmap", "csr16"), key=lambda f, v=v: statistics.median(times[(v, f)])) for v in variants}
            smallest = {v: min(kernel_bytes(b) for b in fmts.values()) for v, fmts in variants.items()}
            for v in ("int8", "int4"):
                t_v, t_fp16 = times[(v, best[v])], times[("fp16", best["fp16"])]
                row = {"in": inn, "out": out, "batch": batch, "sparsity": sparsity, "values": v,
                       "group_size": DEFAULT_GROUP_SIZE[v], "weight_copies": n_copies, "rounds": len(t_v),
                       "dense_fp32_ms": statistics.median(times["dense"]) * 1e3,
                       "fp16_expert_ms": statistics.median(t_fp16) * 1e3, "fp16_format": best["fp16"],
                       "ms": statistics.median(t_v) * 1e3, "format": best[v],
                       "bitmap_ms": statistics.median(times[(v, "bitmap")]) * 1e3,
                       "csr16_ms": statistics.median(times[(v, "csr16")]) * 1e3,
                       "bytes": smallest[v], "fp16_expert_bytes": smallest["fp16"],
                       "vs_fp16_expert": statistics.median(f / q for f, q in zip(t_fp16, t_v, strict=True)),
                       "vs_dense_fp32": statistics.median(d / q for d, q in zip(times["dense"], t_v, strict=True))}
                row["byte_ratio_limit"] = smallest["fp16"] / smallest[v]
                row["fraction_of_limit"] = row["vs_fp16_expert"] / row["byte_ratio_limit"]
                rows.append(row)
                print(f"{inn}x{out} b={batch:4d} s={sparsity} {v}: {row['ms']:.3f} ms ({row['format']}), fp16 expert "
                      f"{row['fp16_expert_ms']:.3f} -> {row['vs_fp16_expert']:.2f}x ({row['fraction_of_limit']:.0%} of "
                      f"{row['byte_ratio_limit']:.2f}x), vs dense fp32 {row['vs_dense_fp32']:.2f}x", flush=True)
    return rows


def markdown_quant(rows: list[dict]) -> str:
    lines = ["| in x out | batch | sparsity | values | dense fp32 ms | fp16 expert ms | int ms (format) | "
             "vs fp16 expert | byte limit | % of limit | vs dense fp32 |",
             "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['in']}x{r['out']} | {r['batch']} | {r['sparsity']} | {r['values']} G{r['group_size']} | "
                     f"{r['dense_fp32_ms']:.3f} | {r['fp16_expert_ms']:.3f} | {r['ms']:.3f} ({r['format']}) | "
                     f"{r['vs_fp16_expert']:.2f}x | {r['byte_ratio_limit']:.2f}x | {r['fraction_of_limit']:.0%} | "
                     f"{r['vs_dense_fp32']:.2f}x |")
    return "\n".join(lines)


def markdown(rows: list[dict]) -> str:
    lines = ["| in x out | batch | sparsity | values | dense ms | bitmap ms | csr16 ms | best | speedup | "
             "byte limit | % of limit | sparse GB/s | router % | dense groups ms (x dense time) |",
             "|---|---:|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        best = r["best_format"]
        lines.append(f"| {r['in']}x{r['out']} | {r['batch']} | {r['sparsity']} | {r['values']} | {r['dense_ms']:.3f} | "
                     f"{r['bitmap_ms']:.3f} | {r['csr16_ms']:.3f} | {best} | {r['speedup']:.2f}x | "
                     f"{r['byte_ratio_limit']:.2f}x | {r['fraction_of_limit']:.0%} | {r[f'{best}_gbps']:.1f} | "
                     f"{100 * r.get('router_share', 0):.1f} | {dense_groups(r)} |")
    return "\n".join(lines)


def dense_groups(row: dict) -> str:
    if "dense_groups_ms" not in row:
        return "-"
    return f"{row['dense_groups_ms']:.3f} ({row['dense_groups_vs_dense']:.2f}x)"


def cpu_model() -> str:
    """The CPU's model name: this project's machines change between sessions (Zen 3, Xeon with AVX-512)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=SHAPES, help="IN x OUT of the weight")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 64, 512])
    parser.add_argument("--sparsities", nargs="+", default=["0.5", "0.7", "0.9", "2:4"])
    parser.add_argument("--values", nargs="+", default=["fp32", "fp16"], choices=list(DTYPES))
    parser.add_argument("--threads", type=int, default=0, help="kernel and torch threads (0: all cores)")
    parser.add_argument("--router-experts", type=int, default=16)
    parser.add_argument("--warm", action="store_true",
                        help="one copy of every weight (part of the weights may stay in a large last-level cache "
                             "between rounds, flattering both sides)")
    parser.add_argument("--quant", action="store_true",
                        help="int8/int4 experts against the same expert with fp16 values and dense fp32")
    parser.add_argument("--out", type=Path, default=Path("bench/results/kernels.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = args.threads or torch.get_num_threads()
    rows = []
    for shape in args.shapes:
        inn, out = (int(v) for v in shape.lower().split("x"))
        if args.quant:
            rows += bench_quant_shape(inn, out, args.batches, args.sparsities, threads, cold=not args.warm)
        else:
            rows += bench_shape(inn, out, args.batches, args.sparsities, args.values, threads, args.router_experts,
                                cold=not args.warm)
    table = markdown_quant(rows) if args.quant else markdown(rows)
    print(table)
    meta = {"isa": kernels.isa(), "threads": threads, "torch": torch.__version__, "machine": platform.machine(),
            "processor": cpu_model(), "weights": "one copy (--warm)" if args.warm else "rotated copies (cold)",
            "last_level_cache_bytes": last_level_cache_bytes()}
    atomic_write_text(args.out, json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {args.out} (isa {meta['isa']}, {threads} threads)")


if __name__ == "__main__":
    main()
