"""The CUDA kernels (plugins/cuda, through se_export.backends.cuda_kernels) on a real GPU, against the torch
op on the CPU. Every test carries the ``gpu`` marker and skips without a CUDA device; the file
imports only the kernel bindings, so it also runs where the rest of the stack is another version."""

from __future__ import annotations

import pytest
import torch
from conftest import random_experts
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from se_export.formats.sparse_format import pack_experts
from se_export.modeling import ops

HAS_GPU = torch.cuda.is_available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")]


def _reference(packed, g, b, x, bias, ids=None):
    return ops.routed_sparse_matmul(x, g, b, packed.values, packed.indices, packed.row_ptr, bias, ids,
                                    packed.out_features, packed.format)


def _tolerance(x: torch.Tensor) -> float:
    return 2e-2 if x.dtype == torch.float16 else 1e-4


@pytest.mark.parametrize("fmt", ["bitmap", "csr16"])
@pytest.mark.parametrize("vdtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fp16_x", [False, True])
def test_cuda_kernels_match_the_torch_op(fmt, vdtype, fp16_x):
    from se_export.backends.cuda_kernels import CudaExperts

    for seed, (k, out, inn, density) in enumerate([(16, 512, 576, 0.5), (8, 300, 1100, 0.3), (1, 64, 33, 0.1)]):
        packed, g, b, gen = random_experts(seed, k, out, inn, fmt, vdtype, density)
        bias = torch.randn(k, out, generator=gen)
        experts = CudaExperts(packed, g, b, bias)
        for tokens in (1, 4, 5, 64, 300):
            x = torch.randn(tokens, inn, generator=gen).to(torch.float16 if fp16_x else torch.float32)
            ref, ref_ids = _reference(packed, g, b, x, bias)
            y, ids = experts.matmul(x.cuda(), ref_ids.cuda())
            tol = _tolerance(x)
            assert torch.allclose(y.float().cpu(), ref.float(), rtol=tol, atol=tol)
            assert torch.equal(ids.cpu(), ref_ids), "given routing is passed through"
            _, routed = experts.matmul(x.cuda())
            assert (routed.cpu() == ref_ids).float().mean() >= 0.95


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), k=st.integers(1, 20), out=st.integers(1, 300), inn=st.integers(1, 1500),
       tokens=st.sampled_from([1, 2, 4, 5, 33, 100, 300]), fmt=st.sampled_from(["bitmap", "csr16"]),
       vdtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), fp16_x=st.booleans(),
       density=st.sampled_from([0.0, 0.1, 0.5, 1.0]), with_bias=st.booleans(),
       gemv_max=st.sampled_from([0, 1, 1_000_000]))
def test_cuda_kernels_on_random_shapes(seed, k, out, inn, tokens, fmt, vdtype, fp16_x, density, with_bias,
                                       gemv_max):
    """Odd widths, empty experts, one expert, both paths forced (1: grouped from 2 tokens on;
    1e6: every token through the GEMV), against the torch op with the same routing."""
    from se_export.backends.cuda_kernels import CudaExperts

    packed, g, b, gen = random_experts(seed, k, out, inn, fmt, vdtype, density)
    bias = torch.randn(k, out, generator=gen) if with_bias else None
    x = torch.randn(tokens, inn, generator=gen).to(torch.float16 if fp16_x else torch.float32)
    ref, ref_ids = _reference(packed, g, b, x, bias)
    y, ids = CudaExperts(packed, g, b, bias).matmul(x.cuda(), ref_ids.cuda(), gemv_max_tokens=gemv_max)
    tol = _tolerance(x)
    assert torch.allclose(y.float().cpu(), ref.float(), rtol=tol, atol=tol)
    assert torch.equal(ids.cpu(), ref_ids)


@pytest.mark.parametrize("gemv_max", [1, 1_000_000])
def test_out_of_range_ids_give_zero_rows(gemv_max):
    """Caller-given ids outside [0, K) produce zero rows on both paths; the other rows are exact."""
    from se_export.backends.cuda_kernels import CudaExperts

    packed, g, b, gen = random_experts(3, 4, 70, 130, "bitmap", torch.float16)
    x = torch.randn(9, 130, generator=gen)
    ids = torch.tensor([0, -1, 3, 4, 1, 2, 99, 0, 3], dtype=torch.int32)
    y, _ = CudaExperts(packed, g, b).matmul(x.cuda(), ids.cuda(), gemv_max_tokens=gemv_max)
    valid = (ids >= 0) & (ids < 4)
    ref, _ = _reference(packed, g, b, x[valid], None, ids[valid])
    assert torch.allclose(y.cpu()[valid], ref, rtol=1e-4, atol=1e-4)
    assert torch.count_nonzero(y.cpu()[~valid]) == 0


@pytest.mark.parametrize("tokens", [1, 200])
def test_matmul_replays_in_a_cuda_graph(tokens):
    """The kernels take torch's current stream and allocate nothing on the device while capturing,
    so a captured call replays with new activations (what the benchmark and TensorRT rely on)."""
    from se_export.backends.cuda_kernels import CudaExperts

    packed, g, b, gen = random_experts(5, 16, 256, 512, "csr16", torch.float16)
    experts = CudaExperts(packed, g, b)
    x = torch.randn(tokens, 512, generator=gen).half().cuda()
    y = torch.empty(tokens, 256, dtype=torch.float16, device="cuda")
    experts.matmul(x, out=y)  # warm-up sizes the workspace outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _, ids = experts.matmul(x, out=y)
    for _ in range(3):
        x.copy_(torch.randn(tokens, 512, generator=gen).half().cuda())
        graph.replay()
        torch.cuda.synchronize()
        eager, eager_ids = experts.matmul(x)
        assert torch.equal(ids, eager_ids)
        assert torch.equal(y, eager)


@pytest.mark.parametrize("fmt", ["bitmap", "csr16"])
def test_packing_on_the_gpu_equals_packing_on_the_cpu(fmt):
    gen = torch.Generator().manual_seed(7)
    mask = torch.rand(3, 50, 77, generator=gen) < 0.4
    w = torch.randn(3, 50, 77, generator=gen) * mask
    cpu = pack_experts(w, mask, fmt, torch.float16)
    gpu = pack_experts(w.cuda(), mask.cuda(), fmt, torch.float16)
    for name in ("values", "indices", "row_ptr"):
        assert torch.equal(getattr(gpu, name).cpu(), getattr(cpu, name)), name


@pytest.mark.parametrize("fmt", ["bitmap", "csr16"])
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("group", [7, 32, 128])
def test_cuda_kernels_read_quantized_codes(fmt, bits, group):
    """int8/int4 codes with group scales on the GPU (codes packed by the binding as the kernels
    read them) against the torch op, which dequantizes first; both paths, fp16 and fp32 x."""
    from se_export.backends.cuda_kernels import CudaExperts
    from se_export.formats.quantization import QuantSpec, round_to_nearest
    from se_export.formats.sparse_format import pack_experts

    gen = torch.Generator().manual_seed(bits * group)
    k, out, inn = 8, 200, 1100
    keep = torch.rand(k, out, inn, generator=gen) < 0.4
    spec = QuantSpec(bits, group)
    dequantized, scales = round_to_nearest(torch.randn(k, out, inn, generator=gen), keep, spec)
    packed = pack_experts(dequantized, keep, fmt, torch.int8, spec, scales)
    g, b = torch.randn(inn, k, generator=gen), torch.randn(k, generator=gen)
    experts = CudaExperts(packed, g, b)
    for fp16_x in (False, True):
        for tokens in (1, 5, 300):
            x = torch.randn(tokens, inn, generator=gen).to(torch.float16 if fp16_x else torch.float32)
            ref, ref_ids = ops.routed_sparse_matmul(x, g, b, packed.values, packed.indices, packed.row_ptr, None, None,
                                                    out, fmt, packed.scales, group)
            y, _ = experts.matmul(x.cuda(), ref_ids.cuda())
            tol = _tolerance(x)
            assert torch.allclose(y.float().cpu(), ref.float(), rtol=tol, atol=tol)
