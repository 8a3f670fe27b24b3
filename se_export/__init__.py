"""se-export: Sparse Expansion of causal LMs into routed sparse experts, and their deployment.

The public API is one function per pipeline stage (``se_export.api``): ``expand``, ``load``,
``evaluate``, ``export_onnx`` and ``validate``, and ``from_pretrained`` for transformers' Auto
classes. They are imported on first use, so
``import se_export`` stays light.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__", "evaluate", "expand", "export_onnx", "from_pretrained", "load", "validate"]


def __getattr__(name: str):
    if name in __all__[1:]:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'se_export' has no attribute '{name}'")
