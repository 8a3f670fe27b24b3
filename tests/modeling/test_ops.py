import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import se_export.modeling.ops  # noqa: F401  (registers se::routed_sparse_matmul)
from se_export.formats.sparse_format import pack_experts
from se_export.modeling.modules import RoutedSparseLinear, decoded_expert_cache, golden_reference


def _case(batch_shape, k, out, inn, density, fmt, with_bias, seed, value_dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    dense = torch.randn(k, out, inn, generator=gen)
    mask = torch.rand(k, out, inn, generator=gen) < density
    packed = pack_experts(dense, mask, fmt, value_dtype)
    g = torch.randn(inn, k, generator=gen)
    b = torch.randn(k, generator=gen)
    bias = torch.randn(k, out, generator=gen) if with_bias else None
    x = torch.randn(*batch_shape, inn, generator=gen)
    return packed, g, b, bias, x


def reference(x, g, b, weights, bias):
    """Per-token float64 reference: pick the expert, multiply by its dense weight."""
    flat = x.reshape(-1, x.shape[-1]).double()
    ids = torch.argmin(flat @ g.double() + b.double(), 1)
    rows = []
    for t in range(flat.shape[0]):
        y = weights[ids[t]].double() @ flat[t]
        if bias is not None:
            y = y + bias[ids[t]].double()
        rows.append(y)
    y = torch.stack(rows) if rows else torch.zeros(0, weights.shape[1], dtype=torch.float64)
    return y.reshape(*x.shape[:-1], weights.shape[1]), ids.reshape(x.shape[:-1])


@settings(max_examples=40, deadline=None)
@given(batch_shape=st.lists(st.integers(0, 5), min_size=1, max_size=3), k=st.integers(1, 5),
       out=st.integers(1, 20), inn=st.integers(1, 40), density=st.floats(0, 1),
       fmt=st.sampled_from(["bitmap", "csr16"]), with_bias=st.booleans(), seed=st.integers(0, 9999))
def test_routed_op_equals_float64_per_token_reference(batch_shape, k, out, inn, density, fmt, with_bias, seed):
    packed, g, b, bias, x = _case(tuple(batch_shape), k, out, inn, density, fmt, with_bias, seed)
    y, ids = torch.ops.se.routed_sparse_matmul(x, g, b, packed.values, packed.indices, packed.row_ptr,
                                               bias, None, out, packed.format)
    ref_y, ref_ids = reference(x, g, b, packed.unpack(torch.float32), bias)
    assert y.shape == (*batch_shape, out) and y.dtype == x.dtype
    assert ids.dtype == torch.int32 and torch.equal(ids.long(), ref_ids)
    assert torch.allclose(y.double(), ref_y, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_route_in_fp32_and_return_their_dtype(dtype):
    packed, g, b, bias, x = _case((3, 7), 4, 16, 32, 0.5, "bitmap", True, 0, value_dtype=dtype)
    xh = x.to(dtype)
    y, ids = torch.ops.se.routed_sparse_matmul(xh, g, b, packed.values, packed.indices, packed.row_ptr,
                                               bias, None, 16, "bitmap")
    ref_y, ref_ids = reference(xh.float(), g, b, packed.unpack(torch.float32), bias)
    assert y.dtype == dtype
    assert torch.equal(ids.long(), ref_ids)
    tol = 1e-2 if dtype == torch.float16 else 5e-2
    assert torch.allclose(y.double(), ref_y, atol=tol * ref_y.abs().max(), rtol=tol)


def test_given_expert_ids_skip_routing_and_are_checked():
    packed, g, b, _bias, x = _case((2, 5), 3, 8, 12, 0.5, "csr16", False, 1)
    ids = torch.tensor([[0, 1, 2, 2, 1], [0, 0, 0, 0, 0]], dtype=torch.int32)
    y, out_ids = torch.ops.se.routed_sparse_matmul(x, g, b, packed.values, packed.indices, packed.row_ptr,
                                                   None, ids, 8, "csr16")
    weights = packed.unpack(torch.float32)
    for i in range(2):
        for t in range(5):
            assert torch.allclose(y[i, t], weights[ids[i, t]] @ x[i, t], atol=1e-5)
    assert torch.equal(out_ids, ids)
    with pytest.raises(ValueError, match="outside"):
        torch.ops.se.routed_sparse_matmul(x, g, b, packed.values, packed.indices, packed.row_ptr,
                                          None, ids + 5, 8, "csr16")


def test_op_passes_torch_library_opcheck():
    packed, g, b, bias, x = _case((2, 6), 3, 8, 16, 0.5, "bitmap", True, 2)
    torch.library.opcheck(torch.ops.se.routed_sparse_matmul.default,
                          (x, g, b, packed.values, packed.indices, packed.row_ptr, bias, None, 8, "bitmap"),
                          test_utils=("test_schema", "test_faketensor"))


def test_module_cached_path_equals_op_path():
    packed, g, b, bias, x = _case((4, 9), 5, 12, 24, 0.4, "bitmap", True, 3, value_dtype=torch.float16)
    module = RoutedSparseLinear(packed, g, b, bias)
    plain = torch.ops.se.routed_sparse_matmul(x, g, b, packed.values, packed.indices, packed.row_ptr, bias, None,
                                              12, "bitmap")[0]
    with decoded_expert_cache(1 << 20):
        cached = module(x)
        cached_again = module(x)
    assert torch.equal(plain, cached)
    assert torch.equal(plain, cached_again)
    kernel = module(x)  # eager CPU: the C++ kernel, another summation order
    assert torch.allclose(kernel, plain, rtol=1e-5, atol=1e-5)


def test_golden_reference_never_calls_the_kernels(monkeypatch):
    """Validation's PyTorch side: the reference op on one decoded expert at a time, equal to a
    float64 recomputation, and no call into the C++ library the backends share."""
    from se_export.backends import kernels

    packed, g, b, bias, x = _case((3, 7), 4, 10, 20, 0.5, "bitmap", True, 5, value_dtype=torch.float16)
    module = RoutedSparseLinear(packed, g, b, bias)

    def refuse(*_args, **_kw):
        raise AssertionError("the golden reference called the C++ kernels")

    monkeypatch.setattr(kernels.BoundExperts, "matmul", refuse)
    with golden_reference():
        y = module(x)
    expect, _ = reference(x, g, b, packed.unpack(torch.float64), bias)
    assert torch.allclose(y.double(), expect, rtol=1e-5, atol=1e-5)
    if kernels.available():
        with pytest.raises(AssertionError, match="golden"):
            module(x)  # outside the block, eager CPU inference takes the kernels
