"""Statistics of perplexity comparisons: the paired bootstrap interval, the gap-to-dense figure and
the paper's claim with its verdicts, on rows whose answer is known exactly."""

from __future__ import annotations

import math
import random

import pytest

from se_export.eval.stats import claim_check, claim_table, gap_closed, paired_ratio_ci


def row(method: str, sparsity: str, nll: list[float], experts: int = 1) -> dict:
    mean = sum(nll) / len(nll)
    label = f"se K={experts} @ {sparsity}" if method == "se" else f"{method} @ {sparsity}"
    return {"label": label, "config": {"method": method, "sparsity": sparsity, "experts": experts},
            "wikitext2": {"perplexity": math.exp(mean), "window_nll": nll}}


def test_paired_interval_of_a_constant_shift_is_exact():
    rng = random.Random(0)
    b = [rng.uniform(3, 9) for _ in range(50)]
    a = [v - 0.25 for v in b]  # every window 0.25 nats better: ppl ratio exp(-0.25) whatever is resampled
    lo, hi = paired_ratio_ci(a, b)
    assert lo == pytest.approx(math.exp(-0.25)) and hi == pytest.approx(math.exp(-0.25))


def test_interval_covers_the_ratio_and_widens_with_noise():
    rng = random.Random(1)
    b = [rng.uniform(3, 9) for _ in range(200)]
    a = [v - 0.1 + rng.gauss(0, 0.3) for v in b]
    ratio = math.exp(sum(a) / len(a) - sum(b) / len(b))
    lo, hi = paired_ratio_ci(a, b)
    assert lo < ratio < hi and hi - lo > 0.01


def test_claim_verdicts():
    base = [5.0, 6.0, 7.0, 8.0]
    rows = [row("sparsegpt", "0.5", base), row("se", "0.5", [v - 0.1 for v in base], 16),
            row("sparsegpt", "0.7", base), row("se", "0.7", [v - 0.3 for v in base], 16),
            row("sparsegpt", "0.9", base), row("se", "0.9", [v + 0.2 for v in base], 16),
            row("se", "0.9", base, 8)]  # other K: not part of the claim
    claim = claim_check(rows)
    assert [r["sparsity"] for r in claim["rows"]] == ["0.5", "0.7", "0.9"]
    assert claim["se16_better_at_0.7"] is True
    assert claim["se16_better_at_0.9"] is False
    assert claim["gap_at_0.9_larger_than_at_0.5"] is False
    assert claim["rows"][1]["ratio"] == pytest.approx(math.exp(-0.3))
    table = claim_table(claim)
    assert "se16_better_at_0.9: no" in table and "0.741" in table


def test_gap_closed_measures_the_distance_to_dense():
    assert gap_closed(30.0, 270.0, 150.0) == pytest.approx(0.5)
    assert gap_closed(30.0, 270.0, 30.0) == pytest.approx(1.0)
    assert gap_closed(30.0, 270.0, 300.0) < 0


def test_claim_reports_the_gap_closed_when_dense_is_given():
    base = [5.0, 6.0, 7.0, 8.0]
    rows = [row("sparsegpt", "0.7", base), row("se", "0.7", [v - 0.3 for v in base], 16)]
    claim = claim_check(rows, dense=math.exp(4.0))
    sg, se = rows[0]["wikitext2"]["perplexity"], rows[1]["wikitext2"]["perplexity"]
    assert claim["rows"][0]["gap_closed"] == pytest.approx((sg - se) / (sg - math.exp(4.0)))
    assert "gap to dense closed" in claim_table(claim)
    assert "gap to dense closed" not in claim_table(claim_check(rows))
