"""Prefill of one routed sparse layer in ONNX Runtime vs ONNX Runtime's dense MatMul, same run.

Why: the custom op's prefill either runs every token on the sparse tile or, for an expert with
many tokens that keeps enough weights, decodes it once and invokes ONNX Runtime's own Gemm from
inside the op ("dense groups", ``se_routed_sparse_matmul_gemm_on``). Both are timed against a
one-node ``MatMul`` graph of the same weight (fp32, as ONNX Runtime's CPU MatMul runs), in
alternating rounds in one process, and each ratio is the median of the per-round ratios.
One expert takes all tokens (K=1), as in ``bench/kernels.py``: the layer cost, not the routing.

    .venv/bin/python bench/ort_prefill.py                  # 4096x11008 and its transpose, 128 and 512 tokens, 50%
    .venv/bin/python bench/ort_prefill.py --shapes 576x1536 --batches 512 --sparsities 0.5 2:4
    .venv/bin/python bench/ort_prefill.py --e2e out/onnx-dense out/demo-onnx --prompt-len 2048

``--e2e DENSE EXPANDED`` instead times the prefill of whole exported models in one process: the
dense export, the expanded one on the sparse tile only, and the expanded one with dense groups,
round after round.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).parent))
from kernels import cpu_model, sparse_mask, time_rounds

from se_export import onnx_schema
from se_export.atomic import atomic_write_text
from se_export.ort_runtime import ort_library
from se_export.sparse_format import pack_experts


def dense_model(weight: torch.Tensor):
    inn = weight.shape[1]
    node = helper.make_node("MatMul", ["x", "w"], ["y"])
    graph = helper.make_graph([node], "dense", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", inn])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["T", weight.shape[0]])],
                              initializer=[numpy_helper.from_array(weight.t().contiguous().numpy(), "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def routed_model(packed):
    inn, out = packed.in_features, packed.out_features
    inits = [numpy_helper.from_array(np.zeros((inn, 1), np.float32), "G"),
             numpy_helper.from_array(np.zeros(1, np.float32), "b"),
             numpy_helper.from_array(packed.values.numpy(), "values"),
             numpy_helper.from_array(packed.indices.numpy(), "indices"),
             numpy_helper.from_array(packed.row_ptr.numpy(), "row_ptr")]
    node = helper.make_node("RoutedSparseMatMul", ["x", "G", "b", "values", "indices", "row_ptr"], ["y"],
                            domain=onnx_schema.DOMAIN, out_features=out, format=packed.format)
    graph = helper.make_graph([node], "routed", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", inn])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["T", out])], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(onnx_schema.DOMAIN, 1)],
                             ir_version=10)


@contextlib.contextmanager
def dense_group_setting(value: str | None):
    """SE_ORT_DENSE_GROUP_TOKENS set to ``value`` (None: left alone) while sessions are built: the
    op reads it when ONNX Runtime creates its kernels ("" = the default threshold, "0" = off)."""
    saved = os.environ.get("SE_ORT_DENSE_GROUP_TOKENS")
    if value is not None:
        os.environ["SE_ORT_DENSE_GROUP_TOKENS"] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("SE_ORT_DENSE_GROUP_TOKENS", None)
        else:
            os.environ["SE_ORT_DENSE_GROUP_TOKENS"] = saved


def session(model, threads: int, dense_group_tokens: str | None = None) -> ort.InferenceSession:
    """A session (with our op library when ``dense_group_tokens`` is given)."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    if dense_group_tokens is not None:
        opts.register_custom_ops_library(str(ort_library()))
    with dense_group_setting(dense_group_tokens):
        return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def bench(shapes: list[str], batches: list[int], sparsities: list[str], threads: int) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    rows = []
    for shape in shapes:
        inn, out = (int(v) for v in shape.lower().split("x"))
        weight = torch.randn(out, inn, generator=gen)
        dense = session(dense_model(weight), threads)
        for sparsity in sparsities:
            mask = sparse_mask(out, inn, sparsity, gen)
            packed = pack_experts((weight * mask)[None], mask[None], "bitmap", torch.float32)
            model = routed_model(packed)
            masked_t = (weight * mask).t().contiguous().numpy()
            tile, groups = session(model, threads, "0"), session(model, threads, "")
            for batch in batches:
                x = torch.randn(batch, inn, generator=gen).numpy()
                fns = {"dense": lambda s=dense, x=x: s.run(None, {"x": x}),
                       "sparse_tile": lambda s=tile, x=x: s.run(None, {"x": x}),
                       "dense_groups": lambda s=groups, x=x: s.run(None, {"x": x})}
                expected = x @ masked_t  # the product both op paths must give, else the timing means nothing
                for name in ("sparse_tile", "dense_groups"):
                    assert np.allclose(fns[name]()[0], expected, rtol=1e-3, atol=1e-3), name
                times = time_rounds(fns, min_time=1.0, max_rounds=20)
                row = {"in": inn, "out": out, "batch": batch, "sparsity": sparsity, "values": "fp32",
                       "rounds": len(times["dense"]), "dense_ms": statistics.median(times["dense"]) * 1e3}
                for name in ("sparse_tile", "dense_groups"):
                    row[f"{name}_ms"] = statistics.median(times[name]) * 1e3
                    row[f"{name}_vs_dense"] = statistics.median(
                        t / d for t, d in zip(times[name], times["dense"], strict=True))
                rows.append(row)
                print(f"{inn}x{out} b={batch} s={sparsity}: dense {row['dense_ms']:.1f} ms, sparse tile "
                      f"{row['sparse_tile_ms']:.1f} ({row['sparse_tile_vs_dense']:.2f}x), dense groups "
                      f"{row['dense_groups_ms']:.1f} ({row['dense_groups_vs_dense']:.2f}x)", flush=True)
    return rows


def bench_e2e(dense_dir: Path, expanded_dir: Path, prompt_len: int, rounds: int, threads: int) -> dict:
    from se_export.ort_runtime import OrtCausalLM

    def load(folder: Path, dense_group_tokens: str | None = None) -> OrtCausalLM:
        with dense_group_setting(dense_group_tokens):
            return OrtCausalLM(folder, threads=threads)

    models = {"dense": load(dense_dir), "sparse_tile": load(expanded_dir, "0"), "dense_groups": load(expanded_dir, "")}
    ids = np.random.default_rng(0).integers(0, models["dense"].manifest["vocab_size"], (1, prompt_len))
    for lm in models.values():  # warm-up (and first-touch of the weights)
        lm.run(ids[:, : min(prompt_len, 256)])
    seconds: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, lm in models.items():
            start = time.perf_counter()
            lm.run(ids)
            seconds[name].append(time.perf_counter() - start)
    result = {"dense_dir": str(dense_dir), "expanded_dir": str(expanded_dir), "prompt_len": prompt_len,
              "rounds": rounds, "seconds": seconds}
    for name in ("sparse_tile", "dense_groups"):
        result[f"{name}_vs_dense"] = statistics.median(
            t / d for t, d in zip(seconds[name], seconds["dense"], strict=True))
    print(f"prefill of {prompt_len} tokens: dense {statistics.median(seconds['dense']):.2f} s, expanded on the sparse "
          f"tile {result['sparse_tile_vs_dense']:.2f}x, with dense groups {result['dense_groups_vs_dense']:.2f}x "
          f"the dense time (median of {rounds} paired rounds)")
    return result


def markdown(rows: list[dict]) -> str:
    lines = ["| shape (in x out) | tokens | sparsity | ORT MatMul ms | sparse tile ms (x dense) | dense groups ms (x dense) |",
             "|---|---:|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['in']} x {r['out']} | {r['batch']} | {r['sparsity']} | {r['dense_ms']:.1f} | "
                     f"{r['sparse_tile_ms']:.1f} ({r['sparse_tile_vs_dense']:.2f}x) | "
                     f"{r['dense_groups_ms']:.1f} ({r['dense_groups_vs_dense']:.2f}x) |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["4096x11008", "11008x4096"], help="IN x OUT of the weight")
    parser.add_argument("--batches", nargs="+", type=int, default=[128, 512])
    parser.add_argument("--sparsities", nargs="+", default=["0.5"])
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: all cores)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/ort_prefill.json"))
    parser.add_argument("--e2e", nargs=2, type=Path, metavar=("DENSE_DIR", "EXPANDED_DIR"),
                        help="time whole exported models' prefill instead of one layer")
    parser.add_argument("--prompt-len", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    onnx_schema.register()
    if args.e2e:
        result = bench_e2e(*args.e2e, args.prompt_len, args.rounds, args.threads)
        atomic_write_text(args.out, json.dumps({"cpu": cpu_model(), "onnxruntime": ort.__version__, **result}, indent=1))
        return
    rows = bench(args.shapes, args.batches, args.sparsities, args.threads)
    table = markdown(rows)
    print(table)
    atomic_write_text(args.out, json.dumps({"cpu": cpu_model(), "onnxruntime": ort.__version__,
                                            "threads": args.threads, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
