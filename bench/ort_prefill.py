"""Prefill of one routed sparse layer in ONNX Runtime vs ONNX Runtime's dense MatMul, same run.

Why: the custom op's prefill either runs every token on the sparse tile or, for an expert with
many tokens that keeps enough weights, decodes it and invokes ONNX Runtime's own Gemm from inside
the op ("dense groups", ``se_routed_sparse_matmul_gemm_on``), by default in 8 MiB bands of output
rows, which bound the op's decode scratch ("dense groups whole": the whole decoded expert in one
Gemm, as before the bands). All are timed against a
one-node ``MatMul`` graph of the same weight (fp32, as ONNX Runtime's CPU MatMul runs), in
alternating rounds in one process, and each ratio is the median of the per-round ratios.
One expert takes all tokens (K=1), as in ``bench/kernel_speed.py``: the layer cost, not the routing.

    .venv/bin/python bench/ort_prefill.py                  # 4096x11008 and its transpose, 128 and 512 tokens, 50%
    .venv/bin/python bench/ort_prefill.py --shapes 576x1536 --batches 512 --sparsities 0.5 2:4
    .venv/bin/python bench/ort_prefill.py --e2e out/onnx-dense out/demo-onnx --prompt-len 2048

``--e2e DENSE EXPANDED`` instead times the prefill of whole exported models in one process: the
dense export and the expanded one in each variant above, round after round.
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
from kernel_speed import cpu_model, sparse_mask, time_rounds

from se_export.atomic import atomic_write_text
from se_export.backends.ort_runtime import session_options
from se_export.export import onnx_schema
from se_export.formats.sparse_format import pack_experts


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


# Op settings read when ONNX Runtime creates the op's kernels: the group size at which an expert goes
# to ONNX Runtime's Gemm ("0": never) and the decoded bytes per Gemm call ("0": the whole expert).
VARIANTS = {"sparse_tile": {"SE_ORT_DENSE_GROUP_TOKENS": "0"},
            "dense_groups": {},
            "dense_groups_whole": {"SE_ORT_DENSE_TILE_BYTES": "0"}}
_OP_SETTINGS = ("SE_ORT_DENSE_GROUP_TOKENS", "SE_ORT_DENSE_TILE_BYTES")


@contextlib.contextmanager
def op_settings(values: dict[str, str]):
    """Exactly ``values`` of the op's settings in the environment (the others unset: the op's
    defaults) while sessions are built."""
    saved = {name: os.environ.pop(name, None) for name in _OP_SETTINGS}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            os.environ.pop(name, None)
            if value is not None:
                os.environ[name] = value


def session(model, threads: int, settings: dict[str, str] | None = None) -> ort.InferenceSession:
    """A session (with our op library and these op settings when ``settings`` is given)."""
    # The sessions take turns call by call: a pool left spinning after its call takes the cores from
    # the next session's call (a variant timed right after another session's call ran 1.06-1.36x
    # the time it took right after its own session's), so no pool here spins.
    opts = session_options(threads, custom_ops=settings is not None, spinning=False)
    with op_settings(settings or {}):
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
            sessions = {name: session(model, threads, settings) for name, settings in VARIANTS.items()}
            for batch in batches:
                x = torch.randn(batch, inn, generator=gen).numpy()
                fns = {"dense": lambda s=dense, x=x: s.run(None, {"x": x})}
                fns |= {name: (lambda s=sess, x=x: s.run(None, {"x": x})) for name, sess in sessions.items()}
                expected = x @ masked_t  # the product every op path must give, else the timing means nothing
                for name in VARIANTS:
                    assert np.allclose(fns[name]()[0], expected, rtol=1e-3, atol=1e-3), name
                times = time_rounds(fns, min_time=1.0, max_rounds=20)
                row = {"in": inn, "out": out, "batch": batch, "sparsity": sparsity, "values": "fp32",
                       "rounds": len(times["dense"]), "dense_ms": statistics.median(times["dense"]) * 1e3}
                for name in VARIANTS:
                    row[f"{name}_ms"] = statistics.median(times[name]) * 1e3
                    row[f"{name}_vs_dense"] = statistics.median(
                        t / d for t, d in zip(times[name], times["dense"], strict=True))
                rows.append(row)
                print(f"{inn}x{out} b={batch} s={sparsity}: dense {row['dense_ms']:.1f} ms, "
                      + ", ".join(f"{name.replace('_', ' ')} {row[name + '_ms']:.1f} ({row[name + '_vs_dense']:.2f}x)"
                                  for name in VARIANTS), flush=True)
    return rows


def bench_e2e(dense_dir: Path, expanded_dir: Path, prompt_len: int, rounds: int, threads: int) -> dict:
    from se_export.backends.ort_runtime import OrtCausalLM

    def load(folder: Path, settings: dict[str, str]) -> OrtCausalLM:
        with op_settings(settings):
            return OrtCausalLM(folder, threads=threads, spinning=False)

    models = {"dense": load(dense_dir, {})} | {name: load(expanded_dir, settings) for name, settings in VARIANTS.items()}
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
    for name in VARIANTS:
        result[f"{name}_vs_dense"] = statistics.median(
            t / d for t, d in zip(seconds[name], seconds["dense"], strict=True))
    print(f"prefill of {prompt_len} tokens: dense {statistics.median(seconds['dense']):.2f} s; expanded, x the dense "
          f"time (median of {rounds} paired rounds): "
          + ", ".join(f"{name.replace('_', ' ')} {result[name + '_vs_dense']:.2f}x" for name in VARIANTS))
    return result


def markdown(rows: list[dict]) -> str:
    lines = ["| shape (in x out) | tokens | sparsity | ORT MatMul ms | "
             + " | ".join(f"{name.replace('_', ' ')} ms (x dense)" for name in VARIANTS) + " |",
             "|---|---:|---|---:|" + "---:|" * len(VARIANTS)]
    for r in rows:
        lines.append(f"| {r['in']} x {r['out']} | {r['batch']} | {r['sparsity']} | {r['dense_ms']:.1f} | "
                     + " | ".join(f"{r[name + '_ms']:.1f} ({r[name + '_vs_dense']:.2f}x)" for name in VARIANTS) + " |")
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
