"""ONNX Runtime sessions for se-export graphs: custom-op library loading, prefill/decode with the
KV cache, greedy generation and perplexity (shared by ``validate`` and ``bench ort``)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..errors import SEError
from ..export.onnx_export import MODEL_FILE, read_onnx_manifest
from .kernels import ORT_CUDA_LIB, ORT_LIB, find_library

PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}


def ort_library(provider: str = "cpu") -> Path:
    """The op library for ``provider``: the CPU one, or the one with CUDA kernels as well."""
    name = ORT_CUDA_LIB if provider == "cuda" else ORT_LIB
    path = find_library(name)
    if path is None:
        needs = " (it needs nvcc at build time)" if provider == "cuda" else ""
        raise SEError(f"{name} (the RoutedSparseMatMul op for ONNX Runtime) is not built{needs}: install se-export "
                      "from a wheel, run `make plugins` in a checkout, set SE_EXPORT_LIB_DIR, or export with --portable")
    return path


def check_provider(provider: str) -> list[str]:
    """ONNX Runtime's provider list for ``--provider``, or a one-line error saying what is missing."""
    import onnxruntime as ort

    if provider not in PROVIDERS:
        raise SEError(f"unknown --provider '{provider}': use cpu or cuda")
    if provider == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        raise SEError(f"this onnxruntime ({ort.__version__}) has no CUDA execution provider: install onnxruntime-gpu "
                      "(pip install 'se-export[gpu]') on a machine with a CUDA GPU")
    return PROVIDERS[provider]


def ort_library_op_version(path: Path) -> int:
    """The newest RoutedSparseMatMul version the op library at ``path`` implements (1 for
    libraries older than the version query)."""
    import ctypes

    lib = ctypes.CDLL(str(path))
    query = getattr(lib, "se_ort_op_version", None)
    if query is None:
        return 1
    query.restype = ctypes.c_int32
    return int(query())


def check_op_version(needed: int, provider: str = "cpu") -> None:
    """Refuse, with the fix, a graph whose op version the built library cannot read."""
    path = ort_library(provider)
    have = ort_library_op_version(path)
    if needed > have:
        raise SEError(f"this export needs RoutedSparseMatMul version {needed} (int8/int4 experts), but {path} "
                      f"implements version {have}: rebuild it with `make plugins` (or reinstall se-export), or export with --portable")


def session_options(threads: int = 0, custom_ops: bool = True, profile_prefix: str | None = None,
                    spinning: bool = True, provider: str = "cpu"):
    """``spinning=False`` for sessions that take turns call by call in one process (benchmarks): a
    pool left spinning after its call takes the cores from the next session's call."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 4  # fatal only: a failed run's error is raised as one line (OrtCausalLM.run)
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile_prefix:  # ONNX Runtime's per-node profiler (bench/ort_profile.py)
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    if threads:
        opts.intra_op_num_threads = threads
    if custom_ops:
        opts.register_custom_ops_library(str(ort_library(provider)))
        # the op runs its loops on ONNX Runtime's intra-op pool (KernelContext_ParallelFor), so the
        # session keeps ONNX Runtime's own threading settings (spinning included)
    return opts


class StepModel:
    """Greedy generation and perplexity on top of a backend's one-step ``run`` (ORT, TensorRT).

    Subclasses set ``manifest``, ``layers``, ``kv_heads``, ``head_dim`` and ``float_type``."""

    manifest: dict
    layers: int
    kv_heads: int
    head_dim: int
    float_type: type = np.float32

    def empty_past(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, self.kv_heads, 0, self.head_dim), self.float_type) for _ in range(2 * self.layers)]

    def feeds(self, input_ids: np.ndarray, past: list[np.ndarray] | None,
              attention_mask: np.ndarray | None) -> dict[str, np.ndarray]:
        """The graph's inputs for one step, by name (Optimum past/present convention)."""
        batch, seq = input_ids.shape
        past = past if past is not None else self.empty_past(batch)
        past_len = past[0].shape[2] if past else 0
        if attention_mask is None:
            attention_mask = np.ones((batch, past_len + seq), np.int64)
        feeds = {"input_ids": input_ids.astype(np.int64), "attention_mask": attention_mask.astype(np.int64)}
        if self.manifest.get("uses_position_ids"):
            feeds["position_ids"] = np.broadcast_to(np.arange(past_len, past_len + seq), (batch, seq)).astype(np.int64)
        for i in range(self.layers):
            feeds[f"past_key_values.{i}.key"] = past[2 * i]
            feeds[f"past_key_values.{i}.value"] = past[2 * i + 1]
        return feeds

    def run(self, input_ids: np.ndarray, past: list[np.ndarray] | None = None,
            attention_mask: np.ndarray | None = None) -> tuple[np.ndarray, list[np.ndarray], dict[str, np.ndarray]]:
        raise NotImplementedError

    def generate(self, input_ids: np.ndarray, new_tokens: int) -> np.ndarray:
        """Greedy decoding with the KV cache (prefill once, then one token per step)."""
        logits, past, _ = self.run(input_ids)
        out = []
        for _ in range(new_tokens):
            token = logits[:, -1].astype(np.float32).argmax(-1)[:, None]
            out.append(token)
            logits, past, _ = self.run(token, past)
        return np.concatenate(out, axis=1) if out else np.zeros((input_ids.shape[0], 0), np.int64)

    def nll(self, windows: np.ndarray) -> tuple[float, int]:
        """Summed next-token NLL and token count over ``windows [W, L]`` (each its own context)."""
        return windows_nll(lambda ids: self.run(ids)[0], windows)


def windows_nll(logits_of: Callable[[np.ndarray], np.ndarray], windows: np.ndarray) -> tuple[float, int]:
    """Summed next-token NLL (in float64) and token count over ``windows [W, L]``, each window its
    own context; ``logits_of(ids [1, L])`` gives ``[1, L, vocab]`` logits. Every backend's
    perplexity and the PyTorch reference's are computed by this one function."""
    total, count = 0.0, 0
    for window in windows:
        logp = log_softmax(logits_of(window[None])[0, :-1].astype(np.float64))
        total -= float(logp[np.arange(window.shape[0] - 1), window[1:]].sum())
        count += window.shape[0] - 1
    return total, count


class OrtCausalLM(StepModel):
    """An exported causal LM in ONNX Runtime (the CPU, or ``provider="cuda"``: the CUDA execution
    provider of onnxruntime-gpu, our op on its CUDA kernels), with the Optimum-style past/present I/O."""

    def __init__(self, folder: Path, threads: int = 0, model_file: Path | None = None,
                 profile_prefix: str | None = None, spinning: bool = True, provider: str = "cpu") -> None:
        import onnxruntime as ort

        providers = check_provider(provider)
        self.folder = Path(folder)
        self.manifest = read_onnx_manifest(self.folder)
        path = model_file or self.folder / MODEL_FILE
        needs_op = self.manifest.get("custom_op_nodes", 0) > 0
        # A portable graph decodes each token's expert from initializers: tokens x out x in transient
        # memory per linear. Without the arena it is returned after every node (the arena would keep
        # the peak of the largest call); constant folding has nothing worth precomputing there.
        lazy = self.manifest.get("portable") and self.manifest.get("expanded_linears", 0) > 0
        if needs_op:
            check_op_version(int(self.manifest.get("op", {}).get("version", 1)), provider)
        opts = session_options(threads, needs_op, profile_prefix, spinning, provider)
        if lazy:
            opts.enable_cpu_mem_arena = False
        try:
            self.session = ort.InferenceSession(str(path), opts,
                                                providers=providers,
                                                disabled_optimizers=["ConstantFolding"] if lazy else None)
        except SEError:
            raise
        except Exception as exc:  # ONNX Runtime raises its own exception types
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise SEError(f"ONNX Runtime cannot load {path}: {first}") from None
        self.float_type = np.float16 if self.manifest["dtype"] == "fp16" else np.float32
        self.layers = self.manifest["num_layers"]
        self.kv_heads = self.manifest["num_kv_heads"]
        self.head_dim = self.manifest["head_dim"]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, input_ids: np.ndarray, past: list[np.ndarray] | None = None,
            attention_mask: np.ndarray | None = None) -> tuple[np.ndarray, list[np.ndarray], dict[str, np.ndarray]]:
        """One step: ``(logits, present, extra outputs by name)``. ONNX Runtime refusing the graph's
        data (our op's checks of the packed experts, among others) is one line naming the export."""
        try:
            outs = self.session.run(None, self.feeds(input_ids, past, attention_mask))
        except Exception as exc:  # onnxruntime's own exception types (InvalidArgument, Fail, ...)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise SEError(f"ONNX Runtime failed to run {self.folder / MODEL_FILE}: {first}: the export's tensors are "
                          "damaged or were edited; re-run se-export onnx") from None
        named = dict(zip(self.output_names, outs, strict=True))
        present = [named[f"present.{i}.{kind}"] for i in range(self.layers) for kind in ("key", "value")]
        return named["logits"], present, named


def log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def perplexity_from(total: float, count: int) -> float:
    return math.exp(total / max(1, count))
