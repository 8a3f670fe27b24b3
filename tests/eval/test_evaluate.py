"""Perplexity: batched windows give the per-window NLLs of an independent float64 recomputation."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import build_tiny_model

from se_export.eval.evaluate import perplexity


def reference_window_nll(model, windows: torch.Tensor) -> list[float]:
    """Each window alone, log-softmax in float64, NLL of the next token averaged over positions."""
    out = []
    with torch.no_grad():
        for w in windows:
            logits = model(w[None], use_cache=False).logits[0, :-1].double()
            logp = torch.log_softmax(logits, dim=-1)
            out.append(float(-logp.gather(1, w[1:, None]).mean()))
    return out


def test_batched_perplexity_matches_reference(tiny_tokenizer):
    model = build_tiny_model("llama", tiny_tokenizer)
    model.eval()
    windows = torch.randint(0, model.config.vocab_size, (7, 24), generator=torch.Generator().manual_seed(0))
    ref = reference_window_nll(model, windows)
    for batch in (1, 3, 8):  # 7 windows: a ragged last batch for 3, one batch for 8
        got = perplexity(model, windows, show_progress=False, batch=batch)
        assert len(got["window_nll"]) == 7
        for a, b in zip(got["window_nll"], ref, strict=True):
            assert abs(a - b) < 1e-4 * (1 + abs(b))
        assert math.isclose(got["perplexity"], math.exp(sum(ref) / 7), rel_tol=1e-4)
        assert got["tokens"] == 7 * 23


class _Interrupt(Exception):
    pass


def test_interrupted_perplexity_resumes_to_the_same_result(tiny_tokenizer, tmp_path):
    model = build_tiny_model("llama", tiny_tokenizer)
    model.eval()
    windows = torch.randint(0, model.config.vocab_size, (7, 24), generator=torch.Generator().manual_seed(1))
    whole = perplexity(model, windows, show_progress=False, batch=2)
    state = tmp_path / "partial.json"

    forward = model.forward
    calls = {"n": 0}

    def failing_forward(*args, **kwargs):  # dies in the third batch, after two were saved
        calls["n"] += 1
        if calls["n"] == 3:
            raise _Interrupt
        return forward(*args, **kwargs)

    model.forward = failing_forward
    with pytest.raises(_Interrupt):
        perplexity(model, windows, show_progress=False, batch=2, resume=state)
    model.forward = forward
    assert state.is_file()

    resumed = perplexity(model, windows, show_progress=False, batch=2, resume=state)
    assert resumed["resumed_windows"] == 4
    assert resumed["window_nll"] == whole["window_nll"]  # same batches, bit for bit
    assert resumed["perplexity"] == whole["perplexity"]

    # a finished state is not recomputed; saved NLLs of other weights, other windows or another
    # batching are not continued
    assert perplexity(model, windows, show_progress=False, batch=2, resume=state)["window_nll"] == whole["window_nll"]
    saved = state.read_text()
    other = build_tiny_model("llama", tiny_tokenizer, seed=1)
    for m, w, b in ((other, windows, 2), (model, windows[:5], 2), (model, windows, 3)):
        state.write_text(saved)
        assert perplexity(m, w, show_progress=False, batch=b, resume=state)["resumed_windows"] == 0


def test_packed_kernels_and_decoded_experts_give_the_same_perplexity(tiny_tokenizer, calib_file, tmp_path):
    """The default evaluation path (C++ kernels on the packed experts, no decoded copies) against
    the decoded-expert reference (the golden op's grouped product on dense fp32 weights)."""
    from se_export.api import evaluate, expand, load_model
    from se_export.backends import kernels
    from se_export.modeling.modules import default_cache_bytes

    if not kernels.available():
        pytest.skip("the C++ kernel library is not built")
    assert default_cache_bytes() == 0
    src = tmp_path / "dense"
    build_tiny_model("llama", tiny_tokenizer, src)
    expand(str(src), tmp_path / "ck", experts=4, sparsity="0.5", calib=str(calib_file), calib_samples=8, seqlen=32,
           min_cluster_tokens=8, show_progress=False)
    loaded = load_model(str(tmp_path / "ck"))
    text = tmp_path / "eval.txt"
    text.write_text(" ".join(f"word{i % 97} token{i % 13}" for i in range(3000)))
    packed = evaluate(loaded, str(text), seqlen=32, max_windows=6, batch=3, show_progress=False)
    decoded = evaluate(loaded, str(text), seqlen=32, max_windows=6, batch=3, cache_gb=1.0, show_progress=False)
    for a, b in zip(packed["window_nll"], decoded["window_nll"], strict=True):
        assert abs(a - b) < 1e-4 * (1 + abs(b))


def test_without_kernels_the_cache_fits_half_the_free_memory(monkeypatch):
    from se_export.backends import kernels
    from se_export.modeling import modules

    monkeypatch.setattr(kernels, "available", lambda: False)
    monkeypatch.setattr(modules, "available_memory_bytes", lambda: 6 << 30)
    assert modules.default_cache_bytes(8.0) == 3 << 30
    monkeypatch.setattr(modules, "available_memory_bytes", lambda: 64 << 30)
    assert modules.default_cache_bytes(8.0) == 8 << 30
    monkeypatch.setattr(modules, "available_memory_bytes", lambda: None)
    assert modules.default_cache_bytes(2.0) == 2 << 30
