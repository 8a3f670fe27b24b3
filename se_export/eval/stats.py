"""Statistics of perplexity comparisons: paired intervals over windows and the paper's claim.

Two models evaluated on the same windows are compared per window (paired), so the interval
reflects how consistently one beats the other, not how much the windows differ from each other.
"""

from __future__ import annotations

import numpy as np

CLAIM_SPARSITIES = ("0.5", "0.7", "0.9", "2:4")


def paired_ratio_ci(nll_a: list[float], nll_b: list[float], resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% bootstrap interval of ppl(a) / ppl(b) over windows resampled in pairs (same text)."""
    a, b = np.asarray(nll_a), np.asarray(nll_b)
    idx = np.random.default_rng(seed).integers(0, len(a), size=(resamples, len(a)))
    ratios = np.exp(a[idx].mean(axis=1) - b[idx].mean(axis=1))
    return float(np.quantile(ratios, 0.025)), float(np.quantile(ratios, 0.975))


def gap_closed(dense: float, baseline: float, candidate: float) -> float:
    """Share of the baseline's distance to dense that the candidate closes (perplexities; 1: as
    good as dense, 0: no better than the baseline, negative: worse than it)."""
    return (baseline - candidate) / (baseline - dense)


def claim_check(rows: list[dict], dense: float | None = None) -> dict:
    """The paper's claim on grid rows: SE K=16 vs SparseGPT at every sparsity, with a paired CI
    (rows with an ablation or seed in their label are not part of it). With ``dense``'s
    perplexity, each row also says how much of SparseGPT's gap to dense SE closes."""
    def find(method: str, experts: int, sparsity: str) -> dict | None:
        return next((r for r in rows if r["label"].count("(") == 0 and r["config"]["method"] == method
                     and r["config"]["experts"] == experts and r["config"]["sparsity"] == sparsity), None)

    out: dict = {"rows": []}
    for sp in CLAIM_SPARSITIES:
        se, sg = find("se", 16, sp), find("sparsegpt", 1, sp)
        if not (se and sg):
            continue
        row = {"sparsity": sp, "sparsegpt": sg["wikitext2"]["perplexity"], "se16": se["wikitext2"]["perplexity"]}
        row["ratio"] = row["se16"] / row["sparsegpt"]
        row["relative_gap"] = 1 - row["ratio"]
        if dense is not None:
            row["gap_closed"] = gap_closed(dense, row["sparsegpt"], row["se16"])
        a, b = se["wikitext2"].get("window_nll"), sg["wikitext2"].get("window_nll")
        if a and b and len(a) == len(b):
            row["ratio_ci95"] = paired_ratio_ci(a, b)
        out["rows"].append(row)
    by = {r["sparsity"]: r for r in out["rows"]}
    for sp in ("0.7", "0.9"):
        if sp in by:
            out[f"se16_better_at_{sp}"] = by[sp]["ratio"] < 1
    if "0.9" in by and "0.5" in by:
        out["gap_at_0.9_larger_than_at_0.5"] = by["0.9"]["relative_gap"] > by["0.5"]["relative_gap"]
    return out


def claim_table(claim: dict) -> str:
    """The claim as a Markdown table followed by its verdicts."""
    gap = any("gap_closed" in r for r in claim["rows"])
    lines = ["| sparsity | SparseGPT ppl | SE K=16 ppl | SE / SparseGPT | 95% CI (paired bootstrap) | relative gap |"
             + (" gap to dense closed |" if gap else ""),
             "|---|---:|---:|---:|---|---:|" + ("---:|" if gap else "")]
    for r in claim["rows"]:
        ci = r.get("ratio_ci95")
        closed = f" {r['gap_closed']:.0%} |" if gap else ""
        lines.append(f"| {r['sparsity']} | {r['sparsegpt']:.2f} | {r['se16']:.2f} | {r['ratio']:.3f} | "
                     f"{f'{ci[0]:.3f} - {ci[1]:.3f}' if ci else '-'} | {r['relative_gap']:.1%} |{closed}")
    verdicts = [f"{k}: {'yes' if v else 'no'}" for k, v in claim.items() if k != "rows"]
    return "\n".join(lines) + ("\n\n" + "; ".join(verdicts) if verdicts else "")
