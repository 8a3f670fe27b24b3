"""se-export's TensorRT builder and runtime against a strict stand-in of the TensorRT API
(``strict_tensorrt``: non-null inputs, shapes within the profile, return values that mean
something, one plugin registry per process), then the same end to end on a real GPU with TensorRT
(``gpu`` marker). The stand-in computes with ONNX Runtime, so ``validate --backend trt`` compares
its logits, decode step and generation with PyTorch exactly as it would an engine's."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import strict_tensorrt
import torch
from test_cli import run_cli

from se_export.api import validate
from se_export.backends import trt_build, trt_runtime
from se_export.backends.kernels import find_library
from se_export.backends.trt_build import TRT_PLUGIN_LIB, ShapeRanges, build_engine, load_plugin
from se_export.backends.trt_runtime import TrtCausalLM
from se_export.errors import SEError

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
PLUGIN = find_library(TRT_PLUGIN_LIB)
needs_plugin = pytest.mark.skipif(PLUGIN is None, reason=f"{TRT_PLUGIN_LIB} is not built (make plugins needs nvcc)")


@pytest.fixture(scope="module")
def expanded_export(tmp_path_factory, tiny_llama_dir, calib_file):
    """An expanded tiny Llama (K=2, csr16) exported with the custom op; its manifest names the
    checkpoint, so validate loads the right PyTorch reference."""
    root = tmp_path_factory.mktemp("trt-runtime")
    ckpt, out = root / "ckpt", root / "onnx"
    proc = run_cli("expand", tiny_llama_dir, "--out", ckpt, "--experts", "2", "--calib", calib_file,
                   "--calib-samples", "8", "--seqlen", "32", "--min-cluster-tokens", "4", "--format", "csr16", "--quiet")
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("onnx", ckpt, "--out", out, "--quiet")
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="module")
def fp16_export(expanded_export, tmp_path_factory):
    """The same checkpoint exported with fp16 activations (a strongly typed TensorRT build)."""
    out = tmp_path_factory.mktemp("trt-runtime-fp16") / "onnx"
    ckpt = json.loads((expanded_export / "se_onnx.json").read_text())["source"]
    proc = run_cli("onnx", ckpt, "--out", out, "--dtype", "fp16", "--quiet")
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture
def strict_trt(monkeypatch):
    """se-export's TensorRT code with the stand-in as ``tensorrt``, host tensors instead of CUDA."""
    strict_tensorrt.reset()
    for module in (trt_build, trt_runtime):
        monkeypatch.setattr(module, "import_tensorrt", lambda: strict_tensorrt)
        monkeypatch.setattr(module, "require_gpu", lambda: None)
    monkeypatch.setattr(trt_runtime, "runtime_device", lambda: "cpu")
    yield strict_tensorrt
    strict_tensorrt.reset()


def test_shape_ranges_cap_the_tuned_sizes_at_the_maxima():
    ranges = ShapeRanges(max_seq=64, max_past=128)
    ranges.check()  # --max-seq 64 --max-past 128 alone is a valid range
    assert (ranges.opt_seq, ranges.opt_past, ranges.max_batch) == (64, 128, 3)
    with pytest.raises(SEError, match="--opt-seq 65 must be between 1 and --max-seq 64"):
        ShapeRanges(opt_seq=65, max_seq=64).check()


@needs_plugin
@pytest.mark.parametrize("max_batch", [1, 3])
def test_engine_builds_and_validates_through_the_strict_stand_in(expanded_export, strict_trt, tmp_path, max_batch):
    """Prefill binds the empty KV cache to a real address; validate's batch of 3 runs as slices when
    the engine takes one sequence; every node carries every plugin field."""
    engine = tmp_path / "model.engine"
    info = build_engine(expanded_export, engine, plugin=PLUGIN, log=lambda _: None,
                        ranges=ShapeRanges(max_batch=max_batch, max_seq=64, max_past=128))
    assert info["engine"] == str(engine) and engine.is_file() and info["nodes"] > 0
    assert not [m for m in strict_trt.LOG if m.startswith("[W]")], strict_trt.LOG
    report = validate(expanded_export, backend="trt", engine=engine, plugin=PLUGIN, tokens=6, ppl_windows=0,
                      show_progress=False)
    assert report.passed, json.dumps(report.checks, default=str)
    assert {"logits", "decode_step", "generation"} <= set(report.checks)


@needs_plugin
def test_an_fp16_export_builds_strongly_typed_and_validates(fp16_export, strict_trt, tmp_path):
    engine = tmp_path / "model.engine"
    info = build_engine(fp16_export, engine, plugin=PLUGIN, log=lambda _: None, ranges=ShapeRanges(max_seq=64, max_past=128))
    assert info["fp16"]
    import onnx

    graph = onnx.load(str(fp16_export / trt_build.TRT_ONNX_FILE), load_external_data=False)
    attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in graph.graph.node
             if n.op_type == "RoutedSparseMatMul"]
    assert attrs and all(a["x_dtype"] == b"fp16" for a in attrs), "the plugins offer fp16 activations only"
    report = validate(fp16_export, backend="trt", engine=engine, plugin=PLUGIN, tokens=4, ppl_windows=0,
                      show_progress=False)
    assert report.passed and report.dtype == "fp16", json.dumps(report.checks, default=str)


@needs_plugin
def test_runtime_slices_batches_and_matches_single_sequences(expanded_export, strict_trt, tmp_path):
    engine = tmp_path / "model.engine"
    build_engine(expanded_export, engine, plugin=PLUGIN, log=lambda _: None,
                 ranges=ShapeRanges(max_batch=2, max_seq=32, max_past=64))
    lm = TrtCausalLM(expanded_export, engine, PLUGIN)
    ids = np.random.default_rng(0).integers(0, lm.manifest["vocab_size"], (5, 7))
    logits, present, _ = lm.run(ids)
    assert logits.shape[0] == 5 and all(p.shape[0] == 5 and p.shape[2] == 7 for p in present)
    for row in (0, 2, 4):
        alone, _, _ = lm.run(ids[row:row + 1])
        np.testing.assert_allclose(logits[row:row + 1], alone, rtol=1e-5, atol=1e-5)
    step, after, _ = lm.run(ids[:, :1] * 0 + 3, present)  # decode with the cache of the prefill
    assert step.shape[:2] == (5, 1) and after[0].shape[2] == 8
    with pytest.raises(SEError, match="--max-seq") as info:
        lm.run(np.zeros((1, 33), np.int64))
    assert "\n" not in str(info.value)
    long_past = [np.zeros((1, lm.kv_heads, 65, lm.head_dim), np.float32)] * (2 * lm.layers)
    with pytest.raises(SEError, match="past=65"):
        lm.run(np.zeros((1, 1), np.int64), long_past)


@needs_plugin
def test_the_plugin_loads_once_per_process_and_a_failed_load_is_an_error(strict_trt, tmp_path):
    registry = strict_trt.get_plugin_registry()
    load_plugin(registry, PLUGIN)
    load_plugin(registry, PLUGIN)  # already registered (a second runtime, --dense-engine): success
    assert registry.get_creator("RoutedSparseMatMul", "1", "") is not None
    strict_trt.reset()
    not_a_plugin = find_library("libse_kernels.so")  # a shared library without getCreators
    for bad in (not_a_plugin, tmp_path / "libempty.so"):
        (tmp_path / "libempty.so").write_bytes(b"")
        with pytest.raises(SEError, match="could not load the plugin library") as info:
            load_plugin(registry, bad)
        assert "\n" not in str(info.value) and "make plugins" in str(info.value)


@needs_plugin
def test_the_stand_in_refuses_what_tensorrt_refuses(expanded_export, strict_trt, tmp_path):
    """The stand-in itself: a null input address, a shape outside the profile and an unloaded plugin
    fail as TensorRT documents, so the tests above could fail."""
    engine = tmp_path / "model.engine"
    build_engine(expanded_export, engine, plugin=PLUGIN, log=lambda _: None,
                 ranges=ShapeRanges(max_batch=1, max_seq=16, max_past=32))
    lm = TrtCausalLM(expanded_export, engine, PLUGIN)
    ctx = lm.contexts[0]
    assert not ctx.set_input_shape("input_ids", (2, 4)), "batch above the profile"
    assert not ctx.set_optimization_profile_async(1, 0), "profile 1 belongs to the other context"
    ids = np.zeros((1, 4), np.int64)
    monkey_bind = lm._bind
    lm._bind = lambda c, name, t: c.set_tensor_address(name, t.data_ptr())  # torch's null for empty tensors
    with pytest.raises(SEError, match="execution failed"):
        lm.run(ids)
    assert any("null address" in m for m in strict_trt.LOG)
    lm._bind = monkey_bind
    assert lm.run(ids)[0].shape[:2] == (1, 4)
    strict_trt.reset()
    network = strict_trt.Builder(strict_trt.Logger()).create_network(0)
    parser = strict_trt.OnnxParser(network, strict_trt.Logger())
    assert not parser.parse_from_file(str(expanded_export / trt_build.TRT_ONNX_FILE)), "no plugin loaded"
    assert "Plugin not found" in parser.get_error(0)


@needs_plugin
@pytest.mark.skipif(importlib.util.find_spec("polygraphy") is None, reason="polygraphy is not installed")
def test_the_printed_polygraphy_reference_run_works(expanded_export, tmp_path):
    """`se-export trt --dry-run` prints Polygraphy's parity check: ONNX Runtime on a --portable
    export saves inputs and outputs, the TensorRT run (with the autoload plugin library) loads
    them. The first half runs here; the second needs TensorRT."""
    import shlex
    import subprocess
    import sys

    lines = []
    build_engine(expanded_export, tmp_path / "model.engine", plugin=PLUGIN, dry_run=True, log=lines.append,
                 ranges=ShapeRanges(max_seq=16, max_past=32))
    parity = [line.removeprefix("parity: ") for line in lines if line.startswith("parity: ")]
    assert len(parity) == 2 and "--plugins" in parity[1] and trt_build.TRT_AUTOLOAD_LIB in parity[1]
    portable = tmp_path / "portable"
    ckpt = json.loads((expanded_export / "se_onnx.json").read_text())["source"]
    assert run_cli("onnx", ckpt, "--out", portable, "--portable", "--quiet").returncode == 0
    args = shlex.split(parity[0].split("   #")[0].replace("PORTABLE_EXPORT", str(portable)))
    assert args[0] == "polygraphy"
    polygraphy = Path(sys.executable).with_name("polygraphy")  # the console script beside this Python
    proc = subprocess.run([str(polygraphy), *args[1:]], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    saved = json.loads((tmp_path / "se_ort.json").read_text())
    assert (tmp_path / "se_inputs.json").is_file() and saved


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and HAS_TENSORRT), reason="needs a CUDA GPU and TensorRT")
def test_engine_build_and_validate_on_a_tiny_expanded_model(expanded_export, tmp_path):
    engine = tmp_path / "model.engine"
    proc = run_cli("trt", expanded_export, "--out", engine, "--max-seq", "64", "--max-past", "128")
    assert proc.returncode == 0, proc.stderr
    report = tmp_path / "report.json"
    proc = run_cli("validate", expanded_export, "--backend", "trt", "--engine", engine, "--tokens", "8",
                   "--ppl-windows", "0", "--report", report)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(report.read_text())["passed"]


@needs_plugin
def test_bench_trt_times_engines_with_the_bench_ort_protocol(expanded_export, strict_trt, tmp_path, monkeypatch):
    """`se-export bench trt ENGINE --dense-engine D`: the dense engine first, the same JSON shape as
    bench ort (prefill ms, decode tokens/s, ratios to the first), paired blocks with --interleave."""
    from typer.testing import CliRunner

    from se_export.cli import app

    engine = tmp_path / "model.engine"
    build_engine(expanded_export, engine, plugin=PLUGIN, log=lambda _: None,
                 ranges=ShapeRanges(max_seq=16, max_past=32))
    runner = CliRunner()
    out = tmp_path / "bench.json"
    result = runner.invoke(app, ["bench", "trt", str(engine), "--dense-engine", str(engine), "--plugin", str(PLUGIN),
                                 "--prompt-len", "8", "--decode-tokens", "3", "--repeats", "1", "--json", str(out)])
    assert result.exit_code == 0, result.output
    runs = json.loads(out.read_text())["runs"]
    assert [r["engine"] for r in runs] == [str(engine)] * 2 and runs[0]["decode_speedup_vs_first"] == 1.0
    assert all(r["prefill_ms"] > 0 and r["decode_tokens_per_s"] > 0 and r["onnx_dir"] == str(expanded_export)
               for r in runs)
    result = runner.invoke(app, ["bench", "trt", str(engine), "--plugin", str(PLUGIN), "--prompt-len", "8",
                                 "--decode-tokens", "2", "--interleave", "2", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert len(json.loads(out.read_text())["runs"][0]["block_tokens_per_s"]) == 2
    result = runner.invoke(app, ["bench", "trt", str(tmp_path / "missing.engine")])
    assert isinstance(result.exception, SEError) and "no engine at" in str(result.exception)


def test_bench_trt_without_tensorrt_is_a_one_line_error(tmp_path):
    if HAS_TENSORRT:
        pytest.skip("TensorRT is installed here")
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"an engine")
    proc = run_cli("bench", "trt", engine)
    assert proc.returncode != 0 and "tensorrt Python module is not installed" in proc.stderr
    assert len([line for line in proc.stderr.splitlines() if line.strip()]) == 1, proc.stderr


@needs_plugin
def test_bf16_expert_values_build_weakly_typed_with_the_bf16_flag(tiny_llama_dir, calib_file, strict_trt, tmp_path):
    """bf16 values in an fp32 graph: the weakly typed build sets BuilderFlag.BF16 (the stand-in,
    like TensorRT, refuses bf16 tensors without it), and the nodes name their values' type."""
    ckpt, out = tmp_path / "ckpt", tmp_path / "onnx"
    proc = run_cli("expand", tiny_llama_dir, "--out", ckpt, "--experts", "2", "--calib", calib_file, "--calib-samples",
                   "8", "--seqlen", "32", "--min-cluster-tokens", "4", "--value-dtype", "bf16", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert run_cli("onnx", ckpt, "--out", out, "--quiet").returncode == 0
    info = build_engine(out, tmp_path / "model.engine", plugin=PLUGIN, log=lambda _: None,
                        ranges=ShapeRanges(max_seq=16, max_past=32))
    assert info["bf16_values"] == info["nodes"] > 0 and not info["fp16"]
    strict_trt.reset()
    original = strict_trt.IBuilderConfig.set_flag
    strict_trt.IBuilderConfig.set_flag = lambda self, flag: None  # a builder that forgot the flag
    try:
        with pytest.raises(SEError, match="could not build"):
            build_engine(out, tmp_path / "again.engine", plugin=PLUGIN, log=lambda _: None,
                         ranges=ShapeRanges(max_seq=16, max_past=32))
    finally:
        strict_trt.IBuilderConfig.set_flag = original
    assert any("BuilderFlag.BF16" in m for m in strict_trt.LOG)


def test_without_a_cuda_torch_the_error_says_which_torch_to_install(monkeypatch):
    """The Python TensorRT path holds tensors in torch: a CPU-only torch (PyPI's on Jetson) is a
    one-line error naming the fix."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(SEError, match="has no CUDA support") as info:
        trt_build.require_gpu()
    assert "\n" not in str(info.value) and "Jetson" in str(info.value) and "se_runtime" in str(info.value)
