"""The ONNX Runtime op library with CUDA kernels (libse_ort_ops_cuda.so): on the CPU it loads,
registers its CUDAExecutionProvider kernels and computes with its CPU kernels exactly as the CPU
library does; ``--provider cuda`` without onnxruntime-gpu is a one-line error. With a GPU and
onnxruntime-gpu (``gpu`` marker) the CUDA provider's results are compared with the CPU's."""

from __future__ import annotations

import ctypes

import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import random_experts, single_node_model
from test_cli import _one_line_error, run_cli

from se_export.backends.kernels import ORT_CUDA_LIB, find_library
from se_export.backends.ort_runtime import OrtCausalLM, ort_library
from se_export.errors import SEError

CUDA_OP_LIB = find_library(ORT_CUDA_LIB)
HAS_CUDA_EP = "CUDAExecutionProvider" in ort.get_available_providers()
needs_lib = pytest.mark.skipif(CUDA_OP_LIB is None, reason=f"{ORT_CUDA_LIB} is not built (make plugins needs nvcc)")


def _session(model, library, providers):
    opts = ort.SessionOptions()
    opts.register_custom_ops_library(str(library))
    return ort.InferenceSession(model.SerializeToString(), opts, providers=providers)


def _cases():
    return [(seed, k, out, inn, fmt, dtype) for seed, (k, out, inn) in enumerate([(3, 17, 40), (1, 5, 9), (4, 33, 130)])
            for fmt in ("bitmap", "csr16") for dtype in (torch.float32, torch.float16)]


@needs_lib
@pytest.mark.parametrize(("seed", "k", "out", "inn", "fmt", "dtype"), _cases())
def test_cuda_op_library_registers_and_its_cpu_kernels_match_the_cpu_library(seed, k, out, inn, fmt, dtype):
    packed, g, b, gen = random_experts(seed, k, out, inn, fmt, dtype)
    model = single_node_model(packed, g, b, torch.randn(k, out, generator=gen), with_ids=False)
    x = {"x": torch.randn(7, inn, generator=gen).numpy()}
    want = _session(model, ort_library(), ["CPUExecutionProvider"]).run(None, x)
    session = _session(model, CUDA_OP_LIB, ["CPUExecutionProvider"])  # alive: ONNX Runtime holds the library
    got = session.run(None, x)
    for a, b_ in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b_)
    count = ctypes.CDLL(str(CUDA_OP_LIB)).se_ort_cuda_kernel_count
    count.restype = ctypes.c_int32
    assert count() == 2 * 5 * 3, "a CUDA kernel per activation, value and index type"


def test_provider_cuda_without_onnxruntime_gpu_is_a_one_line_error(tmp_path):
    if HAS_CUDA_EP:
        pytest.skip("onnxruntime here has the CUDA execution provider")
    with pytest.raises(SEError, match="no CUDA execution provider") as info:
        OrtCausalLM(tmp_path, provider="cuda")
    assert "\n" not in str(info.value) and "onnxruntime-gpu" in str(info.value)
    _one_line_error(run_cli("validate", tmp_path, "--provider", "cuda"), "onnxruntime-gpu")
    _one_line_error(run_cli("bench", "ort", tmp_path, "--provider", "cuda"), "onnxruntime-gpu")
    with pytest.raises(SEError, match="unknown --provider 'tpu'"):
        OrtCausalLM(tmp_path, provider="tpu")


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_CUDA_EP and torch.cuda.is_available() and CUDA_OP_LIB is not None),
                    reason="needs a CUDA GPU, onnxruntime-gpu and the CUDA op library")
@pytest.mark.parametrize(("seed", "k", "out", "inn", "fmt", "dtype"), _cases())
def test_cuda_provider_matches_the_cpu_provider(seed, k, out, inn, fmt, dtype):
    packed, g, b, gen = random_experts(seed, k, out, inn, fmt, dtype)
    model = single_node_model(packed, g, b, None, with_ids=False)
    x = {"x": torch.randn(40, inn, generator=gen).numpy()}
    want = _session(model, CUDA_OP_LIB, ["CPUExecutionProvider"]).run(None, x)
    session = _session(model, CUDA_OP_LIB, ["CUDAExecutionProvider"])
    assert session.get_providers()[0] == "CUDAExecutionProvider"
    got = session.run(None, x)
    np.testing.assert_array_equal(got[1], want[1])  # the same routing
    np.testing.assert_allclose(got[0], want[0], rtol=2e-3, atol=2e-3)
