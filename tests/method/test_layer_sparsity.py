"""OWL per-layer sparsity and the Hessian prior: allocations against float64 recomputations, and
expansions that keep exactly the allocated weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import build_tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st

from se_export.adapters import adapter_for, decoder_layers
from se_export.data import Text, calibration_windows, tokenize
from se_export.errors import SEError
from se_export.method.expand import ExpandConfig, expand_model
from se_export.method.layer_sparsity import mlp_input_sq_norms, outlier_ratio, owl_sparsities
from se_export.method.sparsegpt import ClusterHessians
from se_export.modeling.modules import RoutedSparseLinear


@pytest.fixture(scope="module")
def calib(tiny_tokenizer, calib_file):
    ids = tokenize(tiny_tokenizer, Text("calib", calib_file.read_text()))
    return calibration_windows(ids, 12, 48, seed=0)


@settings(max_examples=60, deadline=None)
@given(ratios=st.lists(st.floats(0, 0.2), min_size=1, max_size=12), target=st.floats(0.3, 0.85),
       lam=st.floats(0.01, 0.1), seed=st.integers(0, 2**16))
def test_owl_keeps_the_total_and_spreads_densities_by_outlier_ratio(ratios, target, lam, seed):
    sizes = np.random.default_rng(seed).integers(1, 1000, len(ratios)).tolist()
    s = np.array(owl_sparsities(ratios, sizes, target, lam))
    w = np.array(sizes, dtype=np.float64)
    assert abs((s * w).sum() / w.sum() - target) < 1e-9  # the same kept weights as uniform
    r = np.array(ratios)
    if r.max() - r.min() > 1e-12:
        assert abs((s.max() - s.min()) - 2 * lam) < 1e-9
        # more outliers, more kept weights: the order of sparsities reverses the order of ratios
        assert np.all(np.diff(s[np.argsort(r, kind="stable")]) <= 1e-12)
    else:
        assert np.allclose(s, target)


def test_owl_refuses_a_spread_outside_zero_to_one():
    with pytest.raises(SEError, match="--owl-lambda"):
        owl_sparsities([0.0, 0.1], [1, 1], 0.95, 0.1)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), threshold=st.sampled_from([2.0, 3.0, 5.0]))
def test_outlier_ratio_matches_a_float64_count(seed, threshold):
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(6, 5, generator=g) ** 3, torch.randn(4, 7, generator=g)]
    norms = [torch.rand(5, generator=g) * 10, torch.rand(7, generator=g)]
    scores = np.concatenate([(np.abs(w.double().numpy()) * np.sqrt(n.double().numpy())[None]).ravel()
                             for w, n in zip(weights, norms, strict=True)])
    assert outlier_ratio(weights, norms, threshold) == pytest.approx((scores > threshold * scores.mean()).mean())


def test_input_norms_are_the_sums_of_squares_each_linear_receives(tiny_tokenizer, calib):
    model = build_tiny_model("llama", tiny_tokenizer)
    adapter = adapter_for(model.config)
    layers = decoder_layers(model, adapter)
    sums = mlp_input_sq_norms(model, layers, adapter, calib, 4)
    seen: list[torch.Tensor] = []
    down = layers[1].get_submodule(adapter.groups[-1][0])
    handle = down.register_forward_pre_hook(lambda _m, a: seen.append(a[0].detach().reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        model(calib, use_cache=False)
    handle.remove()
    expect = torch.cat(seen).double().square().sum(0)
    torch.testing.assert_close(sums[1][-1], expect, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("method", ["se", "sparsegpt"])
def test_owl_expansion_keeps_each_layers_allocation_and_the_total(method, tiny_tokenizer, calib):
    model = build_tiny_model("llama", tiny_tokenizer)
    cfg = ExpandConfig(method=method, experts=4 if method == "se" else 1, sparsity="0.6", min_cluster_tokens=8,
                       batch_size=4, layer_sparsity="owl", owl_lambda=0.1)
    result = expand_model(model, calib, cfg, show_progress=False)
    targets = result.layer_sparsity
    assert len(set(round(s, 9) for s in targets.values())) > 1
    adapter = adapter_for(model.config)
    kept = total = 0
    for index, layer in enumerate(decoder_layers(model, adapter)):
        mods = [m for m in layer.modules() if isinstance(m, RoutedSparseLinear)]
        for m in mods:
            per_expert = m.values.numel() / m.num_experts
            # SparseGPT prunes round(fraction * row segment) per expert: within a row's rounding
            assert abs(1 - per_expert / (m.out_features * m.in_features) - targets[index]) <= 1 / m.in_features
            kept += per_expert
            total += m.out_features * m.in_features
        assert result.layers[index]["target_sparsity"] == pytest.approx(targets[index])
    assert abs(1 - kept / total - 0.6) < 0.01


def test_owl_refuses_n_m_and_data_free_methods(tiny_tokenizer, calib):
    model = build_tiny_model("llama", tiny_tokenizer)
    with pytest.raises(SEError, match="unstructured"):
        expand_model(model, calib, ExpandConfig(sparsity="2:4", layer_sparsity="owl"), show_progress=False)
    with pytest.raises(SEError, match="calibration"):
        expand_model(model, None, ExpandConfig(method="magnitude", experts=1, layer_sparsity="owl"),
                     show_progress=False)
    with pytest.raises(SEError, match="--layer-sparsity"):
        ExpandConfig(layer_sparsity="outliers").check()


def _clusters(seed: int, n: int, d: int, k: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) * torch.rand(d, generator=g)
    labels = torch.randint(0, k, (n,), generator=g)
    return x, labels


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), prior=st.integers(1, 200))
def test_hessian_prior_is_the_cluster_hessian_with_prior_tokens_of_the_pooled_one(seed, prior):
    x, labels = _clusters(seed, 120, 6, 3)
    labels[labels == 2] = 1  # an empty cluster: expert 2
    h = ClusterHessians(x, labels, 3, prior_tokens=prior).hessians([0, 1, 2]).double()
    xd = x.double()
    pooled = xd.t() @ xd / xd.shape[0]
    for k in range(3):
        xk = xd[labels == k]
        expect = 2 * (xk.t() @ xk + prior * pooled) / (xk.shape[0] + prior)
        torch.testing.assert_close(h[k], expect, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h[2], 2 * pooled, rtol=1e-5, atol=1e-5)  # empty: the pooled Hessian


def test_hessian_prior_vanishes_for_a_huge_cluster_and_off_equals_plain():
    x, labels = _clusters(3, 4000, 5, 2)
    plain = ClusterHessians(x, labels, 2).hessians([0, 1]).double()
    tiny_prior = ClusterHessians(x, labels, 2, prior_tokens=1).hessians([0, 1]).double()
    torch.testing.assert_close(tiny_prior, plain, rtol=2e-3, atol=2e-3)
    total = (x.double().t() @ x.double())
    with_total = ClusterHessians(x, labels, 2, total=total, prior_tokens=0).hessians([0, 1]).double()
    torch.testing.assert_close(with_total, plain, rtol=1e-5, atol=1e-5)


def test_hessian_prior_changes_the_experts_not_the_first_router(tiny_tokenizer, calib):
    plain_model = build_tiny_model("llama", tiny_tokenizer)
    expand_model(plain_model, calib, ExpandConfig(experts=4, min_cluster_tokens=8, batch_size=4), show_progress=False)
    model = build_tiny_model("llama", tiny_tokenizer)
    expand_model(model, calib, ExpandConfig(experts=4, min_cluster_tokens=8, batch_size=4, hessian_prior=1.0),
                 show_progress=False)
    a = [m for m in plain_model.modules() if isinstance(m, RoutedSparseLinear)]
    b = [m for m in model.modules() if isinstance(m, RoutedSparseLinear)]
    assert any(not torch.equal(p.values, q.values) for p, q in zip(a, b, strict=True))
    # layer 0's first router is fit before any Hessian: the prior changes its experts, not its routing
    assert torch.equal(a[0].router_weight, b[0].router_weight) and not torch.equal(a[0].values, b[0].values)
    with pytest.raises(SEError, match="--hessian-prior"):
        ExpandConfig(hessian_prior=-1).check()
