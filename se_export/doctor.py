"""What this installation can run (``se-export doctor``): packages, built plugin libraries, the CPU
kernels' instruction-set path, GPUs and ONNX Runtime providers.

Why: which backend a command can use depends on what was built and installed (``make plugins``,
nvcc, TensorRT) and on the CPU (AVX-512, AVX2, NEON); one report answers "why is this slow / why
is TensorRT missing" and goes into bug reports.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys

from .backends import kernels
from .backends.cuda_kernels import CUDA_LIB
from .backends.kernels import (
    KERNELS_LIB,
    ORT_CUDA_LIB,
    ORT_LIB,
    find_library,
    library_origin,
    library_sources,
)
from .backends.trt_build import TRT_PLUGIN_LIB
from .errors import SEError

PACKAGES = ("torch", "transformers", "safetensors", "onnx", "onnxscript", "onnxruntime", "onnxruntime-gpu",
            "tensorrt", "polygraphy")
LIBRARIES = {KERNELS_LIB: "CPU kernels (PyTorch on CPU)", ORT_LIB: "ONNX Runtime custom op",
             ORT_CUDA_LIB: "ONNX Runtime custom op, CPU + CUDA providers (needs nvcc)",
             CUDA_LIB: "CUDA kernels (needs nvcc at build time)", TRT_PLUGIN_LIB: "TensorRT plugin (needs nvcc)"}


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def cpu_kernels() -> dict:
    """The path the kernel library takes on this CPU (it decides once per process)."""
    info = {"machine": platform.machine(), "SE_KERNELS_ISA": os.environ.get("SE_KERNELS_ISA"),
            "SE_EXPORT_KERNELS": os.environ.get("SE_EXPORT_KERNELS")}
    if find_library(KERNELS_LIB) is None:
        return {**info, "isa": None, "used_by_pytorch": False}
    try:
        isa = kernels.isa()
    except SEError as exc:  # a stale build: say so instead of failing the whole report
        return {**info, "isa": None, "used_by_pytorch": False, "problem": str(exc)}
    return {**info, "isa": isa, "used_by_pytorch": kernels.available()}


def gpus() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"cuda_available": False, "devices": []}
    return {"cuda_available": True, "cuda": torch.version.cuda,
            "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}


def ort_providers() -> list[str]:
    try:
        import onnxruntime
    except ImportError:
        return []
    return list(onnxruntime.get_available_providers())


def report() -> dict:
    return {"python": sys.version.split()[0], "platform": platform.platform(), "packages": package_versions(),
            "library_dirs": [f"{d} ({origin})" for origin, d in library_sources()],
            "libraries": {name: (str(found[1]) if (found := library_origin(name)) else None) for name in LIBRARIES},
            "library_origins": {name: (found[0] if (found := library_origin(name)) else None) for name in LIBRARIES},
            "cpu_kernels": cpu_kernels(), "gpu": gpus(), "onnxruntime_providers": ort_providers()}


def format_report(rep: dict) -> str:
    """Plain text, one fact per line, with the fix next to anything missing."""
    lines = [f"python {rep['python']} on {rep['platform']}", "packages:"]
    lines += [f"  {name:16s} {version or 'not installed'}" for name, version in rep["packages"].items()]
    lines.append(f"plugin libraries (looked for in {', '.join(rep['library_dirs'])}):")
    for name, path in rep["libraries"].items():
        origin = rep["library_origins"][name]
        lines.append(f"  {name:22s} " + (f"{path} (from the {origin})" if path else
                                         "missing: install a wheel or run `make plugins` (" + LIBRARIES[name] + ")"))
    k = rep["cpu_kernels"]
    if k.get("problem"):
        lines.append(f"CPU kernels: {k['problem']}; PyTorch runs the reference op")
    elif k["isa"] is None:
        lines.append(f"CPU kernels: not built ({k['machine']}); PyTorch runs the reference op")
    else:
        cap = f", capped by SE_KERNELS_ISA={k['SE_KERNELS_ISA']}" if k["SE_KERNELS_ISA"] else ""
        use = "used by PyTorch on CPU" if k["used_by_pytorch"] else "off for PyTorch (SE_EXPORT_KERNELS=0)"
        lines.append(f"CPU kernels: {k['isa']} path on {k['machine']}{cap}; {use}")
    g = rep["gpu"]
    lines.append("GPU: " + (", ".join(g["devices"]) + f" (CUDA {g['cuda']})" if g["cuda_available"] else "none visible"))
    lines.append("ONNX Runtime providers: " + (", ".join(rep["onnxruntime_providers"]) or "onnxruntime not installed"))
    return "\n".join(lines)
