"""Resume state of an expansion: ``<out>/.se-partial`` holds every finished layer.

Each layer's modules and report are written atomically as one safetensors file, keyed by the
settings hash in ``state.json``, so an interrupted run continues from the last finished layer
with an identical result, and a run with other settings refuses to mix with it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..atomic import atomic_path, atomic_write_text
from ..errors import SEError
from ..modeling.modules import RoutedSparseLinear
from .tensor_aliases import dedupe_tensors, restore_aliases

PARTIAL_DIR = ".se-partial"


def save_partial_layer(work: Path, index: int, prefix: str, modules: dict[str, RoutedSparseLinear], report: dict) -> None:
    state = {f"{prefix}.{name}.{key}": value for name, module in modules.items()
             for key, value in module.state_dict().items()}
    tensors, aliases = dedupe_tensors(state)  # the router gate and up share is stored once
    meta = {"modules": {name: m.meta() for name, m in modules.items()}, "aliases": aliases, "report": report}
    with atomic_path(work / f"layer_{index:05d}.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"se_layer": json.dumps(meta)})


def load_partial_layer(work: Path, index: int, prefix: str) -> tuple[dict[str, RoutedSparseLinear], dict] | None:
    path = work / f"layer_{index:05d}.safetensors"
    if not path.is_file():
        return None
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["se_layer"])
    tensors = restore_aliases(load_file(str(path)), meta["aliases"])
    modules = {name: RoutedSparseLinear.from_tensors(f"{prefix}.{name}", m, tensors)
               for name, m in meta["modules"].items()}
    return modules, meta["report"]


def prepare_workdir(out: Path, key: str, resume: bool) -> Path:
    """Create or reopen ``<out>/.se-partial`` for settings ``key``."""
    work = out / PARTIAL_DIR
    state = work / "state.json"
    if state.is_file():
        saved = json.loads(state.read_text()).get("key")
        if not resume:
            raise SEError(f"{out} holds an unfinished expansion: pass --resume to continue it or --overwrite to start over")
        if saved != key:
            raise SEError(f"the unfinished expansion in {out} used other settings: repeat its exact command "
                          "with --resume, or pass --overwrite to start over")
        return work
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_text(state, json.dumps({"key": key}))
    return work


def remove_partial(out: Path) -> None:
    shutil.rmtree(Path(out) / PARTIAL_DIR, ignore_errors=True)
