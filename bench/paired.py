"""Perplexity ratios with paired bootstrap intervals between evaluations of the same windows.

Inputs are `se-export eval --json` outputs (every window's NLL) and quality-grid rows
(`bench/results/quality.json`, by label; the grid's first-40-window table unless `--all-windows`).
The first model is the reference; each other one is reported as ppl(model) / ppl(reference) on the
windows both evaluated, with the grid's 2000-resample paired bootstrap.

    .venv/bin/python bench/paired.py --grid "se K=16 @ 0.7" --eval "layer 0 dense=out/l1.json" \
        --out bench/results/layer0_dense.json
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from quality import RESULTS

from se_export.eval.stats import paired_ratio_ci


def _grid_row(label: str, all_windows: bool, text: str) -> dict:
    part = "all_windows" if all_windows else "subset"
    rows = json.loads((RESULTS / "quality.json").read_text())[part]["results"]
    row = next((r for r in rows if r["label"] == label), None)
    if row is None:
        raise SystemExit(f"no grid row '{label}' in {RESULTS / 'quality.json'} ({part}); see --report")
    return row[text]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", action="append", default=[], help="quality-grid row label (repeatable)")
    ap.add_argument("--eval", action="append", default=[], help="NAME=se-export eval --json output (repeatable)")
    ap.add_argument("--text", default="wikitext2", help="grid text to take rows from (wikitext2 | pydocs)")
    ap.add_argument("--all-windows", action="store_true", help="grid rows from the all-window table")
    ap.add_argument("--out", type=Path, help="write the table as JSON here")
    args = ap.parse_args()
    models = [(label, _grid_row(label, args.all_windows, args.text)["window_nll"]) for label in args.grid]
    for spec in args.eval:
        name, _, path = spec.rpartition("=")  # names may hold "=" (K=16)
        models.append((name, json.loads(Path(path).read_text())["window_nll"]))
    if len(models) < 2:
        raise SystemExit("give at least two models (--grid / --eval)")
    ref_name, ref = models[0]
    rows = []
    print(f"| model | windows | ppl | vs {ref_name} | 95% CI (paired bootstrap) |\n|---|---:|---:|---:|---|")
    for name, nll in models:
        n = min(len(nll), len(ref))
        ppl = math.exp(sum(nll[:n]) / n)
        ratio = math.exp((sum(nll[:n]) - sum(ref[:n])) / n)
        lo, hi = paired_ratio_ci(nll[:n], ref[:n]) if name != ref_name else (1.0, 1.0)
        rows.append({"model": name, "windows": n, "perplexity": ppl, "ratio": ratio, "ci95": [lo, hi]})
        print(f"| {name} | {n} | {ppl:.2f} | {ratio:.3f} | {lo:.3f} - {hi:.3f} |")
    if args.out:
        args.out.write_text(json.dumps({"reference": ref_name, "text": args.text, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
