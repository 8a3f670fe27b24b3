"""ONNX export (custom op and portable), the ONNX Runtime custom-op library, and validation.

Tiny random Llama and GPT-NeoX models are expanded and exported; ONNX Runtime must reproduce
PyTorch (the golden reference op) for several batch and sequence shapes, with and without past.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import build_tiny_model, ort_session, single_node_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from test_cli import _one_line_error, run_cli

from se_export.backends.ort_runtime import OrtCausalLM
from se_export.errors import SEError
from se_export.export import onnx_schema
from se_export.export.onnx_export import MODEL_FILE, export_onnx
from se_export.formats.checkpoint import expanded_modules, save_checkpoint
from se_export.formats.sparse_format import pack_experts
from se_export.method.expand import ExpandConfig, expand_model
from se_export.modeling import ops
from se_export.modeling.modules import decoded_expert_cache

EXPORTS = ["llama-se-fp32", "llama-se-fp16", "llama-portable", "llama-dense", "neox-se-fp32", "neox-portable"]


def _expanded(family: str, tokenizer, seed: int = 0):
    model = build_tiny_model(family, tokenizer, seed=seed)
    calib = torch.randint(0, len(tokenizer), (8, 64), generator=torch.Generator().manual_seed(seed))
    cfg = ExpandConfig(experts=4, sparsity="0.5", min_cluster_tokens=4, pca_factor=0, format="auto")
    expand_model(model, calib, cfg, show_progress=False)
    return model


@pytest.fixture(scope="module")
def models(tiny_tokenizer):
    return {"llama-se": _expanded("llama", tiny_tokenizer), "llama-dense": build_tiny_model("llama", tiny_tokenizer),
            "neox-se": _expanded("gpt_neox", tiny_tokenizer, seed=1)}


@pytest.fixture(scope="module")
def exports(models, tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("onnx")
    out = {}
    for name in EXPORTS:
        family, kind = name.split("-")[0], name.split("-")[1]
        key = f"{family}-dense" if kind == "dense" else f"{family}-se"
        dtype = name.split("-")[2] if name.count("-") == 2 else "fp32"
        model = copy.deepcopy(models[key])
        export_onnx(model, tiny_tokenizer, root / name, dtype=dtype, portable=kind == "portable", source="test")
        out[name] = root / name
    return out


def _torch_logits(model, ids: np.ndarray, past_len: int = 0) -> np.ndarray:
    with torch.no_grad(), decoded_expert_cache(1 << 30):
        return model(torch.from_numpy(ids)).logits.float().numpy()


@pytest.mark.parametrize("name", EXPORTS)
def test_ort_matches_pytorch_batches_and_lengths(name, exports, models):
    lm = OrtCausalLM(exports[name])
    key = "llama-dense" if name == "llama-dense" else f"{name.split('-')[0]}-se"
    model = models[key]
    rng = np.random.default_rng(0)
    for batch, seq in [(1, 1), (1, 9), (3, 6), (3, 17)]:
        ids = rng.integers(0, model.config.vocab_size, size=(batch, seq))
        ref = _torch_logits(model, ids)
        got, present, _ = lm.run(ids)
        assert present[0].shape == (batch, lm.kv_heads, seq, lm.head_dim)
        if lm.manifest["dtype"] == "fp32":
            assert np.abs(got - ref).max() <= 1e-4, (batch, seq)
        else:
            g, r = got.astype(np.float64).reshape(-1, ref.shape[-1]), ref.reshape(-1, ref.shape[-1]).astype(np.float64)
            cos = (g * r).sum(-1) / (np.linalg.norm(g, axis=-1) * np.linalg.norm(r, axis=-1))
            assert cos.min() >= 0.999
            assert (g.argmax(-1) == r.argmax(-1)).mean() >= 0.9


@pytest.mark.parametrize("name", ["llama-se-fp32", "neox-se-fp32", "llama-portable"])
def test_decode_step_with_past_equals_the_full_run(name, exports):
    lm = OrtCausalLM(exports[name])
    ids = np.random.default_rng(1).integers(0, lm.manifest["vocab_size"], size=(2, 11))
    full, _, _ = lm.run(ids)
    _, past, _ = lm.run(ids[:, :-3])
    for step in range(3):
        col = ids.shape[1] - 3 + step
        logits, past, _ = lm.run(ids[:, col : col + 1], past)
        assert np.abs(logits[:, 0] - full[:, col]).max() <= 1e-4


def test_graph_has_one_node_per_expanded_linear_and_gate_up_share_routing(exports, models):
    onnx_schema.register()
    path = exports["llama-se-fp32"] / MODEL_FILE
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path))
    nodes = [n for n in model.graph.node if n.domain == "se" and n.op_type == "RoutedSparseMatMul"]
    assert len(nodes) == len(expanded_modules(models["llama-se"]))
    produced = {n.output[1]: n for n in nodes if len(n.output) > 1}
    shared = [n for n in nodes if len(n.input) > 7 and n.input[7]]
    assert len(shared) == models["llama-se"].config.num_hidden_layers  # every up_proj reuses its gate's routing
    for node in shared:
        assert "gate_proj" in produced[node.input[7]].input[3] and "up_proj" in node.input[3]
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    shapes = {v.name: v.type.tensor_type for v in inferred.graph.value_info}
    y = shapes[nodes[0].output[0]]
    assert y.elem_type == TensorProto.FLOAT
    assert y.shape.dim[-1].dim_value == next(a.i for a in nodes[0].attribute if a.name == "out_features")
    assert all(n.domain != "se" for n in onnx.load(str(exports["llama-portable"] / MODEL_FILE)).graph.node)


def test_validate_cli_on_an_expanded_checkpoint(tmp_path, tiny_tokenizer):
    model = _expanded("llama", tiny_tokenizer, seed=2)
    save_checkpoint(model, tiny_tokenizer, tmp_path / "ckpt", {"method": "se"})
    proc = run_cli("onnx", tmp_path / "ckpt", "--out", tmp_path / "onnx")
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("validate", tmp_path / "onnx", "--tokens", "6", "--ppl-windows", "0", "--json")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    report = json.loads(proc.stdout)
    assert report["passed"] and report["checks"]["routing"]["agreement"] == 1.0
    assert report["checks"]["generation"]["agreement"] == 1.0
    proc = run_cli("onnx", tmp_path / "ckpt", "--out", tmp_path / "onnx")
    assert proc.returncode == 2 and "--overwrite" in proc.stderr
    _damaged_exports_fail_in_one_line(tmp_path / "onnx", tmp_path)
    # fp16: the logits are compared with the reference routed as the graph routed, the comparison
    # with the reference's own routing is reported beside it
    # (the documented --model form; the model given twice is refused)
    assert run_cli("onnx", "--model", tmp_path / "ckpt", "--out", tmp_path / "onnx16", "--dtype", "fp16").returncode == 0
    _one_line_error(run_cli("onnx", tmp_path / "ckpt", "--model", tmp_path / "ckpt", "--out", tmp_path / "x"),
                    "give the model once")
    proc = run_cli("validate", tmp_path / "onnx16", "--tokens", "0", "--ppl-windows", "0", "--json")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    logits = json.loads(proc.stdout)["checks"]["logits"]
    assert logits["passed"] and logits["reference_routing"] == "the backend's"
    assert logits["cosine"] >= logits["own_routing_cosine"] - 1e-6 and logits["cosine"] >= 0.999


def _error_lines(proc) -> list[str]:
    """stderr without the progress lines (which precede a failure off a terminal)."""
    return [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("validate: ")]


def _damaged_exports_fail_in_one_line(export: Path, tmp_path: Path) -> None:
    """validate on a model.onnx with corrupted bytes, and on one whose packed tensors fail the
    op's own checks (a row pointer past the values), answers one line naming the file and the fix."""
    flipped = tmp_path / "flipped"
    shutil.copytree(export, flipped)
    data = bytearray((flipped / MODEL_FILE).read_bytes())
    for i in range(100, len(data), 97):
        data[i] ^= 0x5A
    (flipped / MODEL_FILE).write_bytes(bytes(data))
    proc = run_cli("validate", flipped, "--tokens", "2", "--ppl-windows", "0")
    lines = _error_lines(proc)
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: cannot read") and str(flipped / MODEL_FILE) in lines[0] and "se-export onnx" in lines[0]

    edited = tmp_path / "edited"
    shutil.copytree(export, edited)
    model = onnx.load(str(edited / MODEL_FILE))
    row_ptr = next(t for t in model.graph.initializer if t.name.endswith("row_ptr"))
    values = numpy_helper.to_array(row_ptr).copy()
    values[-1] = 1 << 30  # a row that starts far past the values
    row_ptr.CopyFrom(numpy_helper.from_array(values, row_ptr.name))
    onnx.save(model, str(edited / MODEL_FILE))
    proc = run_cli("validate", edited, "--tokens", "2", "--ppl-windows", "0")
    lines = _error_lines(proc)
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "ONNX Runtime failed to run" in lines[0] and "se-export onnx" in lines[0], lines[0]


def test_reference_replays_a_given_routing(models):
    """validate's fp16 comparison replays the backend's routing in the reference: the model's own
    routing replayed gives its own logits, one group rerouted changes them, a group left out is an
    error, and nothing stays forced afterwards."""
    from se_export.errors import SEError
    from se_export.eval.validate import TorchCausalLM

    lm = TorchCausalLM(copy.deepcopy(models["llama-se"]))
    ids = np.random.default_rng(0).integers(0, lm.model.config.vocab_size, size=(2, 9))
    own = lm.routing(ids)
    free, _ = lm.run(ids)
    assert np.array_equal(lm.run(ids, routing=own)[0], free)
    group = next(iter(own))
    moved = {**own, group: (own[group] + 1) % 4}
    assert not np.allclose(lm.run(ids, routing=moved)[0], free, atol=1e-3)
    with pytest.raises(SEError, match="no routing given"):
        lm.run(ids, routing={group: own[group]})
    assert np.array_equal(lm.run(ids)[0], free)


def test_clear_errors_for_foreign_corrupt_or_unloadable_graphs(exports, tmp_path, monkeypatch):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / MODEL_FILE).write_bytes((exports["llama-dense"] / MODEL_FILE).read_bytes())
    with pytest.raises(SEError, match="not an se-export ONNX folder"):
        OrtCausalLM(foreign)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for f in exports["llama-se-fp32"].iterdir():
        (corrupt / f.name).write_bytes(f.read_bytes())
    data = (corrupt / MODEL_FILE).read_bytes()
    (corrupt / MODEL_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(SEError, match="cannot load"):
        OrtCausalLM(corrupt)
    monkeypatch.setenv("SE_EXPORT_LIB_DIR", str(tmp_path / "empty"))
    with pytest.raises(SEError, match="make plugins"):
        OrtCausalLM(exports["llama-se-fp32"])
    OrtCausalLM(exports["llama-portable"])  # the portable graph needs no library


# ------------------------------------------------------------------ the custom op alone


def _single_node(packed, g, b, bias, with_ids: bool, x_type=TensorProto.FLOAT):
    return ort_session(single_node_model(packed, g, b, bias, with_ids, x_type))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 1000), k=st.integers(1, 4), out=st.integers(1, 20), inn=st.integers(1, 40),
       tokens=st.sampled_from([1, 4, 70]), fmt=st.sampled_from(["bitmap", "csr16"]),
       vdtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), fp16_x=st.booleans(),
       with_bias=st.booleans(), with_ids=st.booleans())
def test_ort_op_matches_the_torch_op(seed, k, out, inn, tokens, fmt, vdtype, fp16_x, with_bias, with_ids):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(k, out, inn, generator=gen) < 0.5
    packed = pack_experts(torch.randn(k, out, inn, generator=gen) * mask, mask, fmt, vdtype)
    g, b = torch.randn(inn, k, generator=gen), torch.randn(k, generator=gen)
    bias = torch.randn(k, out, generator=gen) if with_bias else None
    x = torch.randn(tokens, inn, generator=gen).to(torch.float16 if fp16_x else torch.float32)
    ids = torch.randint(0, k, (tokens,), generator=gen, dtype=torch.int32) if with_ids else None
    sess = _single_node(packed, g, b, bias, with_ids, TensorProto.FLOAT16 if fp16_x else TensorProto.FLOAT)
    feeds = {"x": x.numpy()} | ({"ids": ids.numpy()} if with_ids else {})
    y, got_ids = sess.run(None, feeds)
    ref, ref_ids = ops.routed_sparse_matmul(x, g, b, packed.values, packed.indices, packed.row_ptr, bias, ids, out, fmt)
    assert np.array_equal(got_ids, ref_ids.numpy())
    tol = 1e-4 if not fp16_x else 1e-2
    assert np.allclose(y.astype(np.float32), ref.float().numpy(), rtol=tol, atol=tol)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 1000), k=st.integers(1, 4), out=st.integers(1, 24), inn=st.integers(1, 40),
       tokens=st.sampled_from([3, 17, 64]), min_group=st.sampled_from([1, 3, 8]),
       fmt=st.sampled_from(["bitmap", "csr16"]), vdtype=st.sampled_from([torch.float32, torch.float16]),
       fp16_x=st.booleans(), with_bias=st.booleans(), with_ids=st.booleans(), band_rows=st.sampled_from([0, 1, 5]))
def test_ort_op_dense_groups_on_ort_gemm_match_the_torch_op(seed, k, out, inn, tokens, min_group, fmt, vdtype, fp16_x,
                                                            with_bias, with_ids, band_rows, monkeypatch):
    """Large groups of dense-enough experts go through ONNX Runtime's Gemm (invoked from the op),
    whole or in bands of output rows (SE_ORT_DENSE_TILE_BYTES; 0 = whole); sparser experts and small
    groups stay on the sparse kernel. Every case against the golden op."""
    monkeypatch.setenv("SE_ORT_DENSE_GROUP_TOKENS", str(min_group))
    monkeypatch.setenv("SE_ORT_DENSE_TILE_BYTES", str(band_rows * inn * 4))
    gen = torch.Generator().manual_seed(seed)
    keep = torch.tensor([0.7, 0.2, 0.5, 1.0][:k]).view(k, 1, 1)  # some experts above the 0.4 density bar, some below
    mask = torch.rand(k, out, inn, generator=gen) < keep
    packed = pack_experts(torch.randn(k, out, inn, generator=gen) * mask, mask, fmt, vdtype)
    g, b = torch.randn(inn, k, generator=gen), torch.randn(k, generator=gen)
    bias = torch.randn(k, out, generator=gen) if with_bias else None
    x = torch.randn(tokens, inn, generator=gen).to(torch.float16 if fp16_x else torch.float32)
    ids = torch.randint(0, k, (tokens,), generator=gen, dtype=torch.int32) if with_ids else None
    if with_ids and seed % 2:
        ids.fill_(0)  # all tokens on one expert
    sess = _single_node(packed, g, b, bias, with_ids, TensorProto.FLOAT16 if fp16_x else TensorProto.FLOAT)
    y, got_ids = sess.run(None, {"x": x.numpy()} | ({"ids": ids.numpy()} if with_ids else {}))
    ref, ref_ids = ops.routed_sparse_matmul(x, g, b, packed.values, packed.indices, packed.row_ptr, bias, ids, out, fmt)
    assert np.array_equal(got_ids, ref_ids.numpy())
    tol = 1e-4 if not fp16_x else 1e-2
    assert np.allclose(y.astype(np.float32), ref.float().numpy(), rtol=tol, atol=tol)


def test_ort_op_dense_groups_are_taken_and_rejected_ids_still_fail(monkeypatch):
    """With the threshold at 1 token every dense-enough expert runs on ORT's Gemm: the result must
    still equal the sparse-only run, and out-of-range ids must still be rejected."""
    gen = torch.Generator().manual_seed(5)
    mask = torch.rand(3, 16, 32, generator=gen) < 0.8
    packed = pack_experts(torch.randn(3, 16, 32, generator=gen) * mask, mask, "bitmap", torch.float16)
    g, b = torch.randn(32, 3, generator=gen), torch.randn(3, generator=gen)
    x = np.random.default_rng(1).standard_normal((40, 32)).astype(np.float32)
    results = {}
    for threshold in ("0", "1"):
        monkeypatch.setenv("SE_ORT_DENSE_GROUP_TOKENS", threshold)
        sess = _single_node(packed, g, b, None, True)
        results[threshold] = sess.run(None, {"x": x, "ids": (np.arange(40) % 3).astype(np.int32)})[0]
        with pytest.raises(Exception, match="outside"):
            sess.run(None, {"x": x, "ids": np.full(40, 3, np.int32)})
    assert np.abs(results["0"] - results["1"]).max() <= 1e-4
    # Proof the GEMM ran: it multiplies the pruned zeros too, so an infinite activation in a column
    # that a row pruned gives NaN there, where the sparse kernel (which skips pruned weights) does not.
    x_inf = x.copy()
    x_inf[:, 0] = np.inf
    pruned_col0 = ~mask[:, :, 0].numpy()  # [K, out]
    assert pruned_col0.any()
    ids = (np.arange(40) % 3).astype(np.int32)
    for threshold, expect_nan in (("0", False), ("1", True)):
        monkeypatch.setenv("SE_ORT_DENSE_GROUP_TOKENS", threshold)
        y = _single_node(packed, g, b, None, True).run(None, {"x": x_inf, "ids": ids})[0]
        assert np.isnan(y[pruned_col0[ids]]).all() == expect_nan, threshold


def test_ort_op_reports_invalid_inputs_as_errors():
    gen = torch.Generator().manual_seed(0)
    mask = torch.rand(3, 5, 12, generator=gen) < 0.5
    packed = pack_experts(torch.randn(3, 5, 12, generator=gen) * mask, mask, "csr16", torch.float16)
    g, b = torch.randn(12, 3), torch.randn(3)
    sess = _single_node(packed, g, b, None, True)
    x = np.random.default_rng(0).standard_normal((4, 12)).astype(np.float32)
    with pytest.raises(Exception, match="outside"):
        sess.run(None, {"x": x, "ids": np.array([0, 1, 3, 0], np.int32)})
    with pytest.raises(Exception, match="one entry per token"):
        sess.run(None, {"x": x, "ids": np.array([0, 1], np.int32)})
    bad = packed.indices.clone()
    bad[0] = 12
    bad_sess = _single_node(type(packed)(**{**packed.__dict__, "indices": bad}), g, b, None, False)
    with pytest.raises(Exception, match="column"):
        bad_sess.run(None, {"x": x})
    short = type(packed)(**{**packed.__dict__, "row_ptr": packed.row_ptr[:-1]})
    with pytest.raises(Exception, match="row_ptr"):
        _single_node(short, g, b, None, False).run(None, {"x": x})
    assert sess.run(None, {"x": x, "ids": np.array([0, 1, 2, 0], np.int32)})[0].shape == (4, 5)  # still usable


def test_bench_ort_times_every_export_in_one_run(exports):
    from se_export.eval.bench_ort import bench_ort, format_table

    result = bench_ort([exports["llama-dense"], exports["llama-se-fp32"]], prompt_len=8, decode_tokens=3, repeats=1)
    runs = result["runs"]
    assert [r["custom_op_nodes"] for r in runs] == [0, 9]
    assert all(r["prefill_ms"] > 0 and r["decode_tokens_per_s"] > 0 for r in runs)
    assert runs[0]["decode_speedup_vs_first"] == 1.0
    assert "llama-se-fp32" in format_table(result)


def test_bench_ort_interleaved_blocks_decode_what_generate_decodes(exports):
    """Every block restarts from the same prefill cache: each block of each export must decode
    exactly the greedy tokens of an uninterrupted generation, with the other export's blocks
    running in between."""
    from se_export.backends.ort_runtime import OrtCausalLM
    from se_export.eval.bench_ort import bench_interleaved, format_interleaved_table

    folders = [exports["llama-dense"], exports["llama-se-fp32"]]
    result = bench_interleaved(folders, prompt_len=8, decode_tokens=3, blocks=3)
    ids = np.random.default_rng(0).integers(0, OrtCausalLM(folders[0]).manifest["vocab_size"], size=(1, 8))
    for folder, run in zip(folders, result["runs"], strict=True):
        expected = OrtCausalLM(folder).generate(ids, 4)[:, 1:]
        np.testing.assert_array_equal(np.array(run["tokens"]), expected)
        assert len(run["block_tokens_per_s"]) == 3 and min(run["block_tokens_per_s"]) > 0
    first, second = result["runs"]
    assert first["decode_speedup_vs_first"] == 1.0 and first["decode_speedup_range"] == [1.0, 1.0]
    ratios = [a / b for a, b in zip(second["block_tokens_per_s"], first["block_tokens_per_s"], strict=True)]
    assert second["decode_speedup_vs_first"] == pytest.approx(sorted(ratios)[1])
    assert "alternating blocks" in format_interleaved_table(result)
    with pytest.raises(ValueError, match="at least one block"):
        bench_interleaved(folders, prompt_len=8, decode_tokens=3, blocks=0)


def _rms_norm_graph(extra_reciprocal_use: bool) -> onnx.ModelProto:
    """``x * Reciprocal(Sqrt(mean(x^2) + eps)) * w`` as torch.onnx writes RMSNorm (optionally with a
    second consumer of the reciprocal, which must block the rewrite)."""
    nodes = [
        helper.make_node("Pow", ["x", "two"], ["sq"]),
        helper.make_node("ReduceMean", ["sq", "axes"], ["mean"], keepdims=1),
        helper.make_node("Add", ["mean", "eps"], ["var"]),
        helper.make_node("Sqrt", ["var"], ["std"]),
        helper.make_node("Reciprocal", ["std"], ["inv"]),
        helper.make_node("Mul", ["x", "inv"], ["normed"]),
        helper.make_node("Mul", ["w", "normed"], ["y"]),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", 8])]
    if extra_reciprocal_use:
        nodes.append(helper.make_node("Identity", ["inv"], ["inv_out"]))
        outputs.append(helper.make_tensor_value_info("inv_out", TensorProto.FLOAT, ["b", "s", 1]))
    inits = [numpy_helper.from_array(np.array(2.0, np.float32), "two"),
             numpy_helper.from_array(np.array([-1], np.int64), "axes"),
             numpy_helper.from_array(np.array(1e-5, np.float32), "eps"),
             numpy_helper.from_array(np.linspace(0.5, 1.5, 8, dtype=np.float32), "w")]
    graph = helper.make_graph(nodes, "rms", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", 8])],
                              outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _fused_ops(model: onnx.ModelProto, tmp_path) -> list[str]:
    """Op types of ``model`` after ONNX Runtime's own graph optimizer."""
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]


@pytest.mark.parametrize("extra_use", [False, True])
def test_rms_norm_rewrite_is_exact_and_lets_ort_fuse_the_norm(extra_use, tmp_path):
    from se_export.export.onnx_rewrites import simplify_for_runtimes

    original = _rms_norm_graph(extra_use)
    rewritten = simplify_for_runtimes(copy.deepcopy(original))
    onnx.checker.check_model(rewritten, full_check=True)
    ops_after = [n.op_type for n in rewritten.graph.node]
    assert ("Reciprocal" in ops_after) == extra_use  # a reciprocal used elsewhere is left alone
    x = np.random.default_rng(0).standard_normal((2, 5, 8)).astype(np.float32) * 3
    ref = x.astype(np.float64) / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-5)
    ref *= np.linspace(0.5, 1.5, 8)
    for model in (original, rewritten):
        y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        assert np.abs(y - ref).max() <= 1e-5
    if not extra_use:
        assert "SimplifiedLayerNormalization" in _fused_ops(rewritten, tmp_path)
        assert "SimplifiedLayerNormalization" not in _fused_ops(original, tmp_path)


def test_exported_graph_uses_fusable_norms_and_plain_attention(exports, models):
    """Every RMSNorm reaches ONNX Runtime in the fusable Div form, attention as MatMul/Softmax/MatMul
    (no SDPA key-transpose chain, no IsNaN guard)."""
    for name in ("llama-dense", "llama-se-fp32"):
        ops_in_graph = [n.op_type for n in onnx.load(str(exports[name] / MODEL_FILE), load_external_data=False).graph.node]
        assert "Reciprocal" not in ops_in_graph and "IsNaN" not in ops_in_graph, name
        assert ops_in_graph.count("Softmax") == models["llama-dense"].config.num_hidden_layers, name


def test_export_keeps_the_models_attention_implementation(tiny_tokenizer, tmp_path):
    model = build_tiny_model("llama", tiny_tokenizer)
    model.set_attn_implementation("sdpa")
    export_onnx(model, tiny_tokenizer, tmp_path / "x", source="test")
    assert model.config._attn_implementation == "sdpa"


def test_left_padded_batch_matches_pytorch(exports, models):
    """Padded rows (attention_mask 0 on the left) must not disturb the real tokens of any row."""
    lm = OrtCausalLM(exports["llama-se-fp32"])
    model = models["llama-se"]
    rng = np.random.default_rng(3)
    ids = rng.integers(0, model.config.vocab_size, size=(3, 10))
    mask = np.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :9] = 0
    positions = np.clip(mask.cumsum(-1) - 1, 0, None)
    got = lm.session.run(None, {**lm.feeds(ids, None, mask), "position_ids": positions})[0]
    with torch.no_grad(), decoded_expert_cache(1 << 30):
        ref = model(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                    position_ids=torch.from_numpy(positions)).logits.numpy()
    real = mask.astype(bool)
    assert np.isfinite(got).all()
    assert np.abs(got[real] - ref[real]).max() <= 1e-4


def test_fp32_logits_bound_scales_with_the_positions_largest_logit():
    """Rounding in the last hidden state reaches every logit of a position alike: a 2e-4 error on a
    small logit passes where the position's logits reach 30 (bound 1e-4 + 1e-5 * 30), fails where
    they stay near 1, and a 1e-3 error (no summation-order effect at fp32) fails everywhere."""
    from se_export.eval.validate import compare_logits, logits_ok

    rng = np.random.default_rng(0)
    big = rng.standard_normal((1, 2, 50))
    big[..., 0] = 30.0
    small = rng.standard_normal((1, 2, 50)) * 0.3
    for ref, err, ok in ((big, 2e-4, True), (small, 2e-4, False), (big, 1e-3, False)):
        got = ref.copy()
        got[0, 1, 7] += err  # a small logit
        stats = compare_logits(ref.astype(np.float32), got.astype(np.float32))
        assert logits_ok(stats, "fp32") == ok, (float(np.abs(ref).max()), err)
    exact = compare_logits(big.astype(np.float32), big.astype(np.float32))
    assert logits_ok(exact, "fp32") and exact["max_abs"] == 0


def test_validate_fails_a_graph_with_one_weight_matrix_off_by_five_percent(tmp_path, tiny_tokenizer):
    """The logits bound must still catch a real defect: one attention projection scaled by 1.05."""
    model = _expanded("llama", tiny_tokenizer, seed=3)
    save_checkpoint(model, tiny_tokenizer, tmp_path / "ckpt", {"method": "se"})
    assert run_cli("onnx", tmp_path / "ckpt", "--out", tmp_path / "onnx").returncode == 0
    path = tmp_path / "onnx" / MODEL_FILE
    graph = onnx.load(str(path))
    o_proj = next(i for i in graph.graph.initializer if "o_proj" in i.name or (i.dims and list(i.dims) == [64, 64]))
    o_proj.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(o_proj) * np.float32(1.05), o_proj.name))
    onnx.save(graph, str(path))
    proc = run_cli("validate", tmp_path / "onnx", "--tokens", "0", "--ppl-windows", "0", "--json")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert report["checks"]["logits"]["passed"] is False
    assert report["checks"]["logits"]["row_scaled_excess"] > 0


def test_ort_prefill_benchmark_runs_and_checks_both_paths(tmp_path):
    """bench/ort_prefill.py on a small layer: it checks the sparse tile and the dense groups against
    a numpy product before timing, and writes one row per (shape, batch, sparsity)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).parents[2]
    out = tmp_path / "ort_prefill.json"
    proc = subprocess.run([sys.executable, str(root / "bench" / "ort_prefill.py"), "--shapes", "40x24", "--batches", "130",
                           "--sparsities", "0.5", "2:4", "--threads", "1", "--out", str(out)],
                          capture_output=True, text=True, cwd=root, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [(r["batch"], r["sparsity"]) for r in rows] == [(130, "0.5"), (130, "2:4")]
    assert all(r["dense_groups_ms"] > 0 and r["sparse_tile_ms"] > 0 for r in rows)
