"""ctypes binding of the C++ CPU kernel library (``plugins/cpu``, built by ``make plugins``).

The same ``libse_kernels.so`` runs inside the ONNX Runtime custom op, so PyTorch and ONNX
Runtime share one implementation. ``RoutedSparseLinear`` uses it on CPU when it is built
(``SE_EXPORT_KERNELS=0`` turns it off); the op's Python body stays the golden reference.
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

import torch

from .errors import SEError
from .sparse_format import PackedExperts

_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_FORMATS = {"bitmap": 0, "csr16": 1}
KERNELS_LIB = "libse_kernels.so"
ORT_LIB = "libse_ort_ops.so"


class _Experts(ctypes.Structure):
    _fields_ = [
        ("format", ctypes.c_int32), ("value_dtype", ctypes.c_int32), ("num_experts", ctypes.c_int64),
        ("out_features", ctypes.c_int64), ("in_features", ctypes.c_int64), ("values", ctypes.c_void_p),
        ("nnz", ctypes.c_int64), ("indices", ctypes.c_void_p), ("indices_len", ctypes.c_int64),
        ("row_ptr", ctypes.c_void_p), ("bias", ctypes.c_void_p),
    ]


def library_dirs() -> list[Path]:
    """Where built plugin libraries are looked for: $SE_EXPORT_LIB_DIR if set, else the repo's build/plugins."""
    if env := os.environ.get("SE_EXPORT_LIB_DIR"):
        return [Path(env)]
    return [Path(__file__).resolve().parent.parent / "build" / "plugins"]


def find_library(name: str) -> Path | None:
    return next((d / name for d in library_dirs() if (d / name).is_file()), None)


@functools.cache
def _lib() -> ctypes.CDLL | None:
    path = find_library(KERNELS_LIB)
    if path is None:
        return None
    lib = ctypes.CDLL(str(path))
    lib.se_check_experts.argtypes = [ctypes.POINTER(_Experts), ctypes.c_char_p, ctypes.c_size_t]
    lib.se_route.argtypes = [ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                             ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32, ctypes.c_char_p,
                             ctypes.c_size_t]
    lib.se_routed_sparse_matmul.argtypes = [ctypes.POINTER(_Experts), ctypes.c_void_p, ctypes.c_void_p,
                                            ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64, ctypes.c_void_p,
                                            ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32, ctypes.c_char_p,
                                            ctypes.c_size_t]
    lib.se_kernel_isa.restype = ctypes.c_char_p
    return lib


def available() -> bool:
    return os.environ.get("SE_EXPORT_KERNELS", "1") != "0" and _lib() is not None


def require() -> ctypes.CDLL:
    lib = _lib()
    if lib is None:
        raise SEError(f"{KERNELS_LIB} is not built: run `make plugins` (or set SE_EXPORT_LIB_DIR)")
    return lib


def isa() -> str:
    return require().se_kernel_isa().decode()


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class BoundExperts:
    """Packed experts checked once by the C++ validator and kept alive for repeated calls."""

    def __init__(self, packed: PackedExperts, bias: torch.Tensor | None = None) -> None:
        if packed.values.dtype not in _DTYPES:
            raise SEError(f"values dtype {packed.values.dtype} is not supported: use fp32, fp16 or bf16")
        self.packed = packed
        self.values = packed.values.contiguous()
        self.indices = packed.indices.contiguous()
        self.row_ptr = packed.row_ptr.to(torch.int32).contiguous()
        self.bias = None if bias is None else bias.to(torch.float32).contiguous()
        self.struct = _Experts(_FORMATS[packed.format], _DTYPES[self.values.dtype], packed.num_experts,
                               packed.out_features, packed.in_features, _ptr(self.values), self.values.numel(),
                               _ptr(self.indices), self.indices.numel(), _ptr(self.row_ptr), _ptr(self.bias))
        err = ctypes.create_string_buffer(512)
        if require().se_check_experts(ctypes.byref(self.struct), err, 512):
            raise SEError(f"invalid packed experts: {err.value.decode()}")

    def matmul(self, x: torch.Tensor, router_weight: torch.Tensor, router_bias: torch.Tensor,
               expert_ids: torch.Tensor | None = None, threads: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """``(y, expert_ids)`` for ``x [..., in]`` (fp32/fp16), the op's semantics."""
        p = self.packed
        if x.dtype not in (torch.float32, torch.float16):
            raise SEError(f"x dtype {x.dtype} is not supported: use fp32 or fp16")
        if x.shape[-1] != p.in_features:
            raise SEError(f"x has {x.shape[-1]} features, the experts expect {p.in_features}")
        flat = x.reshape(-1, p.in_features).contiguous()
        tokens = flat.shape[0]
        g = router_weight.to(torch.float32).contiguous()
        b = router_bias.to(torch.float32).contiguous()
        ids_in = None
        if expert_ids is not None:
            ids_in = expert_ids.reshape(-1).to(torch.int32).contiguous()
            if ids_in.numel() != tokens:
                raise SEError(f"expert_ids has {ids_in.numel()} entries for {tokens} tokens")
        y = torch.empty(tokens, p.out_features, dtype=x.dtype)
        ids_out = torch.empty(tokens, dtype=torch.int32)
        err = ctypes.create_string_buffer(512)
        rc = require().se_routed_sparse_matmul(ctypes.byref(self.struct), _ptr(g), _ptr(b), _ptr(flat),
                                               _DTYPES[x.dtype], tokens, _ptr(ids_in), _ptr(ids_out), _ptr(y),
                                               threads, err, 512)
        if rc:
            raise SEError(f"routed sparse kernel failed: {err.value.decode()}")
        return y.reshape(*x.shape[:-1], p.out_features), ids_out.reshape(x.shape[:-1])


def route(x: torch.Tensor, router_weight: torch.Tensor, router_bias: torch.Tensor, threads: int = 0) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1]).contiguous()
    ids = torch.empty(flat.shape[0], dtype=torch.int32)
    g, b = router_weight.float().contiguous(), router_bias.float().contiguous()
    err = ctypes.create_string_buffer(512)
    if require().se_route(_ptr(flat), _DTYPES[x.dtype], flat.shape[0], flat.shape[1], g.shape[1], _ptr(g), _ptr(b),
                          _ptr(ids), threads, err, 512):
        raise SEError(f"router kernel failed: {err.value.decode()}")
    return ids.reshape(x.shape[:-1])
