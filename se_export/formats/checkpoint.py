"""Expanded checkpoints: HF config + tokenizer, one safetensors file, and ``se_manifest.json``.

The manifest is written last and names every file with its size and sha256, so a folder
without it (an interrupted save) is never mistaken for a checkpoint and a damaged file is
caught at load. Tensors shared in memory (tied embeddings, the router that gate and up share)
are stored once and listed as aliases. Experts are stored packed (``sparse_format``), never dense;
since format 2 every expert mask is one deflate-coded bitmap, from which load rebuilds the index
format and row pointers (``mask_codec``).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..adapters import set_submodule
from ..atomic import atomic_path, atomic_write_text, sha256_file
from ..errors import SEError
from ..host_memory import release_freed_memory
from ..modeling.modules import RoutedSparseLinear
from .hf_auto import add_auto_class_hooks, strip_auto_class_hooks
from .mask_codec import decode_masks, encode_masks, stored_expert_bytes
from .partial import PARTIAL_DIR
from .quantization import QUANT_GRID, parse_quant
from .tensor_aliases import dedupe_tensors, restore_aliases

MANIFEST = "se_manifest.json"
# not transformers' "model.safetensors": a loader that ignores the checkpoint's auto_map (no
# trust_remote_code) must stop at a missing weights file, not read our packed experts as a dense
# model with missing MLP weights (hf_auto.py)
WEIGHTS = "se_model.safetensors"
LEGACY_WEIGHTS = "model.safetensors"  # format versions 1-3
# 4: weights in se_model.safetensors and transformers' auto_map hooks (hf_auto.py), float or
# int8/int4 values. Older versions still load: 2 float values, 3 int8/int4 codes and scales (both
# with model.safetensors), 1 raw bitmaps and row pointers.
FORMAT_VERSION = 4
READABLE_VERSIONS = (1, 2, 3, 4)


def is_checkpoint(path: Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def is_incomplete_checkpoint(path: Path) -> bool:
    """A folder an expansion or save was writing to when it stopped (no manifest yet)."""
    path = Path(path)
    if is_checkpoint(path):
        return False
    if (path / PARTIAL_DIR).is_dir():
        return True
    weights = path / WEIGHTS if (path / WEIGHTS).is_file() else path / LEGACY_WEIGHTS
    if weights.is_file():
        try:
            with safe_open(str(weights), "pt") as f:
                return (f.metadata() or {}).get("producer") == "se-export"
        except (SafetensorError, OSError):
            return False
    return False


def expanded_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, RoutedSparseLinear)}


def save_checkpoint(model: nn.Module, tokenizer, out: Path, info: dict) -> dict:
    """Write the checkpoint into ``out`` (files atomically, manifest last); return the manifest."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # the folder is not a checkpoint until we finish
    tensors, aliases = dedupe_tensors(model.state_dict())
    modules = {name: m.meta() for name, m in expanded_modules(model).items()}
    tensors, storage = encode_masks(tensors, modules)
    with atomic_path(out / WEIGHTS) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", "producer": "se-export"})
    model.config.save_pretrained(out)
    add_auto_class_hooks(out)  # AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    manifest = {
        "format_version": FORMAT_VERSION,
        "producer": "se-export",
        **info,
        "modules": modules,
        "storage": storage,
        "expert_bytes_stored": stored_expert_bytes(tensors, modules),
        "aliases": aliases,
        "files": {WEIGHTS: {"bytes": (out / WEIGHTS).stat().st_size, "sha256": sha256_file(out / WEIGHTS)}},
        "complete": True,
    }
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1))
    return manifest


def expanded_stats(model: nn.Module) -> dict:
    """Bytes of the stored experts vs the dense linears they replace (at fp32 and fp16)."""
    mods = expanded_modules(model)
    expert = sum(m.packed().nbytes() for m in mods.values())
    router = sum(m.router_weight.numel() * 4 + m.router_bias.numel() * 4 for m in mods.values())
    dense_params = sum(m.in_features * m.out_features for m in mods.values())
    return {"expanded_linears": len(mods), "expert_bytes": expert, "router_bytes": router,
            "dense_mlp_params": dense_params, "dense_mlp_bytes": dense_params * 4,
            "dense_mlp_bytes_fp16": dense_params * 2,
            "bytes_per_stored_weight": expert / max(1, sum(int(m.values.numel()) for m in mods.values()))}


def save_expansion(model: nn.Module, tokenizer, out: Path, *, source: str, cfg, calibration: dict, result,
                   allocation: str = "uniform") -> dict:
    """Save an expanded model (``cfg``: the ExpandConfig, ``result``: its ExpandResult) with the
    manifest info every producer writes the same way, plus ``expand_report.json``; return the info."""
    info = {"base_model": source, "method": cfg.method, "experts": cfg.experts, "sparsity": str(cfg.check()),
            "allocation": allocation, "experts_per_layer": cfg.experts_per_layer,
            "pca_factor": cfg.pca_factor, "true_sequential": cfg.true_sequential, "value_dtype": cfg.value_dtype,
            **({"group_size": quant.group_size, "quant_method": cfg.quant_method, "quant_grid": QUANT_GRID}
               if (quant := parse_quant(cfg.value_dtype, cfg.group_size)) else {}),
            **({"layer_sparsity": cfg.layer_sparsity, "owl_lambda": cfg.owl_lambda, "owl_threshold": cfg.owl_threshold,
                "sparsity_per_layer": {str(i): round(s, 6) for i, s in sorted(result.layer_sparsity.items())}}
               if cfg.layer_sparsity != "uniform" else {}),
            **({"hessian_prior": cfg.hessian_prior} if cfg.hessian_prior else {}),
            "calibration": calibration, "stats": expanded_stats(model),
            "expansion": {"seconds": result.seconds, "peak_rss_mb": result.peak_rss_mb,
                          "resumed_layers": result.resumed_layers}}
    manifest = save_checkpoint(model, tokenizer, out, info)
    info["stats"] = {**info["stats"], "expert_bytes_stored": manifest["expert_bytes_stored"]}
    atomic_write_text(Path(out) / "expand_report.json", json.dumps({**info, "layers": result.layers}, indent=1))
    return info


def read_manifest(path: Path) -> dict:
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise SEError(f"{path} is not an se-export checkpoint (no {MANIFEST}); run se-export expand first") from None
    except json.JSONDecodeError:
        raise SEError(f"corrupt checkpoint {path}: {MANIFEST} is not valid JSON; re-run se-export expand") from None
    if manifest.get("format_version") not in READABLE_VERSIONS or not manifest.get("complete"):
        raise SEError(f"checkpoint {path} has format version {manifest.get('format_version')} "
                      f"(this se-export reads {READABLE_VERSIONS}) or is incomplete; re-run se-export expand")
    return manifest


def verify_files(path: Path, manifest: dict, hash_files: bool = True) -> None:
    for name, expect in manifest.get("files", {}).items():
        f = Path(path) / name
        if not f.is_file():
            raise SEError(f"corrupt checkpoint {path}: {name} is missing; re-run se-export expand")
        if f.stat().st_size != expect["bytes"] or (hash_files and sha256_file(f) != expect["sha256"]):
            raise SEError(f"corrupt checkpoint {path}: {name} differs from its manifest (size or sha256); "
                          "re-run se-export expand or restore the file")


def _no_weight_init():
    """transformers' switch for skipping random init (~3 s of a 7 s load of the default model);
    a no-op where this transformers lacks it."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        return contextlib.nullcontext()
    return no_init_weights()


def load_checkpoint(path: Path, with_tokenizer: bool = False, verify: bool = True):
    """Rebuild the expanded transformers model (and tokenizer); logits equal the saved model's."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    manifest = read_manifest(path)
    verify_files(path, manifest, hash_files=verify)
    weights = LEGACY_WEIGHTS if manifest["format_version"] < 4 else WEIGHTS
    try:
        tensors = load_file(str(path / weights))
    except (SafetensorError, OSError) as exc:
        raise SEError(f"corrupt checkpoint {path}: cannot read {weights} ({exc}); re-run se-export expand") from None
    decode_masks(tensors, manifest["modules"], manifest.get("storage", {}))
    restore_aliases(tensors, manifest.get("aliases", {}))
    config = AutoConfig.from_pretrained(path)
    strip_auto_class_hooks(config)
    with _no_weight_init():  # load_state_dict(strict=True) below replaces every parameter
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    for name, meta in manifest["modules"].items():
        set_submodule(model, name, RoutedSparseLinear.from_tensors(name, meta, tensors))
    try:
        model.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as exc:
        raise SEError(f"corrupt checkpoint {path}: weights do not match the model ({str(exc).splitlines()[0]})") from None
    model.eval()
    del tensors
    release_freed_memory()  # the mask decoders' thread arenas
    if not with_tokenizer:
        return model
    from transformers import AutoTokenizer

    return model, AutoTokenizer.from_pretrained(path)
