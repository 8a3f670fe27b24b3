import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from se_export.errors import SEError
from se_export.method.router import fit_router, pca


def _blobs(n_per: int, k: int, dim: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(k, dim, generator=gen) * 6
    return torch.cat([c + torch.randn(n_per, dim, generator=gen) for c in centers])


@settings(max_examples=15, deadline=None)
@given(k=st.integers(1, 6), dim=st.integers(4, 40), factor=st.sampled_from([0, 2, 4]), seed=st.integers(0, 999))
def test_fold_equals_pca_nearest_centroid(k, dim, factor, seed):
    x = _blobs(40, k, dim, seed)
    router, labels, report = fit_router(x, k, pca_factor=factor, seed=seed, min_cluster_tokens=1)
    g, b = router.fold()
    # independent recomputation: explicit distances in PCA space, in float64
    z = (x.double() - router.mean.double()) @ router.projection.double()
    d = torch.cdist(z, router.centroids.double())
    explicit = d.argmin(1)
    top2 = d.topk(2, largest=False).values if d.shape[1] > 1 else None
    clear = torch.ones_like(explicit, dtype=torch.bool) if top2 is None else (top2[:, 1] - top2[:, 0]) > 1e-3
    assert torch.equal(labels[clear], explicit[clear])
    assert torch.equal(torch.argmin(x @ g + b, 1)[clear], explicit[clear])
    assert sum(report.cluster_sizes) == x.shape[0]


def test_pca_matches_svd():
    x = torch.randn(300, 12) @ torch.randn(12, 12)
    mean, proj = pca(x, 3)
    _, _, vh = torch.linalg.svd((x - x.mean(0)).double(), full_matrices=False)
    for j in range(3):
        assert abs(float(proj[:, j].double() @ vh[j])) == pytest.approx(1.0, abs=1e-4)
    assert torch.allclose(mean, x.mean(0), atol=1e-5)


def test_kmeans_recovers_separated_blobs_and_is_seeded():
    x = _blobs(100, 4, 16, 0)
    _, labels, _ = fit_router(x, 4, pca_factor=0, seed=3, min_cluster_tokens=1)
    for blob in labels.view(4, 100):
        assert blob.unique().numel() == 1
    _, again, _ = fit_router(x, 4, pca_factor=0, seed=3, min_cluster_tokens=1)
    assert torch.equal(labels, again)


def test_outliers_do_not_capture_centroids():
    x = _blobs(200, 2, 16, 1)
    x[:5] *= 200  # attention-sink-like tokens
    _router, _labels, report = fit_router(x, 2, pca_factor=0, seed=0, min_cluster_tokens=1)
    assert report.outliers_excluded == 5
    assert sorted(report.cluster_sizes)[0] >= 195  # both blobs keep a centroid


def test_small_clusters_are_merged_and_reported():
    x = torch.cat([_blobs(300, 2, 8, 2), torch.randn(6, 8) * 0.1 + 40])
    router, labels, report = fit_router(x, 3, pca_factor=0, seed=0, min_cluster_tokens=50,
                                        outlier_factor=1e9)
    assert report.clusters_merged >= 1
    assert report.experts == router.num_experts < 3
    assert min(report.cluster_sizes) >= 50
    assert int(labels.max()) < router.num_experts


def test_more_experts_than_tokens_is_a_clear_error():
    with pytest.raises(SEError, match="larger than the 5 calibration tokens"):
        fit_router(torch.randn(5, 8), 16)


def test_pca_without_outliers_from_the_gram_matrix_equals_pca_of_the_inliers():
    """The Gram path subtracts the dropped rows instead of copying the inliers; same router."""
    x = _blobs(150, 3, 24, 4)
    x[:4] *= 300
    drop = torch.zeros(x.shape[0], dtype=torch.bool)
    drop[:4] = True
    gram = x.double().t() @ x.double()
    mean_a, proj_a = pca(x, 5, gram, drop=drop)
    mean_b, proj_b = pca(x[~drop], 5)
    assert torch.allclose(mean_a, mean_b, atol=1e-4)
    assert torch.allclose(proj_a, proj_b, atol=1e-3)
    _, labels_a, rep_a = fit_router(x, 3, pca_factor=4, seed=1, min_cluster_tokens=1, gram=gram)
    _, labels_b, rep_b = fit_router(x, 3, pca_factor=4, seed=1, min_cluster_tokens=1)
    assert rep_a.outliers_excluded == rep_b.outliers_excluded == 4
    assert torch.equal(labels_a, labels_b)
