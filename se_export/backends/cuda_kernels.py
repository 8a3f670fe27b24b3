"""ctypes binding of the CUDA kernels (``libse_cuda_kernels.so``) and of their CPU reference.

``cuda_matmul`` runs the router + sparse GEMV / grouped kernels on torch CUDA tensors (GPU tests,
``bench/cuda_kernels.py``). ``reference_matmul`` runs the same decomposition on the CPU from
``libse_kernels.so``, so the kernels' indexing is checked against the torch op without a GPU.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from ..errors import SEError
from ..formats.sparse_format import PackedExperts
from .kernels import DTYPE_CODES, KERNELS_LIB, AbiExperts, ExpertsStruct, find_library

CUDA_LIB = "libse_cuda_kernels.so"


def _open(name: str, why: str) -> ctypes.CDLL:
    path = find_library(name)
    if path is None:
        raise SEError(f"{name} is not built: run `make plugins`{why}")
    return ctypes.CDLL(str(path))


_MATMUL_ARGS = [ctypes.POINTER(ExpertsStruct), ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32,
                ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]  # experts, G, b, x, dtype, T, ids, y


@functools.cache
def _cuda_lib() -> ctypes.CDLL:
    lib = _open(CUDA_LIB, " on a machine with nvcc")
    lib.se_cuda_workspace_size.restype = ctypes.c_size_t
    lib.se_cuda_workspace_size.argtypes = [ctypes.c_int64, ctypes.c_int64]
    lib.se_cuda_routed_sparse_matmul.argtypes = [*_MATMUL_ARGS, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int32,
                                                 ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]
    return lib


@functools.cache
def _reference_lib() -> ctypes.CDLL:
    lib = _open(KERNELS_LIB, "")
    lib.se_cuda_reference_matmul.argtypes = [*_MATMUL_ARGS, ctypes.c_int32, ctypes.c_char_p, ctypes.c_size_t]
    return lib


class _Bound(AbiExperts):
    """Packed experts (and router) on one device, laid out as the C ABI wants."""

    def __init__(self, packed: PackedExperts, g: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None,
                 device: torch.device) -> None:
        super().__init__(packed, bias, device)
        self.g = g.float().contiguous().to(device)
        self.b = b.float().contiguous().to(device)


def _flat(x: torch.Tensor, in_features: int, ids: torch.Tensor | None):
    if x.dtype not in (torch.float32, torch.float16):
        raise SEError(f"x dtype {x.dtype} is not supported: use fp32 or fp16")
    flat = x.reshape(-1, in_features).contiguous()
    ids_in = None if ids is None else ids.reshape(-1).to(torch.int32).contiguous()
    return flat, ids_in


def reference_matmul(packed: PackedExperts, g: torch.Tensor, b: torch.Tensor, x: torch.Tensor,
                     bias: torch.Tensor | None = None, expert_ids: torch.Tensor | None = None,
                     gemv_max_tokens: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """CPU run of the CUDA kernels' decomposition: ``(y, expert_ids)``."""
    bound = _Bound(packed, g, b, bias, torch.device("cpu"))
    flat, ids_in = _flat(x, packed.in_features, expert_ids)
    y = torch.empty(flat.shape[0], packed.out_features, dtype=x.dtype)
    ids = torch.empty(flat.shape[0], dtype=torch.int32)
    err = ctypes.create_string_buffer(512)
    if _reference_lib().se_cuda_reference_matmul(
            ctypes.byref(bound.struct), bound.g.data_ptr(), bound.b.data_ptr(), flat.data_ptr(), DTYPE_CODES[x.dtype],
            flat.shape[0], None if ids_in is None else ids_in.data_ptr(), ids.data_ptr(), y.data_ptr(),
            gemv_max_tokens, err, 512):
        raise SEError(f"CUDA reference failed: {err.value.decode()}")
    return y.reshape(*x.shape[:-1], -1), ids.reshape(x.shape[:-1])


class CudaExperts:
    """Experts bound on the GPU; ``matmul`` queues the kernels on torch's current stream."""

    def __init__(self, packed: PackedExperts, g: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None,
                 device: str | torch.device = "cuda") -> None:
        self.bound = _Bound(packed, g, b, bias, torch.device(device))
        self.device = torch.device(device)
        self._workspace = torch.empty(0, dtype=torch.uint8, device=self.device)

    def matmul(self, x: torch.Tensor, expert_ids: torch.Tensor | None = None, gemv_max_tokens: int = 0,
               out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.bound.packed
        flat, ids_in = _flat(x, p.in_features, expert_ids)
        tokens = flat.shape[0]
        need = _cuda_lib().se_cuda_workspace_size(tokens, p.num_experts)
        if self._workspace.numel() < need:
            self._workspace = torch.empty(need, dtype=torch.uint8, device=self.device)
        y = out if out is not None else torch.empty(tokens, p.out_features, dtype=x.dtype, device=self.device)
        ids = torch.empty(tokens, dtype=torch.int32, device=self.device)
        err = ctypes.create_string_buffer(512)
        stream = torch.cuda.current_stream(self.device).cuda_stream
        if _cuda_lib().se_cuda_routed_sparse_matmul(
                ctypes.byref(self.bound.struct), self.bound.g.data_ptr(), self.bound.b.data_ptr(), flat.data_ptr(),
                DTYPE_CODES[x.dtype], tokens, None if ids_in is None else ids_in.data_ptr(), ids.data_ptr(), y.data_ptr(),
                self._workspace.data_ptr(), self._workspace.numel(), gemv_max_tokens, stream, err, 512):
            raise SEError(f"CUDA kernel failed: {err.value.decode()}")
        return y.reshape(*x.shape[:-1], -1), ids.reshape(x.shape[:-1])
