"""The quality benchmark script (bench/quality.py): the locks that let several workers share one
grid, the worker command line, and how grid points are labelled and keyed."""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest

from se_export.eval.stats import claim_check


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
    claim = claim_check([seeded, *rows])
    assert claim["rows"][0]["ratio"] == pytest.approx(math.exp(-0.2))  # the seed-0 row, not the seeded one


def test_quantized_rows_get_their_own_labels_and_keys_and_fp16_keys_do_not_move(quality):
    """Rows cached before value precisions were a grid field keep their keys: the key of an fp16
    configuration is the hash of the fields it had then."""
    import hashlib
    import json

    fp16 = quality.Config("se", "0.5", 16)
    old_fields = {"method": "se", "sparsity": "0.5", "experts": 16, "pca_factor": 32, "true_sequential": True,
                  "calib_samples": 128, "seqlen": 512, "seed": 0}
    blob = json.dumps({"config": old_fields, "eval": {}}, sort_keys=True)
    assert quality.cache_key(fp16, {}) == hashlib.sha256(blob.encode()).hexdigest()[:16]
    grid = quality.quant_grid()
    labels = [c.label for c in grid]
    assert len(set(labels)) == len(labels) == len({quality.cache_key(c, {}) for c in grid})
    assert {"se K=16 @ 0.5 int4", "se K=16 @ 0.5 int4 RTN", "dense int4 (GPTQ)", "dense int4 (RTN)"} <= set(labels)
    assert quality.Config("se", "0.5", 16, value_dtype="int4", group_size=128).label == "se K=16 @ 0.5 int4 G128"


def test_bytes_read_per_token_of_a_row_cached_without_them(quality):
    """One expert's share of the stored bytes plus the router's: what a token reads."""
    cached = {"config": {"experts": 16}, "stored_mlp_bytes": 1600, "router_bytes": 7}
    assert quality.read_bytes(cached) == 107
    assert quality.read_bytes({**cached, "read_mlp_bytes_per_token": 5}) == 5
