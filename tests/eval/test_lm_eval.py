"""lm-eval-harness as a consumer: its ``hf`` model loads an expanded checkpoint through
AutoModelForCausalLM (``trust_remote_code=True``) and scores it, and the dense model, on the local
task se-export writes. Its bits per byte must equal our own rolling log-likelihood of the same
documents (one window each, after lm-eval's prefix token), computed from se_export.load."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import se_export
from se_export.eval.lm_eval_task import DOCUMENTS_FILE, split_documents, write_lm_eval_task
from se_export.formats.checkpoint import save_checkpoint
from se_export.method.expand import ExpandConfig, expand_model

pytest.importorskip("lm_eval")


def test_documents_cover_the_text_in_order_at_line_ends():
    text = "\n".join(f"line {i} " + "x" * (i % 7) for i in range(200))
    docs = split_documents(text, 120)
    assert "\n".join(docs) == text, "every line once, in order"
    assert all(len(d) >= 120 for d in docs[:-1]) and len(docs) > 5


def _bits_per_byte(model, tokenizer, documents: list[str]) -> float:
    """-sum log2 p(doc tokens | lm-eval's prefix token, earlier tokens) / UTF-8 bytes, each
    document in one window (shorter than the model's context)."""
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    total_ll, total_bytes = 0.0, 0
    with torch.no_grad():
        for doc in documents:
            ids = tokenizer.encode(doc, add_special_tokens=False)
            assert len(ids) < model.config.max_position_embeddings, "one window per document"
            inputs = torch.tensor([[prefix, *ids[:-1]]])
            logp = torch.log_softmax(model(inputs).logits.double(), -1)[0]
            total_ll += float(logp[torch.arange(len(ids)), torch.tensor(ids)].sum())
            total_bytes += len(doc.encode("utf-8"))
    return -total_ll / total_bytes / math.log(2)


@pytest.mark.slow
def test_lm_eval_harness_scores_the_expanded_checkpoint_and_the_dense_model(tiny_llama_dir, tiny_tokenizer,
                                                                            eval_file, tmp_path):
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    calib = torch.randint(0, len(tiny_tokenizer), (8, 64), generator=torch.Generator().manual_seed(5))
    expanded = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    expand_model(expanded, calib, ExpandConfig(experts=2, sparsity="0.5", min_cluster_tokens=4, pca_factor=0),
                 show_progress=False)
    save_checkpoint(expanded, tiny_tokenizer, tmp_path / "ckpt", {"method": "se"})

    task = write_lm_eval_task(tmp_path / "task", str(eval_file), docs=4, min_chars=200)
    documents = [json.loads(line)["text"] for line in (tmp_path / "task" / DOCUMENTS_FILE).read_text().splitlines()]
    assert len(documents) == task["documents"] == 4
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    scores = {}
    for name, path, model in (("dense", tiny_llama_dir, dense), ("expanded", tmp_path / "ckpt", None)):
        out = tmp_path / f"lm-eval-{name}"
        proc = subprocess.run([sys.executable, "-m", "lm_eval", "run", "--model", "hf", "--model_args",
                               f"pretrained={path},trust_remote_code=True", "--include_path", str(tmp_path / "task"),
                               "--tasks", task["task"], "--device", "cpu", "--batch_size", "1", "--output_path",
                               str(out)], capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results = json.loads(next(Path(out).rglob("results_*.json")).read_text())["results"][task["task"]]
        scores[name] = results["bits_per_byte,none"]
        reference = _bits_per_byte(model if model is not None else se_export.load(path), tiny_tokenizer, documents)
        assert scores[name] == pytest.approx(reference, rel=1e-4), name
    assert scores["expanded"] != pytest.approx(scores["dense"], rel=1e-6), "lm-eval ran the expanded model"
