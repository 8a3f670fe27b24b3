"""Where expansion time goes: per-layer seconds for K=1 (SparseGPT) and K=16 (Sparse Expansion),
split into Gram matrix, router fit, Hessians, SparseGPT pruning and packing, against the whole run
(capture and layer forwards included). The target: whole run <= 1.2 x the pruning time.

    .venv/bin/python bench/expand_profile.py --layers 0-3
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from se_export.atomic import atomic_write_text
from se_export.data import calibration_windows, load_text, tokenize
from se_export.method.expand import ExpandConfig, expand_model
from se_export.models import load_model


def profile(method: str, experts: int, layers: list[int], samples: int, seqlen: int, sparsity: str) -> dict:
    loaded = load_model("default")
    calib = calibration_windows(tokenize(loaded.tokenizer, load_text("wiki")), samples, seqlen, 0)
    cfg = ExpandConfig(method=method, experts=experts, sparsity=sparsity, layers=layers)
    start = time.perf_counter()
    result = expand_model(loaded.model, calib, cfg, show_progress=False)
    total = time.perf_counter() - start
    parts: dict[str, float] = {}
    for rep in result.layers:
        for group in rep["groups"]:
            for name, sec in group.get("timing", {}).items():
                parts[name] = parts.get(name, 0.0) + sec
    per_layer = [rep["seconds"] for rep in result.layers]
    return {"method": method, "experts": experts, "layers": layers, "total_s": round(total, 2),
            "seconds_per_layer": round(sum(per_layer) / len(per_layer), 2), "parts_s": {k: round(v, 2) for k, v in parts.items()},
            "total_over_prune": round(total / max(parts.get("prune", 0.0), 1e-9), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="0-3")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--sparsity", default="0.5")
    parser.add_argument("--out", type=Path, default=Path("bench/results/expand_profile.json"))
    args = parser.parse_args()
    a, b = (int(v) for v in args.layers.split("-"))
    layers = list(range(a, b + 1))
    rows = [profile("sparsegpt", 1, layers, args.samples, args.seqlen, args.sparsity),
            profile("se", 16, layers, args.samples, args.seqlen, args.sparsity)]
    for r in rows:
        parts = ", ".join(f"{k} {v:.1f}s" for k, v in r["parts_s"].items())
        print(f"{r['method']:9s} K={r['experts']:2d}: {r['seconds_per_layer']:.1f} s/layer, whole run {r['total_s']:.1f}s "
              f"= {r['total_over_prune']:.2f}x pruning ({parts})")
    atomic_write_text(args.out, json.dumps({"threads": torch.get_num_threads(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
