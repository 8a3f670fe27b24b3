"""se-export: Sparse Expansion of causal LMs into routed sparse experts, and their deployment."""

from __future__ import annotations

from pathlib import Path

__version__ = "0.1.0"


def load(path: str | Path):
    """Load an expanded checkpoint folder as a transformers causal LM."""
    from .formats.checkpoint import load_checkpoint

    return load_checkpoint(Path(path))


__all__ = ["__version__", "load"]
