import math

import pytest
import torch
from conftest import build_tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import wasserstein_distance

from se_export.data import Text, calibration_windows, tokenize
from se_export.eval.analyze import analyze_model
from se_export.eval.wasserstein import (
    NeuronStats,
    mapping_difficulty,
    wasserstein_between,
    wasserstein_to_normal,
)


def _scipy_wd_to_normal(sample: torch.Tensor) -> float:
    z = (sample.double() - sample.double().mean()) / sample.double().std(correction=0)
    normal = torch.special.ndtri((torch.arange(200_000, dtype=torch.float64) + 0.5) / 200_000)
    return wasserstein_distance(z.numpy(), normal.numpy())


def test_normal_samples_are_near_zero():
    gen = torch.Generator().manual_seed(0)
    wd = wasserstein_to_normal(torch.randn(20_000, 4, generator=gen))
    assert torch.all(wd < 0.02)


@pytest.mark.parametrize("kind", ["bimodal", "heavy", "exponential"])
def test_non_gaussian_samples_are_far_and_match_scipy(kind):
    gen = torch.Generator().manual_seed(1)
    n = 20_000
    if kind == "bimodal":
        x = torch.cat([torch.randn(n // 2, generator=gen) - 4, torch.randn(n // 2, generator=gen) + 4])
    elif kind == "heavy":
        x = torch.distributions.StudentT(1.5).sample((n,))
    else:
        x = torch.empty(n).exponential_(generator=gen)
    ours = float(wasserstein_to_normal(x.unsqueeze(1))[0])
    assert ours > 0.1
    assert ours == pytest.approx(_scipy_wd_to_normal(x), abs=2e-3)


@settings(max_examples=20, deadline=None)
@given(scale=st.floats(1e-3, 1e3), shift=st.floats(-1e3, 1e3), seed=st.integers(0, 999))
def test_standardization_makes_wd_affine_invariant(scale, shift, seed):
    x = torch.empty(3000, 3).exponential_(generator=torch.Generator().manual_seed(seed)).double()
    assert torch.allclose(wasserstein_to_normal(x), wasserstein_to_normal(x * scale + shift), atol=1e-6)


def test_constant_neuron_is_the_distance_from_a_point_mass():
    assert float(wasserstein_to_normal(torch.ones(1000, 1))[0]) == pytest.approx(math.sqrt(2 / math.pi), abs=1e-3)


@settings(max_examples=15, deadline=None)
@given(sizes=st.lists(st.integers(1, 300), min_size=1, max_size=6), seed=st.integers(0, 999))
def test_streaming_over_chunks_equals_one_shot(sizes, seed):
    data = torch.randn(sum(sizes), 5, generator=torch.Generator().manual_seed(seed)) ** 3
    stats = NeuronStats(5, data.shape[0])
    for chunk in data.split(sizes):
        stats.update(chunk)
    streamed = stats.finalize()
    assert torch.equal(streamed["wd"], wasserstein_to_normal(data).float())
    assert torch.allclose(streamed["mean"], data.mean(0), atol=1e-5)


def test_two_sample_distance_and_mapping_difficulty():
    a = torch.randn(1000)
    assert wasserstein_between(a, a + 0.5) == pytest.approx(0.5)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 3, generator=gen)
    smooth = x @ torch.randn(3, 1, generator=gen)
    # a neuron whose output depends on a hash of the input maps close inputs far apart
    scrambled = torch.sin(1000 * x[:, :1]) * 5
    md = mapping_difficulty(x, torch.cat([smooth, scrambled], 1), pairs=1000, pool=4000)
    assert md[0] < 0.2 < 0.8 < md[1]
    assert torch.allclose(mapping_difficulty(3 * x + 1, torch.cat([smooth, scrambled], 1) * 7, pairs=1000, pool=4000), md)


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_analyze_runs_on_tiny_models(family, tiny_tokenizer, calib_file):
    model = build_tiny_model(family, tiny_tokenizer)
    windows = calibration_windows(tokenize(tiny_tokenizer, Text("c", calib_file.read_text())), 4, 32, 0)
    results, kept = analyze_model(model, windows, top=0.05, show_progress=False, keep_inputs="max_wd")
    assert len(results) == 3
    layer = next(iter(kept))
    assert float(results[layer].wd.max()) == max(float(r.wd.max()) for r in results)
    for r in results:
        assert r.wd.shape == r.md.shape == (model.config.intermediate_size,)
        assert torch.all(r.wd >= 0)
        assert len(r.top) == round(0.05 * model.config.intermediate_size)
        assert float(r.wd[r.top].min()) >= float(torch.sort(r.wd).values[-len(r.top)])


@settings(max_examples=30, deadline=None)
@given(scores=st.lists(st.floats(0.0, 10.0), min_size=1, max_size=40), experts=st.integers(1, 32))
def test_allocation_keeps_the_budget_and_bounds(scores, experts):
    from se_export.method.allocation import allocate_experts

    counts = allocate_experts(scores, experts)
    assert sum(counts) == experts * len(scores)
    assert all(1 <= c <= 4 * experts for c in counts)


def test_allocation_follows_the_scores():
    from se_export.method.allocation import allocate_experts, layer_scores

    counts = allocate_experts([1.0, 2.0, 1.0, 4.0], 8)
    assert counts[3] > counts[1] > max(counts[0], counts[2]) and abs(counts[0] - counts[2]) <= 1
    wds = [torch.tensor([0.1, 0.2, 0.9]), torch.tensor([0.1, 0.1, 0.1])]
    assert layer_scores(wds, top=0.34) == pytest.approx([0.9, 0.1])
