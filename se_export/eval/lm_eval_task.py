"""A local lm-eval-harness task: rolling log-likelihood (perplexity) of documents cut from a text
se-export already reads (``wikitext2``, ``wiki``, ``pydocs`` or a file).

Why: lm-eval-harness is how users compare models, and its own tasks download their data from the
Hub, which an offline machine cannot reach. This writes a task folder (``documents.jsonl`` and a
task YAML that reads it with the ``json`` dataset builder) for ``lm_eval --include_path``;
checkpoints load in it through ``AutoModelForCausalLM`` (``trust_remote_code=True``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..atomic import atomic_write_text
from ..data import load_text
from ..errors import SEError

DOCUMENTS_FILE = "documents.jsonl"
# lm-eval's rolling log-likelihood metrics and the aggregations its wikitext task uses
METRICS = (("word_perplexity", "weighted_perplexity"), ("byte_perplexity", "weighted_perplexity"),
           ("bits_per_byte", "bits_per_byte"))


def task_name(text: str) -> str:
    """``se_<text>``: the text's name, or a file's stem, as an lm-eval task name."""
    stem = Path(text).stem if Path(text).suffix else text
    return "se_" + re.sub(r"[^a-z0-9]+", "_", stem.lower()).strip("_")


def split_documents(text: str, min_chars: int) -> list[str]:
    """Consecutive lines joined until each document holds at least ``min_chars`` characters (a
    short remainder joins the last document); documents end at non-blank line ends."""
    docs: list[str] = []
    current: list[str] = []
    size = -1  # the newlines between lines
    for line in text.strip("\n").split("\n"):
        current.append(line)
        size += len(line) + 1
        if size >= min_chars and line.strip():
            docs.append("\n".join(current))
            current, size = [], -1
    if current and "".join(current).strip():
        if docs:
            docs[-1] += "\n" + "\n".join(current)
        else:
            docs.append("\n".join(current))
    return docs


def write_lm_eval_task(out: Path, text: str = "wikitext2", docs: int = 20, min_chars: int = 2000) -> dict:
    """Write the task folder ``out``; returns ``{"task", "documents", "characters", "path"}``."""
    if docs < 1 or min_chars < 1:
        raise SEError(f"--docs ({docs}) and --min-chars ({min_chars}) must be at least 1")
    body = load_text(text)
    documents = split_documents(body.text, min_chars)[:docs]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    name = task_name(text)
    atomic_write_text(out / DOCUMENTS_FILE, "".join(json.dumps({"text": d}) + "\n" for d in documents))
    yaml = "\n".join([
        f"# lm-eval-harness task written by se-export: rolling log-likelihood of {len(documents)} documents",
        f"# of {body.name} ({sum(map(len, documents))} characters)",
        f"task: {name}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {json.dumps(str((out / DOCUMENTS_FILE).resolve()))}",
        "output_type: loglikelihood_rolling",
        "test_split: test",
        'doc_to_text: ""',
        'doc_to_target: "{{text}}"',
        "metric_list:",
        *[line for metric, aggregation in METRICS for line in
          (f"  - metric: {metric}", f"    aggregation: {aggregation}", "    higher_is_better: false")],
        "metadata:",
        "  version: 1.0",
        "",
    ])
    atomic_write_text(out / f"{name}.yaml", yaml)
    return {"task": name, "documents": len(documents), "characters": sum(map(len, documents)), "path": str(out)}
