"""Tensors that share memory (tied embeddings, the router gate and up share) stored once.

safetensors refuses shared storage, and a second copy would double the router's bytes: the
checkpoint and the resume state both save the unique tensors plus a table of aliases.
"""

from __future__ import annotations

import torch


def dedupe_tensors(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors that share memory (tied embeddings, shared routers) stored once: ``(unique, aliases)``."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for key, value in state.items():
        ident = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape),
                 tuple(value.stride()), value.dtype)
        if ident in seen:
            aliases[key] = seen[ident]
        else:
            seen[ident] = key
            tensors[key] = value.detach().contiguous()
    return tensors, aliases


def restore_aliases(tensors: dict[str, torch.Tensor], aliases: dict[str, str]) -> dict[str, torch.Tensor]:
    """Inverse of ``dedupe_tensors``: aliased keys point at the same tensor objects again."""
    for alias, target in aliases.items():
        tensors[alias] = tensors[target]
    return tensors
