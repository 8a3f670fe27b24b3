"""The public API (``se_export.expand``, ``load``, ``evaluate``): the one recipe the CLI and the
benchmarks share records the calibration text, and evaluation refuses that text."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

import se_export
from se_export.errors import SEError
from se_export.formats.checkpoint import MANIFEST


@pytest.fixture(scope="module")
def expansion(tmp_path_factory, tiny_llama_dir, calib_file):
    out = tmp_path_factory.mktemp("api") / "ckpt"
    return se_export.expand(str(tiny_llama_dir), out, experts=2, calib=str(calib_file), calib_samples=8, seqlen=32,
                            min_cluster_tokens=8, show_progress=False)


def test_expand_saves_a_checkpoint_that_records_the_calibration_text(expansion, calib_file):
    manifest = json.loads((expansion.out / MANIFEST).read_text())
    assert manifest["calibration"]["sha256"] == hashlib.sha256(calib_file.read_text().encode()).hexdigest()
    assert manifest["method"] == "se" and manifest["experts"] == 2
    assert not (expansion.out / ".se-partial").exists()
    ids = torch.arange(1, 40).unsqueeze(0)
    with torch.no_grad():
        assert torch.allclose(se_export.load(expansion.out)(ids).logits, expansion.model(ids).logits, atol=1e-5)


def test_evaluate_refuses_the_calibration_text_in_memory_and_from_disk(expansion, calib_file):
    for model in (expansion.loaded, str(expansion.out)):
        with pytest.raises(SEError, match="calibrated on"):
            se_export.evaluate(model, str(calib_file), seqlen=32, max_windows=2, show_progress=False)


def test_evaluate_in_memory_equals_the_saved_checkpoint(expansion, eval_file):
    a = se_export.evaluate(expansion.loaded, str(eval_file), seqlen=32, max_windows=3, show_progress=False)
    b = se_export.evaluate(str(expansion.out), str(eval_file), seqlen=32, max_windows=3, show_progress=False)
    assert a["windows"] == b["windows"] == 3
    assert a["perplexity"] == pytest.approx(b["perplexity"], rel=1e-5)


def test_expand_refuses_bad_settings_before_loading_a_model(tmp_path):
    with pytest.raises(SEError, match="unknown --allocate"):
        se_export.expand("no-such-model", tmp_path / "out", allocate="random")
    with pytest.raises(SEError, match="unknown method"):
        se_export.expand("no-such-model", tmp_path / "out", method="obs")
    with pytest.raises(AttributeError):
        _ = se_export.no_such_stage
