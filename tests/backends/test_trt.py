"""TensorRT side without TensorRT: the graph rewrite for TensorRT's parser (checked by running the
rewritten graph in ONNX Runtime against the original), profiles, the trtexec line, clear errors
when TensorRT or a GPU is missing, and the CUDA kernels' decomposition (their CPU reference)
against the torch op. Tests that need a GPU (and TensorRT) carry the ``gpu`` marker."""

from __future__ import annotations

import copy
import importlib.util
import itertools

import numpy as np
import onnx
import pytest
import torch
from conftest import build_tiny_model, ort_session, random_experts, single_node_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, numpy_helper
from test_cli import _one_line_error, run_cli

from se_export.backends.cuda_kernels import CUDA_LIB, _cuda_lib, reference_matmul
from se_export.backends.kernels import find_library
from se_export.backends.ort_runtime import OrtCausalLM
from se_export.backends.trt_build import ShapeRanges, profiles, trtexec_command
from se_export.export.onnx_export import MODEL_FILE, export_onnx, read_onnx_manifest
from se_export.export.trt_onnx import prepare_for_tensorrt, prepare_graph
from se_export.formats.quantization import QuantSpec, round_to_nearest
from se_export.formats.sparse_format import pack_experts
from se_export.method.expand import ExpandConfig, expand_model
from se_export.modeling import ops

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
HAS_GPU = torch.cuda.is_available()


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 1000), k=st.integers(1, 4), out=st.integers(1, 16), inn=st.integers(1, 40),
       fmt=st.sampled_from(["bitmap", "csr16"]), with_bias=st.booleans(), with_ids=st.booleans())
def test_tensorrt_form_of_a_node_computes_the_same(seed, k, out, inn, fmt, with_bias, with_ids):
    packed, g, b, gen = random_experts(seed, k, out, inn, fmt, torch.float16)
    bias = torch.randn(k, out, generator=gen) if with_bias else None
    model = single_node_model(packed, g, b, bias, with_ids)
    model.graph.node[0].output.pop()  # as exported for an up projection: y only
    del model.graph.output[1]
    original = ort_session(model)
    rewritten = copy.deepcopy(model)
    stats = prepare_graph(rewritten)
    node = rewritten.graph.node[0]
    assert len(node.output) == 2, "a plugin layer has a fixed output count"
    inits = {t.name: t for t in rewritten.graph.initializer}
    assert stats["indices_packed"] == 1 and inits["indices"].data_type == TensorProto.INT32, "TensorRT form"
    raw = packed.indices.numpy().tobytes()
    words = numpy_helper.to_array(inits["indices"])
    assert words.size == (len(raw) + 3) // 4 and words.astype("<i4").tobytes()[: len(raw)] == raw
    expected_inputs = 6 + int(with_bias) + int(with_ids)
    assert len(node.input) == expected_inputs, "empty optional bias dropped; expert_ids then at position 6"
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert (attrs["has_bias"], attrs["has_expert_ids"]) == (int(with_bias), int(with_ids)), "explicit input layout"
    assert attrs["gemv_max_tokens"] == 0, "every field of the plugin's creator is an attribute"
    assert attrs["value_dtype"] == b"fp16" and "x_dtype" not in attrs, "float values name their type"
    typed = copy.deepcopy(model)
    prepare_graph(typed, x_dtype="fp32")
    assert onnx.helper.get_attribute_value(next(a for a in typed.graph.node[0].attribute if a.name == "x_dtype")) == b"fp32"
    x = torch.randn(5, inn, generator=gen)
    feeds = {"x": x.numpy()}
    if with_ids:
        feeds["ids"] = torch.randint(0, k, (5,), generator=gen, dtype=torch.int32).numpy()
    if with_ids and not with_bias:
        return  # ONNX Runtime's lite API cannot bind expert_ids without the bias slot; TensorRT's plugin can
    got = ort_session(rewritten).run(["y"], feeds)[0]
    want = original.run(["y"], feeds)[0]
    assert np.array_equal(got, want)


@pytest.fixture(scope="module")
def csr16_export(tiny_tokenizer, tmp_path_factory):
    model = build_tiny_model("llama", tiny_tokenizer, seed=3)
    calib = torch.randint(0, len(tiny_tokenizer), (8, 64), generator=torch.Generator().manual_seed(3))
    expand_model(model, calib, ExpandConfig(experts=2, sparsity="0.7", min_cluster_tokens=4, pca_factor=0,
                                            format="csr16"), show_progress=False)
    out = tmp_path_factory.mktemp("trt") / "llama-csr16"
    export_onnx(model, tiny_tokenizer, out, source="test")
    return out


def test_tensorrt_form_of_an_exported_model_matches_in_ort(csr16_export, tmp_path):
    manifest = read_onnx_manifest(csr16_export)
    stats = prepare_for_tensorrt(csr16_export / MODEL_FILE, tmp_path / "trt.onnx")
    assert stats["nodes"] == manifest["custom_op_nodes"] > 0
    assert stats["indices_packed"] == stats["nodes"]
    assert stats["inputs_dropped"] > 0, "up projections reuse the gate's routing and have no bias"
    nodes = [n for n in onnx.load(str(tmp_path / "trt.onnx")).graph.node if n.op_type == "RoutedSparseMatMul"]
    assert all(len(n.output) == 2 and "" not in n.input and len(n.input) in (6, 7) for n in nodes)
    # the same rewrite with the bias placeholder kept is valid for ONNX Runtime: it must compute the same
    dst = csr16_export / "model.trt.onnx"
    prepare_for_tensorrt(csr16_export / MODEL_FILE, dst, drop_empty_bias=False)
    ids = np.random.default_rng(0).integers(0, manifest["vocab_size"], (2, 9))
    want, past, _ = OrtCausalLM(csr16_export).run(ids)
    got, got_past, _ = OrtCausalLM(csr16_export, model_file=dst).run(ids)
    assert np.array_equal(want, got)
    assert all(np.array_equal(a, c) for a, c in zip(past, got_past, strict=True))


def test_profiles_cover_prefill_and_decode(csr16_export):
    manifest = read_onnx_manifest(csr16_export)
    r = ShapeRanges(max_batch=2, opt_seq=16, max_seq=64, opt_past=32, max_past=128)
    prefill, decode = profiles(manifest, r)
    assert prefill["input_ids"] == ((1, 1), (1, 16), (2, 64))
    assert decode["input_ids"] == ((1, 1), (1, 1), (2, 1))
    h, d = manifest["num_kv_heads"], manifest["head_dim"]
    assert prefill["past_key_values.0.key"] == ((1, h, 0, d), (1, h, 0, d), (2, h, 128, d))
    assert decode["attention_mask"] == ((1, 2), (1, 33), (2, 129)), "mask covers past + new tokens"
    assert set(prefill) == set(manifest["inputs"])
    line = trtexec_command(csr16_export / "m.onnx", csr16_export / "e.engine", csr16_export / "lib.so", True, prefill)
    assert "--dynamicPlugins=" in line and "--fp16" in line and "input_ids:2x64" in line
    # an fp16 export builds strongly typed: trtexec must say so (TensorRT 11's has no --fp16)
    typed = trtexec_command(csr16_export / "m.onnx", csr16_export / "e.engine", csr16_export / "lib.so", True,
                            prefill, strongly_typed=True)
    assert "--stronglyTyped" in typed and "--fp16" not in typed
    with pytest.raises(Exception, match="bad shape ranges"):
        ShapeRanges(opt_seq=600, max_seq=512).check()


def test_trt_cli_dry_run_and_errors(csr16_export, tmp_path):
    plugin = tmp_path / "libfake.so"
    plugin.write_bytes(b"")
    proc = run_cli("trt", csr16_export, "--dry-run", "--plugin", plugin, "--opt-past", "32",
                   "--max-past", "64")
    assert proc.returncode == 0, proc.stderr
    assert "trtexec --onnx=" in proc.stderr and f"--dynamicPlugins={plugin}" in proc.stderr
    _one_line_error(run_cli("trt", csr16_export, "--dry-run", "--plugin", tmp_path / "missing.so"), "does not exist")
    _one_line_error(run_cli("trt", csr16_export, "--dry-run", "--opt-past", "100", "--max-past", "64"),
                    "--opt-past 100 must be between")
    proc = run_cli("trt", csr16_export, "--dry-run", "--plugin", plugin, "--max-seq", "64", "--max-past", "128")
    assert proc.returncode == 0, "the tuned sizes default to at most the maxima: " + proc.stderr
    _one_line_error(run_cli("trt", tmp_path, "--dry-run"), "not an se-export ONNX folder")
    if not HAS_TENSORRT:
        _one_line_error(run_cli("trt", csr16_export, "--plugin", plugin), "tensorrt Python module is not installed")
        _one_line_error(run_cli("validate", csr16_export, "--backend", "trt"), "tensorrt Python module")
    elif not HAS_GPU:
        _one_line_error(run_cli("trt", csr16_export, "--plugin", plugin), "no CUDA GPU")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), k=st.integers(1, 20), out=st.integers(1, 40), inn=st.integers(1, 300),
       tokens=st.sampled_from([1, 3, 4, 33, 100]), fmt=st.sampled_from(["bitmap", "csr16"]),
       vdtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), fp16_x=st.booleans(),
       density=st.sampled_from([0.0, 0.1, 0.5, 1.0]), with_bias=st.booleans())
def test_cuda_kernel_decomposition_matches_the_torch_op(seed, k, out, inn, tokens, fmt, vdtype, fp16_x, density,
                                                        with_bias):
    """The CPU reference runs the CUDA kernels' split (router feature splits and thread strides,
    lane-per-word bitmap GEMV, 32-token x 64-row tiles decoded 64 columns per step) with the shared
    indexing helpers; it must equal the op."""
    packed, g, b, gen = random_experts(seed, k, out, inn, fmt, vdtype, density)
    bias = torch.randn(k, out, generator=gen) if with_bias else None
    x = torch.randn(tokens, inn, generator=gen).to(torch.float16 if fp16_x else torch.float32)
    ref, ref_ids = ops.routed_sparse_matmul(x, g, b, packed.values, packed.indices, packed.row_ptr, bias, None, out,
                                            fmt)
    for gemv_max in (0, 1_000_000, 1):  # default split, all GEMV, all grouped
        y, ids = reference_matmul(packed, g, b, x, bias, ref_ids, gemv_max)
        tol = 2e-2 if fp16_x else 1e-4
        assert torch.allclose(y.float(), ref.float(), rtol=tol, atol=tol)
        assert torch.equal(ids, ref_ids)
    y, ids = reference_matmul(packed, g, b, x, bias)
    assert (ids == ref_ids).float().mean() >= 0.9, "routing differs only on near ties"


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), k=st.integers(1, 8), out=st.integers(1, 40), inn=st.integers(1, 300),
       tokens=st.sampled_from([1, 3, 33, 100]), fmt=st.sampled_from(["bitmap", "csr16"]), bits=st.sampled_from([4, 8]),
       group=st.integers(1, 160), fp16_x=st.booleans(), density=st.sampled_from([0.1, 0.5, 1.0]))
def test_cuda_kernel_decomposition_of_quantized_experts_matches_the_torch_op(seed, k, out, inn, tokens, fmt, bits,
                                                                             group, fp16_x, density):
    """int8/int4 codes with group scales through the CUDA kernels' decomposition (codes decoded
    where they are read, int4 rows starting mid-byte) against the torch op, which dequantizes first."""
    gen = torch.Generator().manual_seed(seed)
    spec = QuantSpec(bits, min(group, inn))
    keep = torch.rand(k, out, inn, generator=gen) < density
    dequantized, scales = round_to_nearest(torch.randn(k, out, inn, generator=gen), keep, spec)
    packed = pack_experts(dequantized, keep, fmt, torch.int8, spec, scales)
    g, b = torch.randn(inn, k, generator=gen), torch.randn(k, generator=gen)
    x = torch.randn(tokens, inn, generator=gen).to(torch.float16 if fp16_x else torch.float32)
    ref, ref_ids = ops.routed_sparse_matmul(x, g, b, packed.values, packed.indices, packed.row_ptr, None, None, out,
                                            fmt, packed.scales, spec.group_size)
    for gemv_max in (1_000_000, 1):  # all GEMV, all grouped
        y, ids = reference_matmul(packed, g, b, x, None, ref_ids, gemv_max)
        tol = 2e-2 if fp16_x else 1e-4
        assert torch.allclose(y.float(), ref.float(), rtol=tol, atol=tol)
        assert torch.equal(ids, ref_ids)


@pytest.mark.skipif(find_library(CUDA_LIB) is None, reason="libse_cuda_kernels.so is not built (needs nvcc)")
@pytest.mark.parametrize("experts", [1, 16, 64])
def test_cuda_workspace_never_shrinks_as_tokens_grow(experts):
    """TensorRT sizes the plugin's workspace for a profile's largest token count and every call
    with fewer tokens uses it: se_cuda_workspace_size must not decrease as tokens grow (the router's
    partial scores, whose split count falls as tokens rise, included). A host function: no GPU."""
    size = _cuda_lib().se_cuda_workspace_size
    sizes = [size(tokens, experts) for tokens in range(1, 5000)]
    assert all(a <= b for a, b in itertools.pairwise(sizes))
    assert sizes[0] >= 16 * experts * 4, "one decode token reserves its 16 splits' partial scores"
