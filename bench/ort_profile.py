"""Where a decode step's time goes in ONNX Runtime: node time per op type, per step.

Why: the end-to-end decode ratio (expanded vs dense) is bounded by what the MLP is of a step;
ONNX Runtime's own profiler splits a step into its nodes. Profiling slows every node a little,
so read shares and differences between exports, not absolute speed.

    .venv/bin/python bench/ort_profile.py out/onnx-dense out/onnx-se70 --out bench/results/ort_profile.json
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
from pathlib import Path

import numpy as np

from se_export.atomic import atomic_write_text
from se_export.backends import ort_runtime


def profile_decode(folder: Path, prompt_len: int, steps: int, threads: int) -> dict:
    """Prefill prompt_len tokens, then `steps` greedy decode steps; node time of the decode steps."""
    with tempfile.TemporaryDirectory() as tmp:
        model = ort_runtime.OrtCausalLM(folder, threads=threads, profile_prefix=str(Path(tmp) / "ort"))
        ids = np.random.default_rng(0).integers(0, 1000, (1, prompt_len))
        logits, past, _ = model.run(ids)
        for _ in range(steps):
            logits, past, _ = model.run(logits[:, -1:].argmax(-1), past)
        events = json.loads(Path(model.session.end_profiling()).read_text())
    runs = [e for e in events if e.get("name") == "model_run"]
    decode_start = runs[1]["ts"]
    by_op: collections.Counter = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= decode_start:
            by_op[e["args"].get("op_name", "?")] += e["dur"]
    return {"onnx_dir": str(folder), "steps": steps, "prompt_len": prompt_len,
            "wall_ms_per_step": sum(r["dur"] for r in runs[1:]) / steps / 1000,
            "node_ms_per_step": sum(by_op.values()) / steps / 1000,
            "ops_ms_per_step": {op: d / steps / 1000 for op, d in by_op.most_common()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("onnx_dirs", nargs="+", type=Path)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--top", type=int, default=8)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    rows = [profile_decode(d, args.prompt_len, args.steps, args.threads) for d in args.onnx_dirs]
    ops = list(dict.fromkeys(op for r in rows for op in list(r["ops_ms_per_step"])[: args.top]))
    print("| ms per decode step (profiled) | " + " | ".join(r["onnx_dir"] for r in rows) + " |")
    print("|---|" + "---:|" * len(rows))
    for name, key in (("wall", "wall_ms_per_step"), ("all nodes", "node_ms_per_step")):
        print(f"| {name} | " + " | ".join(f"{r[key]:.2f}" for r in rows) + " |")
    for op in ops:
        print(f"| {op} | " + " | ".join(f"{r['ops_ms_per_step'].get(op, 0.0):.2f}" for r in rows) + " |")
    if args.out:
        atomic_write_text(args.out, json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
