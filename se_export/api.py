"""The public Python API: one function per pipeline stage.

The command line, the benchmarks and the tests call these functions, so each recipe (which
settings an expansion records, how a model is evaluated, how an export is checked) exists once.

    import se_export
    expansion = se_export.expand("default", "out/ckpt", experts=16, sparsity="0.5")
    se_export.evaluate("out/ckpt", text="wikitext2", max_windows=64)
    se_export.export_onnx("out/ckpt", "out/onnx")
    report = se_export.validate("out/onnx")
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from .data import calibration_windows, eval_windows, load_text, tokenize
from .errors import SEError
from .eval.analyze import analyze_model
from .eval.evaluate import perplexity
from .eval.validate import Report
from .eval.validate import validate as _validate
from .export.onnx_export import check_export_args
from .export.onnx_export import export_onnx as _export_onnx
from .formats.checkpoint import is_checkpoint, load_checkpoint, read_manifest, save_expansion
from .formats.partial import PARTIAL_DIR, prepare_workdir, remove_partial
from .host_memory import available_memory_bytes
from .method.allocation import allocate_experts, layer_scores
from .method.expand import METHODS, ExpandConfig, ExpandResult, expand_model
from .method.memory_plan import check_fits, plan_expansion
from .modeling.modules import decoded_expert_cache, default_cache_bytes
from .models import LoadedModel, load_model, meta_model

ALLOCATIONS = ("uniform", "wasserstein")


@dataclass
class Expansion:
    """An expanded model in memory and what its checkpoint's manifest records about it."""

    model: nn.Module
    tokenizer: object
    out: Path
    info: dict  # method, K, sparsity, calibration (with the text's sha256), byte statistics, timing
    result: ExpandResult  # per-layer reports, seconds, peak RSS, resumed layers

    @property
    def loaded(self) -> LoadedModel:
        return LoadedModel(self.model, self.tokenizer, self.info["base_model"],
                           self.info.get("calibration", {}).get("sha256"))


def expand(model: str | LoadedModel, out: Path | str, *, method: str = "se", experts: int | None = None,
           sparsity: str = "0.5", calib: str = "wiki", calib_samples: int = 128, seqlen: int = 512,
           pca_factor: int = 32, seed: int = 0, true_sequential: bool = True, min_cluster_tokens: int = 128,
           value_dtype: str = "fp16", group_size: int | None = None, quant_method: str = "joint",
           format: str = "auto", layers: list[int] | None = None, layer_sparsity: str = "uniform",
           owl_lambda: float = 0.08, owl_threshold: float = 5.0, hessian_prior: float = 0.0,
           max_memory_gb: float | None = None, plan_only: bool = False,
           allocate: str = "uniform", resume: bool = False, overwrite: bool = False, show_progress: bool = True,
           log: Callable[[str], None] | None = None) -> Expansion | None:
    """Expand every MLP linear of ``model`` into routed sparse experts and save the checkpoint in
    ``out`` (resumable: every finished layer is kept in ``out/.se-partial`` until the end).

    ``experts`` defaults to 16 for ``se`` and 1 for the single-expert methods. Raises SEError with
    a one-line reason for any setting or folder that cannot work, before loading the model, and
    when the memory plan (``method/memory_plan.py``) exceeds ``max_memory_gb`` or, without it, the
    memory available now. ``plan_only``: log the plan and return None."""
    out = Path(out)
    routed = method in METHODS and METHODS[method].routed
    cfg = ExpandConfig(method=method, experts=experts if experts is not None else (16 if routed else 1),
                       sparsity=sparsity, pca_factor=pca_factor, seed=seed, true_sequential=true_sequential,
                       min_cluster_tokens=min_cluster_tokens, value_dtype=value_dtype, group_size=group_size,
                       quant_method=quant_method, format=format, layers=layers, layer_sparsity=layer_sparsity,
                       owl_lambda=owl_lambda, owl_threshold=owl_threshold, hessian_prior=hessian_prior)
    cfg.check()
    data_free = METHODS[cfg.method].data_free
    if routed and cfg.experts > calib_samples * seqlen:
        raise SEError(f"--experts {cfg.experts} is larger than the {calib_samples * seqlen} calibration tokens: "
                      "use fewer experts or more --calib-samples/--seqlen")
    if allocate not in ALLOCATIONS:
        raise SEError(f"unknown --allocate '{allocate}': use uniform or wasserstein")
    if allocate == "wasserstein" and not routed:
        raise SEError("--allocate wasserstein spreads experts: it needs --method se")
    if not overwrite and is_checkpoint(out):
        raise SEError(f"{out} already holds a checkpoint: pass --overwrite to replace it or choose another --out")
    if not overwrite and out.exists() and not (out / PARTIAL_DIR).is_dir() and any(out.iterdir()):
        raise SEError(f"{out} is a non-empty folder that is not an se-export expansion: choose another --out")
    if resume and (overwrite or not (out / PARTIAL_DIR).is_dir()):
        raise SEError(f"nothing to resume in {out}: run without --resume")
    if max_memory_gb is not None and max_memory_gb <= 0:
        raise SEError(f"--max-memory-gb must be > 0 (got {max_memory_gb:g})")

    loaded = None if isinstance(model, str) else model
    shapes = meta_model(model) if loaded is None else loaded.model
    if shapes is None:  # no config without loading (a hub id): plan from the loaded model
        loaded = load_model(model)
        shapes = loaded.model
    plan = plan_expansion(shapes, cfg, calib_samples * seqlen)
    if plan_only:
        if log:
            log(plan.summary())
        return None
    free = available_memory_bytes()
    check_fits(plan, None if free is None else free + (0 if loaded is None else _model_bytes(loaded.model)),
               max_memory_gb)
    if out.exists() and overwrite:
        shutil.rmtree(out)
    loaded = load_model(model) if loaded is None else loaded
    if data_free:  # the weights alone decide: no calibration text is read
        windows = None
        calibration = {"source": None, "note": f"--method {cfg.method} uses no calibration data"}
    else:
        text = load_text(calib)
        windows = calibration_windows(tokenize(loaded.tokenizer, text), calib_samples, seqlen, seed)
        calibration = {"source": text.name, "sha256": text.sha256, "samples": calib_samples,
                       "seqlen": seqlen, "seed": seed}
    if allocate == "wasserstein":
        results, _ = analyze_model(loaded.model, windows[:32], pairs=16, show_progress=show_progress)
        cfg.experts_per_layer = allocate_experts(layer_scores([r.wd for r in results]), cfg.experts)
        if log:
            log(f"experts per layer (wasserstein allocation): {cfg.experts_per_layer}")
    key = cfg.key({"model": loaded.source, "calibration": calibration,
                   "model_config": loaded.model.config.to_json_string()})
    workdir = prepare_workdir(out, key, resume)
    if log:
        log(plan.summary())
    result = expand_model(loaded.model, windows, cfg, workdir=workdir, show_progress=show_progress)
    if log and cfg.layer_sparsity != "uniform":
        log(f"sparsity per layer ({cfg.layer_sparsity}): "
            + ", ".join(f"{s:.3f}" for _, s in sorted(result.layer_sparsity.items())))
    info = save_expansion(loaded.model, loaded.tokenizer, out, source=loaded.source, cfg=cfg,
                          calibration=calibration, result=result, allocation=allocate)
    remove_partial(out)
    return Expansion(loaded.model, loaded.tokenizer, out, info, result)


def _model_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def load(path: Path | str, with_tokenizer: bool = False):
    """An expanded checkpoint as a transformers causal LM (and its tokenizer when asked)."""
    return load_checkpoint(Path(path), with_tokenizer=with_tokenizer)


def from_pretrained(path: Path | str, dtype=None, torch_dtype=None, device_map=None, **_ignored):
    """``load(path)`` as transformers' Auto classes call it (a checkpoint's ``auto_map``,
    ``se_export/formats/hf_auto.py``). The experts run in fp32 (the kernels' activation type on
    CPU): a float ``dtype`` other than fp32 is refused rather than silently ignored.
    ``device_map`` may name one device; other transformers arguments are ignored."""
    import torch

    want = dtype if dtype is not None else torch_dtype
    if want not in (None, "auto", "float32", torch.float32):
        raise SEError(f"an expanded checkpoint loads in float32, not {want}: drop dtype= (or pass torch.float32)")
    model = load(path)
    if isinstance(device_map, str | torch.device) and str(device_map) not in ("cpu", "auto"):
        model = model.to(device_map)
    return model


def evaluate(model: str | LoadedModel, text: str = "wikitext2", *, seqlen: int = 512, max_windows: int | None = None,
             batch: int = 4, cache_gb: float | None = None, resume: Path | None = None,
             allow_calibration_text: bool = False, show_progress: bool = True) -> dict:
    """Perplexity of ``model`` on non-overlapping ``seqlen`` windows of ``text`` (the standard
    protocol), with every window's NLL. Refuses the text the model was calibrated on (compared by
    sha256) unless ``allow_calibration_text``. ``resume``: keep the window NLLs there after every
    batch, and continue from them. ``cache_gb``: decoded experts kept between batches (None: none
    where the C++ kernels run the packed experts, else sized from the free memory)."""
    body = load_text(text)
    calibrated_on = _calibration_sha256(model)
    if calibrated_on == body.sha256 and not allow_calibration_text:
        raise SEError(f"{text} is the text {_name(model)} was calibrated on: evaluate on other text "
                      "or pass --allow-calibration-text")
    loaded = load_model(model) if isinstance(model, str) else model
    windows = eval_windows(tokenize(loaded.tokenizer, body), seqlen, max_windows)
    cache = default_cache_bytes() if cache_gb is None else int(cache_gb * (1 << 30))
    with decoded_expert_cache(cache):
        result = perplexity(loaded.model, windows, show_progress=show_progress, batch=batch, resume=resume)
    return {"model": _name(model), "text": body.name, **result}


def _calibration_sha256(model: str | LoadedModel) -> str | None:
    if isinstance(model, LoadedModel):
        return model.calibration_sha256
    path = Path(model)
    if path.is_dir() and is_checkpoint(path):
        return read_manifest(path).get("calibration", {}).get("sha256")
    return None


def _name(model: str | LoadedModel) -> str:
    return model if isinstance(model, str) else model.source


def export_onnx(model: str | LoadedModel, out: Path | str, *, dtype: str = "fp32", opset: int = 18,
                portable: bool = False, overwrite: bool = False, show_progress: bool = True) -> dict:
    """Export a checkpoint or a dense model to ``out`` (``model.onnx``, ``se_onnx.json``, config,
    tokenizer), atomically; returns the export's manifest."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise SEError(f"{out} already exists: pass --overwrite to replace it or choose another --out")
    check_export_args(dtype, opset)
    loaded = load_model(model) if isinstance(model, str) else model
    return _export_onnx(loaded.model, loaded.tokenizer, out, dtype=dtype, opset=opset, portable=portable,
                        source=loaded.source, overwrite=overwrite, show_progress=show_progress)


def validate(onnx_dir: Path | str, *, backend: str = "ort", tokens: int = 32, model: str | None = None,
             ppl_windows: int = 4, engine: Path | None = None, plugin: Path | None = None,
             show_progress: bool = True, provider: str = "cpu") -> Report:
    """Compare an export with the PyTorch golden reference (logits, routing, a decode step with
    the KV cache, greedy generation, perplexity); ``report.passed`` says whether all passed."""
    return _validate(Path(onnx_dir), backend=backend, tokens=tokens, model=model, ppl_windows=ppl_windows,
                     engine=engine, plugin=plugin, show_progress=show_progress, provider=provider)
