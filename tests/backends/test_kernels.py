"""The C++ CPU kernels (plugins/cpu) against a float64 reference built from dense expert copies."""

from __future__ import annotations

import ctypes

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from se_export.backends import kernels
from se_export.errors import SEError
from se_export.formats.quantization import QuantSpec, column_scales
from se_export.formats.sparse_format import pack_experts

VALUE_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def reference(x, weights, router_weight, router_bias, bias, ids=None):
    """float64: route (unless ids given) and multiply by the chosen dense expert."""
    x64 = x.double().reshape(-1, x.shape[-1])
    scores = x64 @ router_weight.double() + router_bias.double()
    if ids is None:
        ids = scores.argmin(-1)
    ids = ids.reshape(-1).long()
    y = torch.einsum("ti,toi->to", x64, weights.double()[ids])
    if bias is not None:
        y += bias.double()[ids]
    return y, ids, scores


def make_case(seed, k, out, inn, tokens, density, fmt, vdtype, with_bias, route_mode):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(k, out, inn, generator=gen) < density
    if route_mode == "empty-expert":
        mask[0] = False
    weights = (torch.randn(k, out, inn, generator=gen) * mask).to(vdtype)
    packed = pack_experts(weights.float(), mask, fmt, vdtype)
    x = torch.randn(tokens, inn, generator=gen)
    g = torch.randn(inn, k, generator=gen)
    b = torch.randn(k, generator=gen)
    bias = torch.randn(k, out, generator=gen) if with_bias else None
    ids = None
    if route_mode == "one-expert":
        ids = torch.full((tokens,), k - 1, dtype=torch.int32)
    elif route_mode == "given":
        ids = torch.randint(0, k, (tokens,), generator=gen, dtype=torch.int32)
    return packed, weights.float(), x, g, b, bias, ids


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), k=st.integers(1, 5), out=st.integers(1, 40), inn=st.integers(1, 70),
       tokens=st.sampled_from([1, 2, 3, 9, 65, 130]), density=st.sampled_from([0.0, 0.1, 0.3, 0.5, 0.9, 1.0]),
       fmt=st.sampled_from(["bitmap", "csr16"]), vdtype=st.sampled_from(VALUE_DTYPES), with_bias=st.booleans(),
       route_mode=st.sampled_from(["router", "given", "one-expert", "empty-expert"]),
       xdtype=st.sampled_from([torch.float32, torch.float16]), dense_group_tokens=st.sampled_from([0, 1, 3, 128]))
def test_kernel_matches_float64_reference(seed, k, out, inn, tokens, density, fmt, vdtype, with_bias, route_mode, xdtype,
                                          dense_group_tokens):
    """dense_group_tokens 0: every token on the sparse kernel; 1 or 3: most groups of a dense-enough
    expert as a decoded GEMM, the rest sparse, in one call; 128: the default."""
    packed, weights, x, g, b, bias, ids = make_case(seed, k, out, inn, tokens, density, fmt, vdtype, with_bias, route_mode)
    x = x.to(xdtype)
    y, got_ids = kernels.BoundExperts(packed, bias, dense_group_tokens).matmul(x, g, b, ids)
    ref, ref_ids, scores = reference(x.float(), weights, g, b, bias, ids)
    if ids is None:  # a near-tie may resolve differently in fp32: then both scores must be equal-ish
        diff = got_ids.long() != ref_ids
        if diff.any():
            s = scores[diff]
            gap = (s.gather(1, got_ids.long()[diff, None]) - s.min(1, keepdim=True).values).abs()
            assert float(gap.max()) < 1e-4 * (1 + float(s.abs().max()))
            keep = ~diff
            y, ref = y[keep], ref[keep]
    else:
        assert torch.equal(got_ids, ids)
    assert y.dtype == xdtype
    tol = 1e-4 if xdtype == torch.float32 else 2e-3
    assert torch.allclose(y.double(), ref, rtol=tol, atol=tol * (1 + float(ref.abs().max()) if ref.numel() else 1))


def make_quant_case(seed, k, out, inn, density, fmt, bits, group):
    """Experts whose weights lie on an int8/int4 grid (random codes over the full range, random
    signed fp16 scales per group):
    ``(packed, float64 dequantized weights [K, out, in])``."""
    gen = torch.Generator().manual_seed(seed)
    spec = QuantSpec(bits, group)
    mask = torch.rand(k, out, inn, generator=gen) < density
    codes = torch.randint(spec.qmin, spec.qmax + 1, (k, out, inn), generator=gen) * mask  # the full range
    sign = torch.where(torch.rand(k, out, spec.groups(inn), generator=gen) < 0.5, -1.0, 1.0)  # scales take a sign
    scales = (sign * (torch.rand(k, out, spec.groups(inn), generator=gen) * 0.1 + 1e-3)).half().float()
    weights = codes.double() * column_scales(scales, inn, group).double()
    return pack_experts(weights.float(), mask, fmt, torch.int8, spec, scales), weights


QUANT_GROUPS = [1, 3, 8, 16, 32, 64, 128]  # 16 and up (powers of two): the vector paths; others scalar


def quant_error(seed, k, out, inn, tokens, density, fmt, bits, group, with_bias=True) -> float:
    """Largest |kernel - float64 reference| relative to the reference's scale, for given routing."""
    packed, weights = make_quant_case(seed, k, out, inn, density, fmt, bits, group)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(tokens, inn, generator=gen)
    ids = torch.randint(0, k, (tokens,), generator=gen, dtype=torch.int32)
    bias = torch.randn(k, out, generator=gen) if with_bias else None
    g, b = torch.randn(inn, k, generator=gen), torch.randn(k, generator=gen)
    y, _ = kernels.BoundExperts(packed, bias, 0).matmul(x, g, b, ids)
    ref, _, _ = reference(x, weights, g, b, bias, ids)
    return float((y.double() - ref).abs().max()) / (1 + float(ref.abs().max())) if ref.numel() else 0.0


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), k=st.integers(1, 4), out=st.integers(1, 24), inn=st.integers(1, 300),
       tokens=st.sampled_from([1, 2, 3, 9, 65]), density=st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]),
       fmt=st.sampled_from(["bitmap", "csr16"]), bits=st.sampled_from([8, 4]), group=st.sampled_from(QUANT_GROUPS))
def test_quantized_kernel_matches_float64_reference(seed, k, out, inn, tokens, density, fmt, bits, group):
    """int8 and int4 codes (int4 nibble-packed, rows starting mid-byte) with any group size, decode
    (1-2 tokens) and prefill tiles, against float64 products of the dequantized weights."""
    group = min(group, inn)
    assert quant_error(seed, k, out, inn, tokens, density, fmt, bits, group) < 1e-4


@pytest.mark.parametrize("isa", ["native", "avx512", "avx2", "portable"])
def test_quantized_kernels_agree_on_every_path(isa):
    """Each ISA's quantized decode (SE_KERNELS_ISA caps the path; "avx512" keeps AVX-512 without
    its VBMI2 64-column path) on rows long enough for the 64-column loops, every group size, both
    widths, at the end of the values array too."""
    import os
    import subprocess
    import sys

    code = ("from tests.backends.test_kernels import quant_error, QUANT_GROUPS; import itertools;"
            "print(max(quant_error(s, 2, 9, inn, t, d, 'bitmap', bits, g) for s, (inn, t, d, bits, g) in enumerate("
            "itertools.product([130, 517], [1, 2, 20], [0.3, 0.7, 1.0], [8, 4], QUANT_GROUPS))))")
    env = {**os.environ, "SE_KERNELS_ISA": isa}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert float(out) < 1e-4


def test_corrupt_scales_and_a_bad_group_size_are_refused():
    packed, _ = make_quant_case(0, 2, 4, 40, 0.5, "bitmap", 4, 16)
    bad = packed.scales.clone()
    bad.view(torch.int16)[1, 2, 0] = 0x7C00  # +inf
    import dataclasses

    with pytest.raises(SEError, match="not finite"):
        kernels.BoundExperts(dataclasses.replace(packed, scales=bad), None)
    with pytest.raises(SEError, match="group_size 64 is outside"):
        kernels.BoundExperts(dataclasses.replace(packed, quant=QuantSpec(4, 64), scales=packed.scales[..., :1]), None)


@pytest.mark.parametrize("vdtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("out", "inn"), [(2100, 300), (3300, 1100)])
def test_decode_of_long_experts_matches_float64_reference(out, inn, vdtype):
    """Experts long enough that a decode call splits them into work items of more than 32 rows (the
    last one partial); at 3300 x 1100 fp32 the AVX-512 bitmap decode walks four rows a quarter of
    an item apart at once, at 2100 x 300 four neighbouring rows. One and two tokens, with bias."""
    for fmt in ("bitmap", "csr16"):
        packed, weights, x, g, b, bias, ids = make_case(7, 2, out, inn, 2, 0.5, fmt, vdtype, True, "given")
        bound = kernels.BoundExperts(packed, bias)
        for tokens in (1, 2):
            y, _ = bound.matmul(x[:tokens], g, b, ids[:tokens])
            ref, _, _ = reference(x[:tokens], weights, g, b, bias, ids[:tokens])
            assert torch.allclose(y.double(), ref, rtol=1e-4, atol=1e-4 * (1 + float(ref.abs().max()))), (fmt, tokens)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.integers(1, 4), out=st.integers(1, 40), inn=st.integers(1, 70),
       density=st.sampled_from([0.0, 0.1, 0.5, 1.0]), fmt=st.sampled_from(["bitmap", "csr16"]),
       vdtype=st.sampled_from(VALUE_DTYPES))
def test_decoded_expert_equals_the_packed_weights(seed, k, out, inn, density, fmt, vdtype):
    packed, weights, *_ = make_case(seed, k, out, inn, 1, density, fmt, vdtype, False, "router")
    bound = kernels.BoundExperts(packed)
    for e in range(k):
        assert torch.equal(bound.decode_expert(e), weights[e])  # exact: values are stored, not computed
    with pytest.raises(SEError, match="expert index out of range"):
        bound.decode_expert(k)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.sampled_from([1, 3, 7, 8, 9, 16, 23, 24, 40, 64, 65, 80]),
       inn=st.integers(1, 300), tokens=st.integers(1, 6), xdtype=st.sampled_from([torch.float32, torch.float16]))
def test_router_kernel_matches_float64_argmin(seed, k, inn, tokens, xdtype):
    """Routing alone, for expert counts around the 8-lane blocks (masked tail) and past the
    64-expert register path (scalar loop): the float64 argmin, up to fp32 near-ties."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, inn, generator=gen).to(xdtype)
    g = torch.randn(inn, k, generator=gen)
    b = torch.randn(k, generator=gen)
    got = kernels.route(x, g, b).long()
    scores = x.double() @ g.double() + b.double()
    best = scores.min(1, keepdim=True).values
    gap = (scores.gather(1, got[:, None]) - best).abs()
    assert bool((got >= 0).all() and (got < k).all())
    assert float(gap.max()) <= 1e-5 * (1 + float(scores.abs().max()))


@pytest.mark.parametrize("vdtype", VALUE_DTYPES)
@pytest.mark.parametrize("tokens", [1, 2, 40])
def test_every_mask_byte_expands_correctly(vdtype, tokens):
    """Each row holds all 256 bitmap bytes (shuffled), so every entry of the byte-expansion tables
    is used in the decode (1-2 tokens) and prefill paths; columns 2048 + 5 leave a tail."""
    gen = torch.Generator().manual_seed(7)
    out, k = 12, 2
    bits = torch.stack([torch.randperm(256, generator=gen) for _ in range(k * out)]).reshape(k, out, 256)
    mask = ((bits[..., None] >> torch.arange(8)) & 1).bool().reshape(k, out, 2048)
    mask = torch.cat([mask, torch.rand(k, out, 5, generator=gen) < 0.5], dim=2)
    weights = (torch.randn(k, out, 2053, generator=gen) * mask).to(vdtype)
    packed = pack_experts(weights.float(), mask, "bitmap", vdtype)
    x = torch.randn(tokens, 2053, generator=gen)
    ids = torch.randint(0, k, (tokens,), generator=gen, dtype=torch.int32)
    g, b = torch.randn(2053, k, generator=gen), torch.randn(k, generator=gen)
    y, _ = kernels.BoundExperts(packed, None).matmul(x, g, b, ids)
    ref, _, _ = reference(x, weights.float(), g, b, None, ids)
    assert torch.allclose(y.double(), ref, rtol=1e-4, atol=1e-4 * (1 + float(ref.abs().max())))


@pytest.mark.parametrize("isa", ["native", "avx2", "portable"])
def test_both_code_paths_agree(isa, monkeypatch):
    """The portable path gives the same numbers as the vectorised ones (AVX2, AVX-512 or NEON);
    SE_KERNELS_ISA caps the path and the library reports the one it took."""
    import subprocess
    import sys

    code = ("import torch; from se_export.backends import kernels; from tests.backends.test_kernels import make_case, reference;"
            "p,w,x,g,b,bias,ids=make_case(3,4,33,75,70,0.4,'bitmap',torch.float16,True,'router');"
            "y,_=kernels.BoundExperts(p,bias).matmul(x,g,b);r,_,_=reference(x,w,g,b,bias);"
            "print(kernels.isa(), float((y.double()-r).abs().max()))")
    env = {**__import__("os").environ, "SE_KERNELS_ISA": isa}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout.split()
    allowed = {"portable": {"portable"}, "avx2": {"avx2", "neon", "portable"},
               "native": {"avx512", "avx2", "neon", "portable"}}
    assert out[0] in allowed[isa]
    assert float(out[1]) < 1e-4


def test_out_of_range_inputs_are_rejected_before_the_kernel_runs():
    packed, _, x, g, b, _, _ = make_case(1, 3, 8, 20, 5, 0.5, "csr16", torch.float16, False, "router")
    bound = kernels.BoundExperts(packed)
    with pytest.raises(SEError, match="outside"):
        bound.matmul(x, g, b, torch.tensor([0, 1, 3, 0, 0], dtype=torch.int32))
    grouped = kernels.BoundExperts(packed, dense_group_tokens=2)  # the dense-group path checks them too
    for bad_id in (3, -1, 2**31 - 1):
        with pytest.raises(SEError, match="outside"):
            grouped.matmul(x, g, b, torch.tensor([0, 0, 0, bad_id, 0], dtype=torch.int32))
    bad = packed.indices.clone()
    bad[0] = 20  # column == in_features
    with pytest.raises(SEError, match="column"):
        kernels.BoundExperts(type(packed)(**{**packed.__dict__, "indices": bad}))
    pb, *_ = make_case(1, 3, 8, 20, 5, 0.5, "bitmap", torch.float16, False, "router")
    bits = pb.indices.clone()
    bits[0, 0, 0] ^= 0x1  # popcount no longer matches row_ptr
    with pytest.raises(SEError, match="bitmap"):
        kernels.BoundExperts(type(pb)(**{**pb.__dict__, "indices": bits}))
    rp = pb.row_ptr.clone()
    rp[3] = rp[2] - 1
    with pytest.raises(SEError, match="row_ptr"):
        kernels.BoundExperts(type(pb)(**{**pb.__dict__, "row_ptr": rp}))


def test_module_uses_kernels_and_matches_the_reference_op():
    """RoutedSparseLinear runs the C++ kernel in eager CPU inference; same result as the golden op."""
    from se_export.modeling import ops
    from se_export.modeling.modules import RoutedSparseLinear

    packed, _, x, g, b, bias, _ = make_case(5, 4, 24, 40, 50, 0.4, "bitmap", torch.float16, True, "router")
    module = RoutedSparseLinear(packed, g, b, bias)
    assert module._use_kernels(x)
    with torch.no_grad():
        y = module(x)
    ref, _ = ops.routed_sparse_matmul(x, g, b, packed.values, packed.indices, packed.row_ptr, bias, None, 24, "bitmap")
    assert torch.allclose(y, ref, atol=1e-5)


def test_isa_reports_a_known_path():
    assert kernels.isa() in ("avx512", "avx2", "neon", "portable")
    assert isinstance(kernels.require(), ctypes.CDLL)


def test_dense_group_policy_comes_from_the_library_the_onnx_runtime_op_uses():
    """The PyTorch binding reads the policy from the library (no copy of the constants), so the
    two backends send the same experts to a dense GEMM; candidates follow the library's density."""
    import re
    from pathlib import Path

    header = (Path(__file__).parents[2] / "plugins" / "cpu" / "se_kernels.h").read_text()
    defines = dict(re.findall(r"#define (SE_DENSE_GROUP_\w+) ([0-9.]+)", header))
    tokens, density = kernels.dense_group_policy()
    assert (tokens, density) == (int(defines["SE_DENSE_GROUP_TOKENS"]), float(defines["SE_DENSE_GROUP_DENSITY"]))
    gen = torch.Generator().manual_seed(0)
    weights = torch.randn(3, 8, 50, generator=gen)
    keep = torch.stack([torch.rand(8, 50, generator=gen) < d for d in (density - 0.15, density + 0.15, 1.0)])
    bound = kernels.BoundExperts(pack_experts(weights * keep, keep, "bitmap", torch.float32))
    assert bound.dense_group_tokens == tokens
    assert bound.dense_candidates == [1, 2]
    assert kernels.BoundExperts(bound.packed, dense_group_tokens=0).dense_group_tokens == 0


def test_the_binding_refuses_a_library_built_from_other_sources(monkeypatch):
    """The binding's argument lists follow se_kernels.h's SE_KERNELS_ABI: a stale library (older
    ABI, or none reported) must not be called with them. PyTorch falls back to the reference op
    with a warning; direct use is a one-line error naming the fix."""
    import re
    from pathlib import Path

    header = (Path(__file__).parents[2] / "plugins" / "cpu" / "se_kernels.h").read_text()
    assert int(re.search(r"#define SE_KERNELS_ABI (\d+)", header).group(1)) == kernels.KERNELS_ABI
    assert int(kernels.require().se_kernels_abi()) == kernels.KERNELS_ABI

    class OldLibrary:  # an old build: no se_kernels_abi entry at all
        se_kernel_isa = staticmethod(lambda: b"avx2")

    class OtherAbi(OldLibrary):
        se_kernels_abi = staticmethod(lambda: kernels.KERNELS_ABI + 1)

    for stale in (OldLibrary(), OtherAbi()):
        monkeypatch.setattr(kernels, "_lib", lambda stale=stale: stale)
        kernels._warn_stale.cache_clear()
        with pytest.raises(SEError, match=r"ABI .*rebuild it with `make plugins`"):
            kernels.require()
        with pytest.warns(UserWarning, match="pure-torch reference op"):
            assert not kernels.available()


def test_doctor_names_a_stale_kernel_library_instead_of_failing(monkeypatch):
    from se_export import doctor

    class OldLibrary:
        se_kernel_isa = staticmethod(lambda: b"avx2")

    monkeypatch.setattr(kernels, "_lib", lambda: OldLibrary())
    kernels._warn_stale.cache_clear()
    info = doctor.cpu_kernels()
    assert info["isa"] is None and not info["used_by_pytorch"]
    assert "rebuild it with `make plugins`" in info["problem"]
    text = doctor.format_report(doctor.report())
    assert "CPU kernels: libse_kernels.so was built from other sources" in text
