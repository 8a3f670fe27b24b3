"""The se-export command line, run as a user would (subprocess), on a tiny model folder."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import se_export
from se_export.formats.checkpoint import MANIFEST, WEIGHTS


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "se_export.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=300, env=env)


def _one_line_error(proc: subprocess.CompletedProcess, needle: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def expanded(tmp_path_factory, tiny_model_dir, calib_file) -> Path:
    out = tmp_path_factory.mktemp("cli") / "ckpt"
    proc = run_cli("expand", tiny_model_dir, "--out", out, "--experts", "4", "--calib", calib_file,
                   "--calib-samples", "8", "--seqlen", "32", "--min-cluster-tokens", "8", "--quiet")
    assert proc.returncode == 0, proc.stderr
    return out


def test_expand_writes_a_complete_checkpoint_and_report(expanded):
    manifest = json.loads((expanded / MANIFEST).read_text())
    assert manifest["complete"] and manifest["method"] == "se" and manifest["experts"] == 4
    assert manifest["stats"]["expert_bytes"] > 0
    report = json.loads((expanded / "expand_report.json").read_text())
    assert all("cluster_sizes" in g for layer in report["layers"] for g in layer["groups"])
    assert not (expanded / ".se-partial").exists()
    assert se_export.load(expanded) is not None


def test_magnitude_expands_without_reading_calibration_text(tmp_path, tiny_model_dir):
    out = tmp_path / "mag"
    proc = run_cli("expand", tiny_model_dir, "--out", out, "--method", "magnitude", "--sparsity", "2:4",
                   "--calib", tmp_path / "does-not-exist.txt", "--quiet")
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["calibration"]["source"] is None and manifest["method"] == "magnitude"


def test_eval_json_resume_and_calibration_overlap_guard(expanded, eval_file, calib_file, tmp_path):
    state = tmp_path / "eval-state.json"
    args = ("eval", expanded, "--text", eval_file, "--seqlen", "32", "--max-windows", "3", "--batch", "2", "--json",
            "--resume", state)
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    first = json.loads(proc.stdout)
    assert first["windows"] == 3 and first["perplexity"] > 1 and first["resumed_windows"] == 0
    saved = json.loads(state.read_text())  # --resume: as if stopped after the first batch
    state.write_text(json.dumps({**saved, "window_nll": saved["window_nll"][:2]}))
    again = json.loads(run_cli(*args).stdout)
    assert again["resumed_windows"] == 2
    assert again["window_nll"] == first["window_nll"] and again["perplexity"] == first["perplexity"]
    _one_line_error(run_cli("eval", expanded, "--text", calib_file, "--seqlen", "32"), "calibrated on")


def test_refuses_to_overwrite_a_checkpoint(expanded, tiny_model_dir, calib_file):
    _one_line_error(run_cli("expand", tiny_model_dir, "--out", expanded, "--calib", calib_file), "--overwrite")


@pytest.mark.parametrize(("args", "needle"), [
    (["expand", "no/such-model-here", "--out", "{tmp}/o"], "cannot load"),
    (["expand", "./missing-folder", "--out", "{tmp}/o"], "unknown model"),
    (["expand", "{model}", "--out", "{tmp}/o", "--sparsity", "half"], "bad sparsity"),
    (["expand", "{model}", "--out", "{tmp}/o", "--calib", "{calib}", "--calib-samples", "1", "--seqlen", "8",
      "--experts", "16"], "larger than the 8 calibration tokens"),
    (["expand", "{model}", "--out", "{tmp}/o", "--calib", "{tmp}/none.txt"], "not found"),
    (["eval", "{tmp}", "--text", "{calib}"], "without config.json"),
    (["onnx", "{model}", "--out", "{tmp}/x", "--dtype", "fp8"], "unknown --dtype"),
    (["validate", "{tmp}"], "not an se-export ONNX folder"),
    (["validate", "{tmp}/nowhere"], "is not a folder"),
    (["expand", "{model}", "--out", "{tmp}/o", "--value-dtype", "int3"], "unknown value dtype 'int3'"),
    (["expand", "{model}", "--out", "{tmp}/o", "--value-dtype", "int4", "--group-size", "0"], "group-size must be >= 1"),
    (["expand", "{model}", "--out", "{tmp}/o", "--calib", "{calib}", "--calib-samples", "8", "--seqlen", "32",
      "--experts", "2", "--min-cluster-tokens", "8", "--value-dtype", "int8", "--group-size", "4096"],
     "larger than the 64 input features"),
    (["expand", "{model}", "--out", "{tmp}/o", "--quant-method", "rtn"], "add --value-dtype int8 or int4"),
    (["expand", "{model}", "--out", "{tmp}/o", "--value-dtype", "int4", "--quant-method", "gptq"],
     "unknown --quant-method 'gptq'"),
])
def test_bad_input_gives_one_line_error(args, needle, tmp_path, tiny_llama_dir, calib_file):
    filled = [a.format(tmp=tmp_path, model=tiny_llama_dir, calib=calib_file) for a in args]
    _one_line_error(run_cli(*filled, cwd=tmp_path), needle)


def test_corrupt_checkpoint_is_detected(expanded, tmp_path, eval_file):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(expanded, broken)
    data = bytearray((broken / WEIGHTS).read_bytes())
    data[-100] ^= 0xFF
    (broken / WEIGHTS).write_bytes(bytes(data))
    _one_line_error(run_cli("eval", broken, "--text", eval_file, "--seqlen", "32"), "corrupt checkpoint")
    (broken / WEIGHTS).write_bytes(bytes(data[: len(data) // 2]))
    _one_line_error(run_cli("eval", broken, "--text", eval_file, "--seqlen", "32"), "corrupt checkpoint")
    (broken / MANIFEST).write_text("{not json")
    _one_line_error(run_cli("eval", broken, "--text", eval_file, "--seqlen", "32"), "corrupt checkpoint")


def test_interrupted_save_is_not_a_checkpoint(expanded, tmp_path, eval_file):
    import shutil

    partial = tmp_path / "partial"
    shutil.copytree(expanded, partial)
    (partial / MANIFEST).unlink()  # what a crash before the manifest leaves behind
    _one_line_error(run_cli("eval", partial, "--text", eval_file, "--seqlen", "32"), "incomplete")


def test_analyze_writes_report_arrays_and_plots(tmp_path, tiny_llama_dir, calib_file):
    from safetensors.torch import load_file

    out = tmp_path / "report"
    proc = run_cli("analyze", tiny_llama_dir, "--out", out, "--text", calib_file, "--tokens", "256",
                   "--seqlen", "32", "--quiet")
    assert proc.returncode == 0, proc.stderr
    for name in ("report.md", "summary.json", "summary.csv", "wd_histograms.png", "wd_heatmap.png"):
        assert (out / name).stat().st_size > 0
    arrays = load_file(str(out / "neurons.safetensors"))
    assert arrays["layer.0.wd"].shape == (96,)
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["layers"]) == 3 and summary["tokens"] == 256
    report = (out / "report.md").read_text()
    assert "Sparse Expansion K=16" in report and list(out.glob("neuron_*.png"))
    _one_line_error(run_cli("analyze", tiny_llama_dir, "--out", out, "--neuron", "x"), "bad --neuron")


def test_analyze_accepts_an_expanded_checkpoint(expanded, tmp_path, calib_file):
    out = tmp_path / "ckpt-report"
    proc = run_cli("analyze", expanded, "--out", out, "--text", calib_file, "--tokens", "128", "--seqlen", "32",
                   "--quiet")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert all(row["wd_q100"] >= row["wd_q50"] >= 0 for row in summary["layers"])


def test_doctor_reports_the_libraries_and_kernel_path_this_process_uses(tmp_path):
    """`se-export doctor` names the CPU kernels' path the library really takes, and each built library."""
    import torch

    from se_export.backends import kernels

    proc = run_cli("doctor", "--json", tmp_path / "doctor.json")
    assert proc.returncode == 0, proc.stderr
    rep = json.loads((tmp_path / "doctor.json").read_text())
    assert rep["packages"]["torch"] == torch.__version__
    for name, path in rep["libraries"].items():
        assert path is None or Path(path).is_file(), name
    if kernels.find_library(kernels.KERNELS_LIB):
        assert rep["cpu_kernels"]["isa"] == kernels.isa()
        assert f"CPU kernels: {kernels.isa()} path" in proc.stdout
    assert rep["gpu"]["cuda_available"] == torch.cuda.is_available()


def test_doctor_says_how_to_build_what_is_missing(tmp_path):
    env = {**os.environ, "SE_EXPORT_LIB_DIR": str(tmp_path), "SE_KERNELS_ISA": "portable"}
    proc = subprocess.run([sys.executable, "-m", "se_export.cli", "doctor"], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    from se_export.doctor import LIBRARIES

    assert proc.stdout.count("missing: install a wheel or run `make plugins`") == len(LIBRARIES) == 5
    assert "CPU kernels: not built" in proc.stdout


@pytest.fixture(scope="module")
def expanded_int4(tmp_path_factory, tiny_llama_dir, calib_file) -> Path:
    out = tmp_path_factory.mktemp("cli-int4") / "ckpt"
    proc = run_cli("expand", tiny_llama_dir, "--out", out, "--experts", "4", "--calib", calib_file,
                   "--calib-samples", "8", "--seqlen", "32", "--min-cluster-tokens", "8", "--value-dtype", "int4",
                   "--group-size", "16", "--quiet")
    assert proc.returncode == 0, proc.stderr
    return out


def test_int4_experts_store_smaller_load_and_evaluate(expanded_int4, tmp_path, tiny_llama_dir, calib_file,
                                                      eval_file):
    fp16 = tmp_path / "fp16"
    proc = run_cli("expand", tiny_llama_dir, "--out", fp16, "--experts", "4", "--calib", calib_file,
                   "--calib-samples", "8", "--seqlen", "32", "--min-cluster-tokens", "8", "--quiet")
    assert proc.returncode == 0, proc.stderr
    q, f = (json.loads((d / MANIFEST).read_text()) for d in (expanded_int4, fp16))
    assert q["format_version"] == f["format_version"] == 4
    assert q["value_dtype"] == "int4" and q["group_size"] == 16
    assert all(m["value_dtype"] == "int4" for m in q["modules"].values())
    # the same masks' codes at 4 bits and 16-column fp16 scales against fp16 values
    assert q["expert_bytes_stored"] < 0.6 * f["expert_bytes_stored"]
    model = se_export.load(expanded_int4)
    module = next(m for m in model.modules() if hasattr(m, "quant") and m.quant is not None)
    assert module.values.dtype == torch.int8 and int(module.values.min()) >= -8 and int(module.values.max()) <= 7
    proc = run_cli("eval", expanded_int4, "--text", eval_file, "--seqlen", "32", "--max-windows", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["perplexity"] > 1


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_experts_export_the_custom_op_and_validate(bits, expanded_int4, tmp_path, tiny_llama_dir,
                                                             calib_file, monkeypatch):
    """RoutedSparseMatMul version 2 carries int8 codes, or int4 codes two per byte, and fp16 scales;
    ONNX Runtime's logits, decode step and generation match PyTorch at fp32. A library that only
    implements version 1 is refused with the fix."""
    ckpt = expanded_int4
    if bits == 8:
        ckpt = tmp_path / "int8"
        proc = run_cli("expand", tiny_llama_dir, "--out", ckpt, "--experts", "4", "--calib", calib_file,
                       "--calib-samples", "8", "--seqlen", "32", "--min-cluster-tokens", "8", "--value-dtype", "int8",
                       "--group-size", "32", "--quiet")
        assert proc.returncode == 0, proc.stderr
    out = tmp_path / "onnx"
    proc = run_cli("onnx", ckpt, "--out", out)
    assert proc.returncode == 0, proc.stderr
    import onnx

    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert {o.domain: o.version for o in model.opset_import}["se"] == 2
    nodes = [n for n in model.graph.node if n.domain == "se"]
    init = {i.name: i for i in model.graph.initializer}
    se_model = se_export.load(ckpt)
    nnz = {m.values.numel() for m in se_model.modules() if getattr(m, "quant", None) is not None}
    for node in nodes:
        values, scales = init[node.input[3]], init[node.input[8]]
        assert values.data_type == (onnx.TensorProto.UINT8 if bits == 4 else onnx.TensorProto.INT8)
        assert scales.data_type == onnx.TensorProto.FLOAT16
        count = values.dims[0] * 2 if bits == 4 else values.dims[0]
        assert count in nnz or count - 1 in nnz  # int4: two codes per byte
    proc = run_cli("validate", out, "--tokens", "8", "--ppl-windows", "0", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert report["passed"] and {"logits", "decode_step", "generation"} <= set(report["checks"])

    from se_export.backends import ort_runtime
    from se_export.errors import SEError

    _check_tensorrt_form_of_quantized_nodes(out, tmp_path / "trt.onnx", se_model, bits)
    monkeypatch.setattr(ort_runtime, "ort_library_op_version", lambda path: 1)
    with pytest.raises(SEError, match="needs RoutedSparseMatMul version 2") as info:
        ort_runtime.OrtCausalLM(out)
    assert "\n" not in str(info.value) and "make plugins" in str(info.value)


def _check_tensorrt_form_of_quantized_nodes(export: Path, dst: Path, se_model, bits: int) -> None:
    """The TensorRT form carries the codes' bytes as int32 words, the value count and precision as
    attributes and the scales last. Read back as the plugin reads them, the CUDA kernels'
    decomposition (their CPU reference) computes each module's output."""
    import onnx
    from onnx import helper, numpy_helper

    from se_export.backends.cuda_kernels import reference_matmul
    from se_export.export.trt_onnx import prepare_for_tensorrt
    from se_export.formats.quantization import QuantSpec, unpack_int4
    from se_export.formats.sparse_format import PackedExperts
    from se_export.modeling import ops

    stats = prepare_for_tensorrt(export / "model.onnx", dst)
    model = onnx.load(str(dst))
    init = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    nodes = [n for n in model.graph.node if n.domain == "se"]
    assert stats["quantized"] == len(nodes) > 0
    for node in nodes:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["value_dtype"] == (b"int4" if bits == 4 else b"int8")
        # the module whose weights the node holds: "model.<module path>.indices"
        module = se_model.get_submodule(node.input[4].removeprefix("model.").removesuffix(".indices"))
        assert attrs["nnz"] == module.values.numel()
        words, scales = init[node.input[3]], init[node.input[-1]]
        assert words.dtype == np.int32 and scales.dtype == np.float16, "codes as int32 words, fp16 scales last"
        assert len(node.input) in (7, 8) and "" not in node.input, "no empty inputs: bias dropped, ids kept if routed"
        raw = torch.from_numpy(words.view(np.uint8).copy())
        nnz = attrs["nnz"]
        codes = unpack_int4(raw[: (nnz + 1) // 2], nnz) if bits == 4 else raw[:nnz].view(torch.int8)
        packed = PackedExperts(module.format, module.num_experts, module.out_features, module.in_features, codes,
                               module.indices, module.row_ptr, torch.from_numpy(scales),
                               QuantSpec(bits, int(attrs["group_size"])))
        x = torch.randn(6, module.in_features, generator=torch.Generator().manual_seed(nnz))
        ids = ops.route(x, module.router_weight, module.router_bias)
        for gemv_max in (0, 1):  # GEMV and grouped paths
            y, _ = reference_matmul(packed, module.router_weight, module.router_bias, x, module.bias, ids, gemv_max)
            assert torch.allclose(y, module(x), atol=1e-4, rtol=1e-4)


def test_quantized_module_runs_the_reference_semantics(expanded_int4):
    """The module's forward (the C++ kernels on int codes) equals dequantize-then-matmul in float64,
    and so does the reference op given int4 codes two per byte, as the exported graph holds them."""
    from se_export.modeling import ops

    model = se_export.load(expanded_int4)
    module = next(m for m in model.modules() if getattr(m, "quant", None) is not None)
    x = torch.randn(5, 7, module.in_features)
    ids = ops.route(x.reshape(-1, module.in_features), module.router_weight, module.router_bias)
    packed = module.packed()
    expect = torch.stack([packed.unpack_expert(int(k), torch.float64) @ row.double()
                          for k, row in zip(ids, x.reshape(-1, module.in_features), strict=True)])
    if module.bias is not None:
        expect += module.bias.double()[ids.long()]
    got = module(x).reshape(-1, module.out_features)
    assert torch.allclose(got.double(), expect, atol=1e-4, rtol=1e-4)
    module.pack_for_export()
    assert module.op_values().dtype == torch.uint8 and module.op_values().numel() == (module.values.numel() + 1) // 2
    y, _ = torch.ops.se.routed_sparse_matmul(x, module.router_weight, module.router_bias, module.op_values(),
                                             module.indices, module.row_ptr, module.bias, None, module.out_features,
                                             module.format, module.scales, module.quant.group_size)
    assert torch.allclose(y.reshape(-1, module.out_features).double(), expect, atol=1e-4, rtol=1e-4)


def test_python_m_se_export_is_the_cli_and_logs_progress_as_plain_lines(expanded, eval_file):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "se_export", "eval", str(expanded), "--text", str(eval_file),
                           "--seqlen", "32", "--max-windows", "3", "--batch", "1"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    steps = [line for line in proc.stderr.splitlines() if re.search(r"\d/3, \d+:\d\d:\d\d elapsed", line)]
    assert len(steps) == 3, proc.stderr  # one line per window (stderr is a pipe here, not a terminal)
    assert "perplexity" in proc.stderr and "3 x 32 tokens" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "se_export", "eval", str(expanded), "--text", str(eval_file),
                           "--seqlen", "32", "--max-windows", "3", "--batch", "1", "--quiet"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0 and not re.search(r"\d/3, \d+:\d\d:\d\d elapsed", proc.stderr), proc.stderr


def test_int4_experts_export_portable_and_validate_in_onnx_runtime(expanded_int4, tmp_path):
    """Standard ops carry the int8 codes and fp16 scales; ONNX Runtime's logits, decode step with
    the KV cache and greedy generation match the dequantizing PyTorch reference at fp32."""
    out = tmp_path / "onnx-int4"
    proc = run_cli("onnx", expanded_int4, "--out", out, "--portable")
    assert proc.returncode == 0, proc.stderr
    # off a terminal (stderr is a pipe): plain progress lines, the last one complete
    assert re.search(r"ONNX export: saved and checked: 3/3, \d+:\d\d:\d\d elapsed", proc.stderr), proc.stderr
    import onnx

    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    kinds = {i.data_type for i in graph.initializer}
    assert onnx.TensorProto.INT8 in kinds and onnx.TensorProto.FLOAT16 in kinds  # codes and scales, not floats
    assert not any(n.domain == "se" for n in graph.node)
    proc = run_cli("validate", out, "--tokens", "8", "--ppl-windows", "0", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert report["passed"] and {"logits", "decode_step", "generation"} <= set(report["checks"])
    proc = run_cli("validate", out, "--tokens", "2", "--ppl-windows", "0")
    steps = [line for line in proc.stderr.splitlines() if re.match(r"validate: .+: \d/5, \d+:\d\d:\d\d elapsed", line)]
    assert proc.returncode == 0 and len(steps) == 5, proc.stderr  # model, session, logits, decode, generation
    proc = run_cli("validate", out, "--tokens", "2", "--ppl-windows", "0", "--quiet")
    assert proc.returncode == 0 and "validate: " not in proc.stderr, proc.stderr
