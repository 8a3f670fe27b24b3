"""The quality benchmark: its claim check (paired bootstrap interval, the verdicts it prints) and
the locks that let several workers share one grid."""

from __future__ import annotations

import importlib.util
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def quality():
    spec = importlib.util.spec_from_file_location("quality_bench", Path(__file__).parents[2] / "bench" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["quality_bench"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules["quality_bench"]


def row(method: str, sparsity: str, nll: list[float], experts: int = 1) -> dict:
    mean = sum(nll) / len(nll)
    label = f"se K={experts} @ {sparsity}" if method == "se" else f"{method} @ {sparsity}"
    return {"label": label, "config": {"method": method, "sparsity": sparsity, "experts": experts},
            "wikitext2": {"perplexity": math.exp(mean), "window_nll": nll}}


def test_paired_interval_of_a_constant_shift_is_exact(quality):
    rng = random.Random(0)
    b = [rng.uniform(3, 9) for _ in range(50)]
    a = [v - 0.25 for v in b]  # every window 0.25 nats better: ppl ratio exp(-0.25) whatever is resampled
    lo, hi = quality.paired_ratio_ci(a, b)
    assert lo == pytest.approx(math.exp(-0.25)) and hi == pytest.approx(math.exp(-0.25))


def test_interval_covers_the_ratio_and_widens_with_noise(quality):
    rng = random.Random(1)
    b = [rng.uniform(3, 9) for _ in range(200)]
    a = [v - 0.1 + rng.gauss(0, 0.3) for v in b]
    ratio = math.exp(sum(a) / len(a) - sum(b) / len(b))
    lo, hi = quality.paired_ratio_ci(a, b)
    assert lo < ratio < hi and hi - lo > 0.01


def test_claim_verdicts(quality):
    base = [5.0, 6.0, 7.0, 8.0]
    rows = [row("sparsegpt", "0.5", base), row("se", "0.5", [v - 0.1 for v in base], 16),
            row("sparsegpt", "0.7", base), row("se", "0.7", [v - 0.3 for v in base], 16),
            row("sparsegpt", "0.9", base), row("se", "0.9", [v + 0.2 for v in base], 16),
            row("se", "0.9", base, 8)]  # other K: not part of the claim
    claim = quality.claim_check(rows)
    assert [r["sparsity"] for r in claim["rows"]] == ["0.5", "0.7", "0.9"]
    assert claim["se16_better_at_0.7"] is True
    assert claim["se16_better_at_0.9"] is False
    assert claim["gap_at_0.9_larger_than_at_0.5"] is False
    assert claim["rows"][1]["ratio"] == pytest.approx(math.exp(-0.3))
    table = quality.claim_table(claim)
    assert "se16_better_at_0.9: no" in table and "0.741" in table


LOCK_HOLDER = """
import fcntl, sys, time
handle = open(sys.argv[1], "a")
fcntl.flock(handle, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(60)
"""


def test_a_grid_point_runs_in_one_worker_at_a_time(quality, tmp_path, monkeypatch):
    monkeypatch.setattr(quality, "WORK", tmp_path)
    with quality.config_lock("a") as first, quality.config_lock("a") as second, quality.config_lock("b") as other:
        assert (first, second, other) == (True, False, True)
    with quality.config_lock("a") as again:
        assert again  # released on exit

    # held by another live process: refused; once that process is killed (no unlock): free again
    (tmp_path / "locks").mkdir(exist_ok=True)
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(tmp_path / "locks" / "c.lock")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with quality.config_lock("c") as mine:
            assert not mine
    finally:
        holder.kill()
        holder.wait()
    with quality.config_lock("c") as mine:
        assert mine


def test_worker_command_forwards_the_grid_and_splits_the_threads(quality):
    cmd = quality.worker_command(["--grid", "main", "--jobs", "2", "--only", "se K=2", "--jobs=3",
                                  "--eval-windows", "0"], threads=1)
    assert cmd[0] == sys.executable and cmd[1].endswith("quality.py")
    assert cmd[2:] == ["--grid", "main", "--only", "se K=2", "--eval-windows", "0",
                       "--threads", "1", "--quiet", "--no-report"]


def test_a_seed_row_is_labelled_and_kept_out_of_the_claim(quality):
    cfg = quality.Config("se", "0.9", 16, seed=1)
    assert cfg.label == "se K=16 @ 0.9 (seed=1)"
    assert quality.cache_key(cfg, {}) != quality.cache_key(quality.Config("se", "0.9", 16), {})
    base = [5.0, 6.0]
    rows = [row("sparsegpt", "0.9", base), row("se", "0.9", [v - 0.2 for v in base], 16)]
    seeded = row("se", "0.9", [v + 1.0 for v in base], 16)
    seeded["label"] = cfg.label
    claim = quality.claim_check([seeded, *rows])
    assert claim["rows"][0]["ratio"] == pytest.approx(math.exp(-0.2))  # the seed-0 row, not the seeded one
