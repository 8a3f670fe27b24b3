"""Own-calibration reconstruction error of every expert by the size of its cluster.

Why: a cluster of n tokens gives its expert a Hessian ``X_k^T X_k`` of rank <= n. Where n is
below the layer's input width (576 for gate/up, 1536 for down on the default model), SparseGPT's
updates can fit those n tokens almost exactly, so a small cluster's error on its own calibration
tokens says little about new text. This table shows how strongly the reported error depends on n,
and (``--heldout-windows``) the same error on WikiText-2 test tokens the expert never saw, routed
by the checkpoint's own routers, against the dense model's weight.

    .venv/bin/python bench/cluster_error.py out/ckpt-se16-70 --heldout-windows 16 \
        --out bench/results/cluster_error_se16_70.json
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

import torch

from se_export.atomic import atomic_write_text

BUCKETS = ((0, 512), (512, 1024), (1024, 4096), (4096, 1 << 30))


def expert_rows(report: dict) -> list[dict]:
    """One row per (layer, linear group, expert): cluster size, input width, relative error."""
    rows = []
    for layer in report["layers"]:
        for group in layer["groups"]:
            part = "down" if any("down" in name for name in group["linears"]) else "gate/up"
            for k, (size, error) in enumerate(zip(group["cluster_sizes"], group["reconstruction_error"], strict=True)):
                rows.append({"layer": layer["layer"], "linears": group["linears"], "part": part, "expert": k,
                             "tokens": int(size), "error": float(error)})
    return rows


def heldout_errors(checkpoint: Path, base_model: str, windows: int) -> dict[tuple[int, str, int], float]:
    """(layer, linear, expert) -> ||X_k (W_k - W)^T||^2 / ||X_k W^T||^2 over held-out tokens X_k
    that the checkpoint's router sends to expert k, W the dense model's weight."""
    from se_export.data import eval_windows, load_text, tokenize
    from se_export.modeling.modules import RoutedSparseLinear
    from se_export.models import load_model

    expanded, dense = load_model(str(checkpoint)), load_model(base_model)
    dense_weights = {name: m.weight.detach().float() for name, m in dense.model.named_modules()
                     if isinstance(m, torch.nn.Linear)}
    sums: dict[tuple[int, str, int], list[float]] = {}

    def hook(name: str):
        layer, linear = re.search(r"\.(\d+)\.(.+)$", name).groups()

        def measure(module: RoutedSparseLinear, inputs, _output) -> None:
            x = inputs[0].reshape(-1, module.in_features).float()
            ids = module.last_expert_ids.reshape(-1)
            w = dense_weights[name]
            for k in ids.unique().tolist():
                xk = x[ids == k]
                ref = xk @ w.t()
                err = xk @ module.packed().unpack_expert(k, torch.float32).t() - ref
                acc = sums.setdefault((int(layer), linear, k), [0.0, 0.0])
                acc[0] += float((err * err).sum())
                acc[1] += float((ref * ref).sum())
        return measure

    for name, module in expanded.model.named_modules():
        if isinstance(module, RoutedSparseLinear):
            module.record_routing = True
            module.register_forward_hook(hook(name))
    ids = tokenize(expanded.tokenizer, load_text("wikitext2"))
    with torch.no_grad():
        for batch in eval_windows(ids, 512, windows).split(4):  # 4 windows per pass: fewer expert decodes
            expanded.model(batch)
    return {key: num / den for key, (num, den) in sums.items() if den > 0}


def attach_heldout(rows: list[dict], heldout: dict[tuple[int, str, int], float]) -> None:
    """Per row (an expert of a linear group): the mean held-out error over the group's linears."""
    for row in rows:
        keys = [(row["layer"], lin, row["expert"]) for lin in row["linears"]]
        values = [heldout[key] for key in keys if key in heldout]
        if values:
            row["heldout_error"] = sum(values) / len(values)


def bucket_table(rows: list[dict]) -> list[dict]:
    table = []
    for part in ("gate/up", "down"):
        for lo, hi in BUCKETS:
            chosen = [r for r in rows if r["part"] == part and lo <= r["tokens"] < hi]
            if chosen:
                entry = {"part": part, "tokens_from": lo, "tokens_below": hi, "experts": len(chosen),
                         "median_error": statistics.median(r["error"] for r in chosen)}
                held = [r["heldout_error"] for r in chosen if "heldout_error" in r]
                if held:
                    entry["median_heldout_error"] = statistics.median(held)
                    entry["median_heldout_over_own"] = statistics.median(
                        r["heldout_error"] / r["error"] for r in chosen if "heldout_error" in r and r["error"] > 0)
                table.append(entry)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="an se-export expand checkpoint (reads expand_report.json)")
    parser.add_argument("--heldout-windows", type=int, default=0,
                        help="also measure on this many 512-token WikiText-2 test windows (0: skip)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    report = json.loads((args.checkpoint / "expand_report.json").read_text())
    rows = expert_rows(report)
    if args.heldout_windows:
        attach_heldout(rows, heldout_errors(args.checkpoint, report["base_model"], args.heldout_windows))
    table = bucket_table(rows)
    print("| linears | cluster tokens | experts | median error, own calibration | median error, held out | "
          "median held out / own |")
    print("|---|---|---:|---:|---:|---:|")
    for row in table:
        hi = "" if row["tokens_below"] >= 1 << 30 else str(row["tokens_below"])
        held = f"{row['median_heldout_error']:.4f} | {row['median_heldout_over_own']:.2f}x" \
            if "median_heldout_error" in row else "- | -"
        print(f"| {row['part']} | {row['tokens_from']}-{hi} | {row['experts']} | {row['median_error']:.4f} | {held} |")
    if args.out:
        atomic_write_text(args.out, json.dumps({"checkpoint": str(args.checkpoint), "heldout_windows": args.heldout_windows,
                                                "buckets": table, "experts": rows}, indent=1))


if __name__ == "__main__":
    main()
