"""Which int4 grid? Symmetric, with a zero point, or full range, applied to the same experts, paired.

se-export's int4 was symmetric (codes in [-7, 7], one fp16 scale per expert, row and group); it is
now "full range" (codes in [-8, 7], a signed scale: the largest-magnitude weight is code -8). The
usual alternative is asymmetric: codes in [0, 15] with a per-group zero point z, the weight
(q - z) * s, the 16 levels spread from the group's smallest to its largest kept weight. This
takes one float checkpoint (the expansion's SparseGPT weights in fp16), rounds every expert's
kept weights to nearest on each grid (same groups, fp16 scales, pruned weights left out of the
ranges), and evaluates each on all WikiText-2 windows with the grid's protocol (512-token
windows, batch 4), paired against the symmetric grid. Rounding to nearest isolates the grid: the
joint sweep would compensate either grid's error the same way. The asymmetric grid's dequantized
weights are kept in fp32 (exact), since neither the checkpoint nor the kernels store zero points.

    .venv/bin/python bench/zero_point.py out/quant/se16-50-fp16 --group-size 32 --threads 1 [--grids symmetric ...]

One process per grid may run at the same time (each adds its own row to the JSON).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from se_export.api import evaluate
from se_export.atomic import atomic_write_text
from se_export.eval.stats import paired_ratio_ci
from se_export.formats.checkpoint import expanded_modules
from se_export.formats.quantization import QuantSpec, round_to_nearest
from se_export.models import load_model

RESULTS = Path("bench/results/zero_point.json")
LEVELS = 16  # int4


def symmetric(w: torch.Tensor, keep: torch.Tensor, group: int) -> torch.Tensor:
    """The older int4 grid: codes in [-7, 7] times a positive fp16 scale, the group's largest kept
    |w| over 7."""
    groups = _grouped(w * keep, group)
    scale = (groups.abs().amax(-1, keepdim=True) / 7).half().float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return _ungrouped(torch.clamp(torch.round(groups / scale), -7, 7) * scale, w.shape[-1]) * keep


def with_zero_point(w: torch.Tensor, keep: torch.Tensor, group: int) -> torch.Tensor:
    """Codes in [0, 15]: (q - z) * s, s = (max - min) / 15 over the group's kept weights (fp16),
    z = round(-min / s) in [0, 15]."""
    kept = _grouped(keep.float(), group) > 0
    groups = _grouped(w * keep, group)
    inf = torch.tensor(float("inf"))
    lo = torch.where(kept, groups, inf).amin(-1, keepdim=True)
    hi = torch.where(kept, groups, -inf).amax(-1, keepdim=True)
    lo, hi = torch.where(torch.isfinite(lo), lo, 0.0), torch.where(torch.isfinite(hi), hi, 0.0)
    scale = ((hi - lo) / (LEVELS - 1)).half().float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.clamp(torch.round(-lo / scale), 0, LEVELS - 1)
    q = torch.clamp(torch.round(groups / scale) + zero, 0, LEVELS - 1)
    return _ungrouped((q - zero) * scale, w.shape[-1]) * keep


def _grouped(t: torch.Tensor, group: int) -> torch.Tensor:
    pad = (-t.shape[-1]) % group
    t = torch.nn.functional.pad(t.float(), (0, pad))
    return t.reshape(*t.shape[:-1], -1, group)


def _ungrouped(t: torch.Tensor, cols: int) -> torch.Tensor:
    return t.reshape(*t.shape[:-2], -1)[..., :cols]


def full_range(w: torch.Tensor, keep: torch.Tensor, group: int, shrinks: tuple[float, ...] = (1.0,)) -> torch.Tensor:
    """Codes in [-8, 7] times a signed fp16 scale: the group's largest-magnitude kept weight is
    code -8 (the scale takes its opposite sign), so all 16 levels are used at no extra bits: the
    package's grid (se_export.formats.quantization). With several ``shrinks``, each group keeps the
    clipped range (largest |w| times the factor) whose rounding has the least squared error over
    its kept weights (GPTQ's ``mse`` search)."""
    if shrinks == (1.0,):
        return round_to_nearest(w, keep, QuantSpec(4, group))[0]
    kept = _grouped(keep.float(), group) > 0
    groups = _grouped(w * keep, group)
    peak = groups.gather(-1, groups.abs().argmax(-1, keepdim=True))
    best, best_err = None, None
    for shrink in shrinks:
        scale = (-peak * shrink / 8).half().float()
        scale = torch.where(scale != 0, scale, torch.ones_like(scale))
        q = torch.clamp(torch.round(groups / scale), -8, 7) * scale
        err = ((q - groups) ** 2 * kept).sum(-1, keepdim=True)
        if best is None:
            best, best_err = q, err
        else:
            better = err < best_err
            best, best_err = torch.where(better, q, best), torch.where(better, err, best_err)
    return _ungrouped(best, w.shape[-1]) * keep


def full_range_mse(w: torch.Tensor, keep: torch.Tensor, group: int) -> torch.Tensor:
    return full_range(w, keep, group, shrinks=tuple(1.0 - 0.025 * i for i in range(9)))


GRIDS = {"symmetric": symmetric, "zero point": with_zero_point, "full range": full_range,
         "full range mse": full_range_mse}


def round_experts(model: torch.nn.Module, grid, group: int) -> None:
    """Replace every expert's kept values by their rounding on ``grid`` (fp32 values: exact)."""
    for module in expanded_modules(model).values():
        packed = module.packed()
        keep = packed.mask()
        rounded = grid(packed.unpack(torch.float32), keep, group)
        module.values = rounded[keep].contiguous()  # packed order: expert, row, column


def paired(rows: list[dict]) -> list[dict]:
    """Per checkpoint and group size, each grid's perplexity over the symmetric one's, with the
    paired bootstrap 95% CI over the same windows."""
    out = []
    for ckpt, group in sorted({(r["checkpoint"], r["group_size"]) for r in rows}):
        both = {r["grid"]: r for r in rows if (r["checkpoint"], r["group_size"]) == (ckpt, group)}
        base = both.get("symmetric")
        for name, row in both.items():
            if base is None or name == "symmetric" or row["windows"] != base["windows"]:
                continue
            a, b = row["window_nll"], base["window_nll"]
            lo, hi = paired_ratio_ci(a, b)
            out.append({"checkpoint": ckpt, "group_size": group, "grid": name,
                        "over_symmetric": math.exp(sum(a) / len(a) - sum(b) / len(b)), "ci95": [lo, hi]})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="an expanded checkpoint with float values")
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--grids", nargs="+", default=list(GRIDS), choices=list(GRIDS))
    parser.add_argument("--eval-windows", type=int, default=0, help="WikiText-2 windows (0: all)")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = json.loads(args.out.read_text())["rows"] if args.out.exists() else []
    for name in args.grids:
        if any(r["grid"] == name and r["checkpoint"] == str(args.checkpoint) and r["group_size"] == args.group_size
               for r in rows):
            continue
        loaded = load_model(str(args.checkpoint))
        round_experts(loaded.model, GRIDS[name], args.group_size)
        tag = "" if args.group_size == 32 else f"-g{args.group_size}"
        resume = Path("out/zero_point") / f"{args.checkpoint.name}-{name.replace(' ', '-')}{tag}.json"
        resume.parent.mkdir(parents=True, exist_ok=True)
        result = evaluate(loaded, "wikitext2", seqlen=512, max_windows=args.eval_windows or None, batch=4,
                          resume=resume, show_progress=True)
        bits = 4 * args.group_size + 16 + (4 if name == "zero point" else 0)  # codes, fp16 scale, 4-bit zero
        row = {"grid": name, "checkpoint": str(args.checkpoint), "group_size": args.group_size,
               "wikitext2_ppl": result["perplexity"], "windows": result["windows"],
               "bits_per_group": bits, "window_nll": result["window_nll"]}
        # read again: another process may have written its grid's row meanwhile (one per grid)
        rows = json.loads(args.out.read_text())["rows"] if args.out.exists() else []
        key = (name, str(args.checkpoint), args.group_size)
        rows = sorted([r for r in rows if (r["grid"], r["checkpoint"], r["group_size"]) != key] + [row],
                      key=lambda r: (r["checkpoint"], r["group_size"], r["grid"]))
        atomic_write_text(args.out, json.dumps({"command": "bench/zero_point.py", "rows": rows,
                                                "paired": paired(rows)}, indent=1))
        print(f"{name}: perplexity {result['perplexity']:.3f} on {result['windows']} windows", flush=True)


if __name__ == "__main__":
    main()
