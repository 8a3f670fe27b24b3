"""The expansion's memory plan: its model term against the expanded model's real tensors, and
the refusal of a plan that cannot fit."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny_model

import se_export
from se_export.errors import SEError
from se_export.method.expand import ExpandConfig, expand_model
from se_export.method.memory_plan import MemoryPlan, check_fits, plan_expansion
from se_export.modeling.modules import RoutedSparseLinear


def _tensor_bytes(model: torch.nn.Module) -> int:
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return params + sum(b.numel() * b.element_size() for m in model.modules() if isinstance(m, RoutedSparseLinear)
                        for b in m.buffers())


@pytest.mark.parametrize(("family", "kw"), [
    ("llama", {}), ("llama", {"value_dtype": "int4", "group_size": 16}), ("gpt_neox", {"format": "csr16"}),
    ("gpt_neox", {"sparsity": "0.7", "value_dtype": "int8", "group_size": 32}),
])
def test_planned_model_bytes_match_the_expanded_model(family, kw, tiny_tokenizer):
    model = build_tiny_model(family, tiny_tokenizer)
    cfg = ExpandConfig(experts=4, min_cluster_tokens=8, batch_size=4, **kw)
    plan = plan_expansion(model, cfg, 12 * 48)
    expand_model(model, torch.randint(0, model.config.vocab_size, (12, 48)), cfg, show_progress=False)
    assert plan.final_model_bytes == pytest.approx(_tensor_bytes(model), rel=0.01)
    assert plan.peak_bytes == sum(plan.parts.values())


def test_plan_grows_with_experts_and_calibration_tokens(tiny_tokenizer):
    with torch.device("meta"):
        model = build_tiny_model("llama", tiny_tokenizer)
    base = plan_expansion(model, ExpandConfig(experts=4), 1000)
    assert plan_expansion(model, ExpandConfig(experts=8), 1000).parts["expansion"] > base.parts["expansion"]
    assert plan_expansion(model, ExpandConfig(experts=4), 4000).parts["activations"] == 4 * base.parts["activations"]


def test_check_fits_refuses_with_the_flags_to_change():
    plan = MemoryPlan(10 << 30, 3, {"model": 10 << 30})
    check_fits(plan, 11 << 30)
    check_fits(plan, None)
    with pytest.raises(SEError, match=r"about 10\.0 GiB .* layer 3.*--experts or --calib-samples"):
        check_fits(plan, 4 << 30)
    with pytest.raises(SEError, match="--max-memory-gb 2"):
        check_fits(plan, 64 << 30, limit_gb=2)


def test_expand_refuses_before_loading_and_plan_only_writes_nothing(tiny_llama_dir, calib_file, tmp_path):
    out = tmp_path / "ck"
    with pytest.raises(SEError, match=r"--max-memory-gb 0\.001"):
        se_export.expand(str(tiny_llama_dir), out, experts=2, calib=str(calib_file), calib_samples=4, seqlen=16,
                         max_memory_gb=0.001, show_progress=False)
    lines: list[str] = []
    assert se_export.expand(str(tiny_llama_dir), out, experts=2, calib=str(calib_file), plan_only=True,
                            show_progress=False, log=lines.append) is None
    assert not out.exists() and lines and lines[0].startswith("peak host memory")
