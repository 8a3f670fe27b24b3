"""ctypes binding of the C++ CPU kernel library (``plugins/cpu``, built by ``make plugins``).

The same ``libse_kernels.so`` runs inside the ONNX Runtime custom op, so PyTorch and ONNX
Runtime share one implementation. ``RoutedSparseLinear`` uses it on CPU when it is built
(``SE_EXPORT_KERNELS=0`` turns it off); the op's Python body stays the golden reference.

Prefill: where one expert gets many tokens and keeps many weights, a compute-bound dense GEMM
beats the sparse tile (on an AVX-512 Xeon the tile takes ~1.5x the dense time at 50%). The
library's ``se_routed_sparse_matmul_gemm`` decides which experts, decodes each once and calls
back into torch's GEMM for their tokens; the other tokens take the sparse kernel. ONNX Runtime's
op runs the same entry with ONNX Runtime's Gemm, so both backends share the policy and the code.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.resources
import os
import warnings
from pathlib import Path

import torch

from ..errors import SEError
from ..formats.quantization import pack_int4
from ..formats.sparse_format import PackedExperts

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
QUANT_CODES = {8: 3, 4: 4}  # SE_I8, SE_I4 by bits
FORMAT_CODES = {"bitmap": 0, "csr16": 1}
KERNELS_LIB = "libse_kernels.so"
KERNELS_ABI = 3  # SE_KERNELS_ABI of the se_kernels.h these argument lists follow
ORT_LIB = "libse_ort_ops.so"
ORT_CUDA_LIB = "libse_ort_ops_cuda.so"  # the same op for the CPU and the CUDA execution providers


_GEMM_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                            ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p)


def _float_view(address: int, rows: int, cols: int) -> torch.Tensor:
    """A zero-copy fp32 ``[rows, cols]`` tensor over memory the C library owns (valid during the call)."""
    return torch.frombuffer((ctypes.c_float * (rows * cols)).from_address(address), dtype=torch.float32).view(rows, cols)


# Torch's GEMM takes the whole decoded expert at once: fed 8 MiB bands of it (the library's
# gemm_tile_bytes, which bounds ONNX Runtime's op's scratch at no cost in speed) it took 1.39-1.46x
# the dense time at in_features 11008 and 512 tokens, against 1.08-1.13x whole (measured on an
# AVX-512 Xeon).
_TORCH_GEMM_TILE_BYTES = 0


@_GEMM_FN
def _torch_gemm(_ctx, m: int, n: int, k: int, a: int, w: int, c: int) -> int:
    """``c = a @ w.T`` with torch's GEMM, called back by the kernel library for a dense group."""
    try:
        torch.matmul(_float_view(a, m, k), _float_view(w, n, k).t(), out=_float_view(c, m, n))
        return 0
    except Exception:  # reported by the library as a failed GEMM; never unwinds through C
        return 1


class ExpertsStruct(ctypes.Structure):
    """``se_experts`` of se_kernels.h: the packed experts as the C ABI (CPU, CUDA, ONNX Runtime) sees them."""

    _fields_ = [
        ("format", ctypes.c_int32), ("value_dtype", ctypes.c_int32), ("num_experts", ctypes.c_int64),
        ("out_features", ctypes.c_int64), ("in_features", ctypes.c_int64), ("values", ctypes.c_void_p),
        ("nnz", ctypes.c_int64), ("indices", ctypes.c_void_p), ("indices_len", ctypes.c_int64),
        ("row_ptr", ctypes.c_void_p), ("bias", ctypes.c_void_p), ("scales", ctypes.c_void_p),
        ("group_size", ctypes.c_int64),
    ]


def package_lib_dir() -> Path:
    """Where a wheel (``pip install``/``pip wheel``, scikit-build-core) puts the plugin libraries."""
    return Path(str(importlib.resources.files("se_export"))) / "lib"


def library_sources() -> list[tuple[str, Path]]:
    """Where plugin libraries are looked for, in order, each with its origin: the installed
    package's own (a wheel's, built with it, so their ABI matches), then $SE_EXPORT_LIB_DIR when
    set, else the build folder of a source checkout (``make plugins``)."""
    env = os.environ.get("SE_EXPORT_LIB_DIR")
    fallback = ("SE_EXPORT_LIB_DIR", Path(env)) if env else ("checkout build", _checkout_build())
    return [("package", package_lib_dir()), fallback]


def _checkout_build() -> Path:
    return Path(__file__).resolve().parents[2] / "build" / "plugins"


def library_dirs() -> list[Path]:
    return [d for _, d in library_sources()]


def library_origin(name: str) -> tuple[str, Path] | None:
    """``(origin, path)`` of the first ``name`` found (see library_sources), or None."""
    return next(((origin, d / name) for origin, d in library_sources() if (d / name).is_file()), None)


def find_library(name: str) -> Path | None:
    found = library_origin(name)
    return None if found is None else found[1]


@functools.cache
def _lib() -> ctypes.CDLL | None:
    path = find_library(KERNELS_LIB)
    if path is None:
        return None
    lib = ctypes.CDLL(str(path))
    if hasattr(lib, "se_kernels_abi"):
        lib.se_kernels_abi.restype = ctypes.c_int32
    if _stale(lib):  # entry points may be missing or differ: _stale's message is all it is good for
        return lib
    lib.se_check_experts.argtypes = [ctypes.POINTER(ExpertsStruct), ctypes.c_char_p, ctypes.c_size_t]
    lib.se_route.argtypes = [ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                             ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32, ctypes.c_char_p,
                             ctypes.c_size_t]
    lib.se_routed_sparse_matmul.argtypes = [ctypes.POINTER(ExpertsStruct), ctypes.c_void_p, ctypes.c_void_p,
                                            ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64, ctypes.c_void_p,
                                            ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32, ctypes.c_char_p,
                                            ctypes.c_size_t]
    lib.se_routed_sparse_matmul_gemm.argtypes = [ctypes.POINTER(ExpertsStruct), ctypes.c_void_p, ctypes.c_void_p,
                                                 ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64, ctypes.c_void_p,
                                                 ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32, _GEMM_FN,
                                                 ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_char_p,
                                                 ctypes.c_size_t]
    lib.se_decode_expert.argtypes = [ctypes.POINTER(ExpertsStruct), ctypes.c_int64, ctypes.c_void_p, ctypes.c_int32,
                                     ctypes.c_char_p, ctypes.c_size_t]
    lib.se_kernel_isa.restype = ctypes.c_char_p
    lib.se_dense_group_tokens.restype = ctypes.c_int64
    lib.se_dense_group_density.restype = ctypes.c_double
    return lib


@functools.cache
def _stale(lib: ctypes.CDLL) -> str | None:
    """Why ``lib`` cannot be called with this binding's argument lists (None: it can). Cached:
    ``available()`` runs on every forward of an expanded linear."""
    built = int(lib.se_kernels_abi()) if hasattr(lib, "se_kernels_abi") else 1
    if built == KERNELS_ABI:
        return None
    return (f"{KERNELS_LIB} was built from other sources (kernel ABI {built}, this checkout needs {KERNELS_ABI}): "
            "rebuild it with `make plugins`")


@functools.cache
def _warn_stale(message: str) -> None:
    warnings.warn(f"{message}; using the pure-torch reference op until then", stacklevel=3)


def available() -> bool:
    """Whether PyTorch should run the C++ kernels: built, matching this checkout, not switched off."""
    if os.environ.get("SE_EXPORT_KERNELS", "1") == "0" or (lib := _lib()) is None:
        return False
    if problem := _stale(lib):
        _warn_stale(problem)
        return False
    return True


def require() -> ctypes.CDLL:
    lib = _lib()
    if lib is None:
        raise SEError(f"{KERNELS_LIB} is not built: install se-export from a wheel, or run `make plugins` in a "
                      "checkout (or set SE_EXPORT_LIB_DIR)")
    if problem := _stale(lib):
        raise SEError(problem)
    return lib


def isa() -> str:
    return require().se_kernel_isa().decode()


def dense_group_policy() -> tuple[int, float]:
    """``(tokens, density)``: an expert with at least ``tokens`` tokens in one call that keeps at
    least ``density`` of its weights runs as a decoded dense GEMM (bench/kernel_speed.py, "dense
    groups" column). Read from the library, whose ONNX Runtime op applies the same policy."""
    lib = require()
    return int(lib.se_dense_group_tokens()), float(lib.se_dense_group_density())


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class AbiExperts:
    """Packed experts laid out as the C ABI (``se_experts`` of se_kernels.h) takes them, on one
    device: int4 codes two per byte (se_kernels.h's nibble order), int8 codes as they are, fp16
    scale bits, int32 row pointers, fp32 bias; ``struct`` points at these tensors. The CPU
    kernels and the CUDA kernels' binding share it."""

    def __init__(self, packed: PackedExperts, bias: torch.Tensor | None = None,
                 device: str | torch.device = "cpu") -> None:
        quant = packed.quant
        if quant is None and packed.values.dtype not in DTYPE_CODES:
            raise SEError(f"values dtype {packed.values.dtype} is not supported: use fp32, fp16 or bf16")
        self.packed = packed
        values = pack_int4(packed.values) if quant is not None and quant.bits == 4 else packed.values
        self.values = values.contiguous().to(device)
        self.scales = (None if quant is None
                       else packed.scales.to(torch.float16).contiguous().view(torch.int16).to(device))
        self.indices = packed.indices.contiguous().to(device)
        self.row_ptr = packed.row_ptr.to(torch.int32).contiguous().to(device)
        self.bias = None if bias is None else bias.to(torch.float32).contiguous().to(device)
        value_code = DTYPE_CODES[self.values.dtype] if quant is None else QUANT_CODES[quant.bits]
        self.struct = ExpertsStruct(FORMAT_CODES[packed.format], value_code, packed.num_experts,
                                    packed.out_features, packed.in_features, _ptr(self.values), packed.nnz,
                                    _ptr(self.indices), self.indices.numel(), _ptr(self.row_ptr), _ptr(self.bias),
                                    _ptr(self.scales), 0 if quant is None else quant.group_size)


class BoundExperts(AbiExperts):
    """Packed experts checked once by the C++ validator and kept alive for repeated calls."""

    def __init__(self, packed: PackedExperts, bias: torch.Tensor | None = None,
                 dense_group_tokens: int | None = None) -> None:
        """``dense_group_tokens``: an expert with at least this many tokens in one call (and at least
        the library's dense-group density) runs as a decoded dense GEMM; None takes the library's
        threshold, 0 keeps every token on the sparse kernel."""
        super().__init__(packed, bias)
        err = ctypes.create_string_buffer(512)
        if require().se_check_experts(ctypes.byref(self.struct), err, 512):
            raise SEError(f"invalid packed experts: {err.value.decode()}")
        default_tokens, density = dense_group_policy()
        self.dense_group_tokens = default_tokens if dense_group_tokens is None else dense_group_tokens
        out, k = packed.out_features, packed.num_experts
        starts = [*self.row_ptr[::out].to(torch.int64).tolist(), packed.nnz]
        per_expert = out * packed.in_features
        # experts the library may send to the GEMM (it decides per call); none: skip that entry
        self.dense_candidates = [e for e in range(k) if starts[e + 1] - starts[e] >= density * per_expert]

    def decode_expert(self, k: int, threads: int = 0, out: torch.Tensor | None = None) -> torch.Tensor:
        """Expert k as a dense fp32 ``[out, in]`` weight (the C++ decoder; zeros where pruned), written
        into ``out`` when given (a contiguous fp32 buffer of at least out x in elements)."""
        p = self.packed
        size = p.out_features * p.in_features
        if out is None:
            dense = torch.empty(p.out_features, p.in_features, dtype=torch.float32)
        elif out.dtype != torch.float32 or not out.is_contiguous() or out.numel() < size:
            raise SEError(f"decode buffer must be a contiguous fp32 tensor of at least {size} elements")
        else:
            dense = out.view(-1)[:size].view(p.out_features, p.in_features)
        err = ctypes.create_string_buffer(512)
        if require().se_decode_expert(ctypes.byref(self.struct), k, _ptr(dense), threads, err, 512):
            raise SEError(f"expert decode failed: {err.value.decode()}")
        return dense

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
        y = torch.empty(tokens, p.out_features, dtype=flat.dtype)
        ids_out = torch.empty(tokens, dtype=torch.int32)
        err = ctypes.create_string_buffer(512)
        args = (ctypes.byref(self.struct), _ptr(g), _ptr(b), _ptr(flat), DTYPE_CODES[flat.dtype], tokens, _ptr(ids_in),
                _ptr(ids_out), _ptr(y), threads)
        if self.dense_group_tokens and self.dense_candidates and tokens >= self.dense_group_tokens:
            rc = require().se_routed_sparse_matmul_gemm(*args, _torch_gemm, None, self.dense_group_tokens,
                                                          _TORCH_GEMM_TILE_BYTES, err, 512)
        else:
            rc = require().se_routed_sparse_matmul(*args, err, 512)
        if rc:
            raise SEError(f"routed sparse kernel failed: {err.value.decode()}")
        return y.reshape(*x.shape[:-1], p.out_features), ids_out.reshape(x.shape[:-1])


def route(x: torch.Tensor, router_weight: torch.Tensor, router_bias: torch.Tensor, threads: int = 0) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1]).contiguous()
    ids = torch.empty(flat.shape[0], dtype=torch.int32)
    g, b = router_weight.float().contiguous(), router_bias.float().contiguous()
    err = ctypes.create_string_buffer(512)
    if require().se_route(_ptr(flat), DTYPE_CODES[x.dtype], flat.shape[0], flat.shape[1], g.shape[1], _ptr(g), _ptr(b),
                          _ptr(ids), threads, err, 512):
        raise SEError(f"router kernel failed: {err.value.decode()}")
    return ids.reshape(x.shape[:-1])
