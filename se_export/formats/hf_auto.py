"""Checkpoints that transformers' Auto classes load: ``AutoModelForCausalLM.from_pretrained(ckpt,
trust_remote_code=True)`` returns the same model as ``se_export.load(ckpt)``.

Why remote code (``auto_map``) and not a registered quantizer: a quantizer only exists once
``se_export`` has been imported, and transformers would have to load our packed tensors through
its own state-dict path; ``auto_map`` needs nothing but ``trust_remote_code=True`` from the
user (which tools such as lm-eval-harness pass through), and the loading stays ``se_export.load``.
The code file in the checkpoint calls the public ``se_export.from_pretrained`` of the installed
package, so a newer se-export loads older checkpoints.

A loader that ignores ``auto_map`` (no ``trust_remote_code``) stops at a missing
``model.safetensors`` (the packed experts are in ``se_model.safetensors``), instead of reading
them as a dense model's missing weights and returning a model with random MLPs.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..atomic import atomic_write_text

CODE_FILE = "se_export_model.py"
CLASS_NAME = "SparseExpansionForCausalLM"

REMOTE_CODE = f'''"""Written by se-export: lets transformers' AutoModelForCausalLM load this checkpoint
(from_pretrained(path, trust_remote_code=True)). The loading itself is se_export.load."""

from se_export import from_pretrained


class {CLASS_NAME}:
    """AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True) -> se_export.load(path)."""

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoModelForCausalLM"):
        return None

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        return from_pretrained(pretrained_model_name_or_path, **kwargs)
'''

# what transformers' Auto classes read and the base model class se_export.load builds must not see
HOOK_KEYS = ("auto_map",)


def add_auto_class_hooks(folder: Path) -> None:
    """Add ``auto_map`` to ``folder/config.json`` and write the remote-code file beside it (both
    atomically)."""
    folder = Path(folder)
    atomic_write_text(folder / CODE_FILE, REMOTE_CODE)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": f"{CODE_FILE.removesuffix('.py')}.{CLASS_NAME}"}
    atomic_write_text(folder / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")


def strip_auto_class_hooks(config) -> None:
    """Drop the hooks from a loaded ``PreTrainedConfig``: the model se_export builds from it is the
    base architecture, and a config it saves again must not point at code that is not beside it."""
    for key in HOOK_KEYS:
        if hasattr(config, key):
            delattr(config, key)
