"""bench/zero_point.py's asymmetric int4 grid against a float64 reference: 16 levels from each
group's smallest to its largest kept weight, pruned weights left out and kept at zero."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

_spec = importlib.util.spec_from_file_location("zero_point", Path(__file__).resolve().parents[2] / "bench" / "zero_point.py")
zero_point = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(zero_point)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), rows=st.integers(1, 6), cols=st.integers(1, 70), group=st.integers(1, 40),
       density=st.floats(0.05, 1.0))
def test_zero_point_grid_matches_a_float64_reference(seed, rows, cols, group, density):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen) * 3 + torch.rand(rows, 1, generator=gen)
    keep = torch.rand(rows, cols, generator=gen) < density
    got = zero_point.with_zero_point(w, keep, group)
    expect = torch.zeros(rows, cols, dtype=torch.float64)
    for r in range(rows):
        for g0 in range(0, cols, group):
            cols_g = [c for c in range(g0, min(cols, g0 + group)) if keep[r, c]]
            if not cols_g:
                continue
            vals = w[r, cols_g].double()
            scale = float(torch.tensor((float(vals.max()) - float(vals.min())) / 15).half())
            scale = scale if scale > 0 else 1.0
            zero = min(15.0, max(0.0, round(-float(vals.min()) / scale)))
            for c in cols_g:
                q = min(15.0, max(0.0, round(float(w[r, c]) / scale) + zero))
                expect[r, c] = (q - zero) * scale
    assert torch.allclose(got.double(), expect, rtol=0, atol=1e-6)
    assert torch.all(got[~keep] == 0)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), rows=st.integers(1, 5), cols=st.integers(1, 70), group=st.integers(1, 40),
       density=st.floats(0.05, 1.0))
def test_symmetric_and_full_range_grids_match_float64_references(seed, rows, cols, group, density):
    """The older symmetric grid ([-7, 7], largest |w| over 7) and the full-range one ([-8, 7], the
    largest-magnitude weight is code -8), each recomputed group by group in float64."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen) * 2
    keep = torch.rand(rows, cols, generator=gen) < density
    got = {"symmetric": zero_point.symmetric(w, keep, group), "full": zero_point.full_range(w, keep, group)}
    expect = {name: torch.zeros(rows, cols, dtype=torch.float64) for name in got}
    for r in range(rows):
        for g0 in range(0, cols, group):
            cols_g = [c for c in range(g0, min(cols, g0 + group)) if keep[r, c]]
            if not cols_g:
                continue
            vals = [float(w[r, c]) for c in cols_g]
            peak = max(vals, key=abs)
            sym = float(torch.tensor(abs(peak) / 7).half()) or 1.0
            full = float(torch.tensor(peak / -8).half()) or 1.0
            for c, v in zip(cols_g, vals, strict=True):
                expect["symmetric"][r, c] = min(7, max(-7, round(v / sym))) * sym
                expect["full"][r, c] = min(7, max(-8, round(v / full))) * full
    for name in got:
        assert torch.allclose(got[name].double(), expect[name], rtol=0, atol=1e-6), name
