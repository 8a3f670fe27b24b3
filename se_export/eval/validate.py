"""``se-export validate``: an exported graph against the PyTorch model it came from.

Per backend run: logits on fixed prompts (max/mean abs diff, cosine, top-1 agreement) against
tolerances (fp32: |diff| <= 1e-4 + 1e-5 max |logit| of the position; fp16: cosine of each output >= 0.999 and top-1
agreement >= 0.99, against the reference routed as the backend routed, since fp16 flips near-tie
routers; the comparison with the reference's own routing is reported too), routing
agreement per expanded layer (fraction of tokens sent to the same expert), greedy generation with
the KV cache (token-by-token agreement; fp32 must be identical, fp16 is reported), a decode step with past against
the full-sequence run, and perplexity on a few windows both ways. The PyTorch side is the golden
reference op (decoded experts, torch matmuls), independent of the C++ kernels.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..backends.ort_runtime import OrtCausalLM, check_provider, perplexity_from, windows_nll
from ..backends.trt_build import DEFAULT_ENGINE
from ..backends.trt_runtime import TrtCausalLM
from ..data import eval_windows, load_text, tokenize, wikitext2_path
from ..errors import SEError
from ..export import onnx_schema
from ..export.onnx_export import MODEL_FILE, cache_argument, read_onnx_manifest, returned_cache
from ..formats.checkpoint import expanded_modules
from ..modeling.modules import golden_reference
from ..models import load_model
from ..progress import progress_bar

PROMPTS = (
    "The history of the city begins in the twelfth century, when",
    "In mathematics, a prime number is a natural number greater than one that",
    "The quick brown fox jumps over the lazy dog. The dog, however,",
    "Photosynthesis is the process by which green plants",
)
# fp32: |ort - torch| <= atol + rtol * |torch| elementwise (numpy.allclose form). The absolute 1e-4
# alone is below the fp32 noise floor of a 30-layer model across two BLAS libraries (the dense
# SmolLM2 export differs from PyTorch by 1.04e-4 at logits of magnitude ~20), so rtol 1e-5 (numpy's
# default) scales it with the logit; the report also gives the plain max abs diff.
TOLERANCES = {"fp32": {"atol": 1e-4, "rtol": 1e-5}, "fp16": {"cosine": 0.999, "top1": 0.99}}


@dataclass
class Report:
    backend: str
    onnx_dir: str
    dtype: str
    portable: bool
    checks: dict = field(default_factory=dict)
    passed: bool = True
    seconds: float = 0.0

    def check(self, name: str, ok: bool, **details) -> None:
        self.checks[name] = {"passed": bool(ok), **details}
        self.passed = self.passed and bool(ok)


# ------------------------------------------------------------------ the PyTorch side


class TorchCausalLM:
    """The reference model with the same step API as ``OrtCausalLM`` (fp32, golden op)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model.float().eval()

    @torch.no_grad()
    def run(self, input_ids: np.ndarray, past=None, routing: dict[str, np.ndarray] | None = None):
        """Logits and cache; ``routing`` (router group -> expert of every token) replaces the
        model's own routing, to compare a backend's arithmetic given the experts it chose."""
        from transformers import DynamicCache


        cache = past if past is not None else DynamicCache(config=self.model.config)
        ids = torch.from_numpy(input_ids.astype(np.int64))
        start = cache.get_seq_length()
        pos = torch.arange(start, start + ids.shape[1]).expand(ids.shape[0], -1)
        mods = expanded_modules(self.model) if routing else {}
        for name, m in mods.items():
            group = m.router_group or name
            if group not in routing:
                raise SEError(f"no routing given for router group {group}")
            m.forced_expert_ids = torch.from_numpy(np.asarray(routing[group]).reshape(-1).astype(np.int64))
        try:
            out = self.model(input_ids=ids, position_ids=pos, use_cache=True, **{cache_argument(self.model): cache})
        finally:
            for m in mods.values():
                m.forced_expert_ids = None
        return out.logits.float().numpy(), returned_cache(out)

    def generate(self, input_ids: np.ndarray, new_tokens: int) -> np.ndarray:
        logits, past = self.run(input_ids)
        out = []
        for _ in range(new_tokens):
            token = logits[:, -1].argmax(-1)[:, None]
            out.append(token)
            logits, past = self.run(token, past)
        return np.concatenate(out, axis=1)

    def routing(self, input_ids: np.ndarray) -> dict[str, np.ndarray]:
        """Expert of every token for every router group (one entry per group)."""
        return self.run_recording_routing(input_ids)[1]

    def run_recording_routing(self, input_ids: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Logits of a full-sequence run and the routing it took, in one forward pass."""
        mods = expanded_modules(self.model)
        for m in mods.values():
            m.record_routing = True
        try:
            logits, _ = self.run(input_ids)
            out = {}
            for name, m in mods.items():
                key = m.router_group or name
                if key not in out and m.last_expert_ids is not None:
                    out[key] = m.last_expert_ids.reshape(-1).numpy().astype(np.int64)
            return logits, out
        finally:
            for m in mods.values():
                m.record_routing = False
                m.last_expert_ids = None


# ------------------------------------------------------------------ routing outputs of the graph


def read_graph(onnx_path: Path):
    """The export's graph (weights left on disk), or a one-line SEError for a damaged file."""
    import onnx

    try:
        return onnx.load(str(onnx_path), load_external_data=False).graph
    except Exception as exc:  # protobuf's DecodeError, OSError, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SEError(f"cannot read {onnx_path} ({first}): the export is damaged; re-run se-export onnx") from None


def routing_outputs(graph, groups: list[str]) -> tuple[dict[str, str], str | None]:
    """Map router group -> graph value holding its expert ids; a reason when impossible."""
    custom = [n for n in graph.node if n.domain == onnx_schema.DOMAIN and n.op_type == onnx_schema.OP_TYPE]
    mapping: dict[str, str] = {}
    if custom:
        for node in custom:
            values = node.input[3]
            module = values.removeprefix("model.").removesuffix(".int4_values").removesuffix(".values")
            if len(node.output) > 1 and node.output[1]:
                mapping.setdefault(module, node.output[1])
        return mapping, None
    argmins = [n for n in graph.node if n.op_type == "ArgMin"]
    if len(argmins) != len(groups):
        return {}, f"{len(argmins)} ArgMin nodes for {len(groups)} router groups"
    return {g: n.output[0] for g, n in zip(groups, argmins, strict=True)}, None


def _with_extra_outputs(onnx_path: Path, names: list[str]) -> Path:
    """A copy of the graph (same folder, same external data) that also outputs ``names``."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    produced = {o: n for n in model.graph.node for o in n.output}
    for name in names:
        elem = onnx.TensorProto.INT64 if produced[name].op_type == "ArgMin" else onnx.TensorProto.INT32
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, elem, None))
    fd, tmp = tempfile.mkstemp(prefix=".validate-", suffix=".onnx", dir=onnx_path.parent)
    os.close(fd)
    onnx.save(model, tmp)
    return Path(tmp)


# ------------------------------------------------------------------ comparisons


def compare_logits(ref: np.ndarray, got: np.ndarray) -> dict:
    ref = ref.astype(np.float64).reshape(-1, ref.shape[-1])
    got = got.astype(np.float64).reshape(-1, got.shape[-1])
    diff = np.abs(ref - got)
    cos = (ref * got).sum(-1) / (np.linalg.norm(ref, axis=-1) * np.linalg.norm(got, axis=-1) + 1e-30)
    tol = TOLERANCES["fp32"]
    excess = diff - (tol["atol"] + tol["rtol"] * np.abs(ref))
    # A logit is the final hidden state's dot product with one vocabulary row, so rounding in the
    # hidden state reaches every logit of a position alike, small logits included: the relative
    # part of the bound scales with the position's largest logit, not with each logit's own size.
    row_excess = diff - (tol["atol"] + tol["rtol"] * np.abs(ref).max(-1, keepdims=True))
    whole = float((ref * got).sum() / (np.linalg.norm(ref) * np.linalg.norm(got) + 1e-30))
    return {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()), "cosine": whole,
            "cosine_min": float(cos.min()),
            "top1": float((ref.argmax(-1) == got.argmax(-1)).mean()), "max_abs_ref": float(np.abs(ref).max()),
            "allclose_excess": float(excess.max()), "row_scaled_excess": float(row_excess.max())}


def merge_logit_stats(stats: list[dict]) -> dict:
    """Worst case over prompts (mean for the mean diff and the top-1 rate)."""
    return {"max_abs": max(s["max_abs"] for s in stats), "mean_abs": float(np.mean([s["mean_abs"] for s in stats])),
            "cosine": min(s["cosine"] for s in stats), "cosine_min": min(s["cosine_min"] for s in stats),
            "top1": float(np.mean([s["top1"] for s in stats])), "max_abs_ref": max(s["max_abs_ref"] for s in stats),
            "allclose_excess": max(s["allclose_excess"] for s in stats),
            "row_scaled_excess": max(s["row_scaled_excess"] for s in stats)}


def logits_ok(stats: dict, dtype: str) -> bool:
    tol = TOLERANCES[dtype]
    if dtype == "fp32":
        return stats["row_scaled_excess"] <= 0
    return stats["cosine"] >= tol["cosine"] and stats["top1"] >= tol["top1"]


def prompt_ids(tokenizer, vocab: int) -> list[np.ndarray]:
    if tokenizer is None:
        rng = np.random.default_rng(0)
        return [rng.integers(0, vocab, size=(1, 12 + 3 * i)) for i in range(len(PROMPTS))]
    return [np.asarray(tokenizer(p)["input_ids"], np.int64)[None] for p in PROMPTS]


def eval_text_windows(tokenizer, windows: int, seqlen: int) -> np.ndarray | None:
    if tokenizer is None or windows <= 0:
        return None
    text = load_text("wikitext2" if wikitext2_path() else "pydocs")
    return eval_windows(tokenize(tokenizer, text), seqlen, windows).numpy()


@dataclass
class Comparison:
    """What every check compares: the PyTorch reference and the backend on the same prompts."""

    torch_lm: TorchCausalLM
    backend_lm: object  # OrtCausalLM or TrtCausalLM: run, generate, nll
    backend: str
    dtype: str
    prompts: list[np.ndarray]
    groups: list[str]  # router groups of the expanded model
    mapping: dict[str, str]  # router group -> the graph output holding its expert ids
    why_no_routing: str | None
    report: Report


def validate(onnx_dir: Path, backend: str = "ort", tokens: int = 32, model: str | None = None,
             ppl_windows: int = 4, ppl_seqlen: int = 256, threads: int = 0, engine: Path | None = None,
             plugin: Path | None = None, show_progress: bool = True, provider: str = "cpu") -> Report:
    """Run every check; the report says what passed. Progress: one step per stage and check.
    ``provider`` ("cpu" / "cuda") is ONNX Runtime's execution provider for ``backend="ort"``."""
    with progress_bar(show_progress) as bar:
        return _validate(bar, onnx_dir, backend, tokens, model, ppl_windows, ppl_seqlen, threads, engine, plugin,
                         provider)


def _validate(bar, onnx_dir: Path, backend: str, tokens: int, model: str | None, ppl_windows: int, ppl_seqlen: int,
              threads: int, engine: Path | None, plugin: Path | None, provider: str) -> Report:
    start = time.perf_counter()
    step = bar.add_task("validate: loading", total=4 + (tokens > 0) + (ppl_windows > 0))
    if backend not in ("ort", "trt"):
        raise SEError(f"unknown --backend '{backend}': use ort or trt")
    if backend == "trt" and provider != "cpu":
        raise SEError("--provider chooses ONNX Runtime's execution provider: drop it with --backend trt")
    if backend == "ort":
        check_provider(provider)  # before anything loads: a missing onnxruntime-gpu fails fast
    manifest = read_onnx_manifest(onnx_dir)
    dtype = manifest["dtype"]
    graph = read_graph(onnx_dir / MODEL_FILE)  # a damaged export fails before the PyTorch model loads
    if backend == "trt":  # loads first: no TensorRT, GPU or engine fails fast, before the PyTorch model
        backend_lm = TrtCausalLM(onnx_dir, engine or onnx_dir / DEFAULT_ENGINE, plugin)
        dtype = "fp16" if backend_lm.fp16 else dtype  # an fp16 engine of an fp32 graph
    source = model or manifest.get("source")
    if not source:
        raise SEError(f"{onnx_dir} does not record its PyTorch source: pass --model")
    loaded = load_model(source)
    bar.update(step, advance=1, description=f"validate: PyTorch model {source} loaded")
    tokenizer = _onnx_tokenizer(onnx_dir) or loaded.tokenizer
    report = Report(backend, str(onnx_dir), dtype, manifest["portable"])
    mods = expanded_modules(loaded.model)
    groups = list(dict.fromkeys(m.router_group or n for n, m in mods.items()))
    if backend == "trt":
        mapping, why_not = {}, "the TensorRT engine keeps expert_ids internal (routing is compared in ort)"
    else:
        mapping, why_not = routing_outputs(graph, groups)
        extra = _with_extra_outputs(onnx_dir / MODEL_FILE, list(mapping.values())) if mapping else None
        try:
            backend_lm = OrtCausalLM(onnx_dir, threads=threads, model_file=extra, provider=provider)
        finally:
            if extra is not None:
                extra.unlink(missing_ok=True)
    bar.update(step, advance=1, description=f"validate: {backend} session ready")
    c = Comparison(TorchCausalLM(loaded.model), backend_lm, backend, dtype, prompt_ids(tokenizer, manifest["vocab_size"]),
                   groups, mapping, why_not, report)
    with golden_reference():  # PyTorch's op, one expert decoded at a time: no kernel shared, no dense copies
        check_logits_and_routing(c)
        bar.update(step, advance=1, description="validate: logits and routing compared")
        check_decode_step(c)
        bar.update(step, advance=1, description="validate: decode step compared")
        if tokens > 0:
            check_generation(c, tokens)
            bar.update(step, advance=1, description=f"validate: {tokens}-token generation compared")
        windows = eval_text_windows(tokenizer, ppl_windows, ppl_seqlen)
        if windows is not None and len(windows):
            check_perplexity(c, windows)
        if ppl_windows > 0:
            bar.update(step, advance=1, description="validate: perplexity compared")
    report.seconds = round(time.perf_counter() - start, 1)
    return report


def check_logits_and_routing(c: Comparison) -> None:
    """Logits on every prompt (batch 1) and on a batch of 3 equal-length prompts; routing agreement
    per router group.

    fp16 activations flip near-tie routers, and one flipped expert moves a position's logits far
    more than fp16 rounding does: an fp16 backend is compared with the reference routed as the
    backend routed (the flips themselves are the routing check's business); its comparison with
    the reference's own routing is reported beside it. fp32 must route alike."""
    replay = c.dtype == "fp16" and bool(c.mapping) and bool(c.groups)
    stats, free = [], []
    agree: dict[str, list[float]] = {}
    width = min(p.shape[1] for p in c.prompts)
    batch = np.concatenate([p[:, :width] for p in c.prompts[:3]])
    for ids in [*c.prompts, batch]:
        ref, torch_ids = c.torch_lm.run_recording_routing(ids)
        got, _, named = c.backend_lm.run(ids)
        free.append(compare_logits(ref, got))
        if replay:
            backend_routing = {g: named[v] for g, v in c.mapping.items()}
            stats.append(compare_logits(c.torch_lm.run(ids, routing=backend_routing)[0], got))
        else:
            stats.append(free[-1])
        if c.mapping and ids is not batch:
            for group, value in c.mapping.items():
                if group in torch_ids:
                    same = float((named[value].reshape(-1).astype(np.int64) == torch_ids[group]).mean())
                    agree.setdefault(group, []).append(same)
    merged = merge_logit_stats(stats)
    extra = {}
    if replay:
        own = merge_logit_stats(free)
        extra = {"reference_routing": "the backend's", "own_routing_cosine": own["cosine"],
                 "own_routing_top1": own["top1"], "own_routing_max_abs": own["max_abs"]}
    c.report.check("logits", logits_ok(merged, c.dtype), **merged, tolerance=TOLERANCES[c.dtype],
                   prompts=len(c.prompts), batch=int(batch.shape[0]), **extra)
    if not c.groups:
        return
    if not c.mapping:
        c.report.checks["routing"] = {"passed": None, "reason": c.why_no_routing}
        return
    per_group = {g: float(np.mean(v)) for g, v in agree.items()}
    overall = float(np.mean(list(per_group.values()))) if per_group else 0.0
    need = 1.0 if c.dtype == "fp32" else 0.99
    c.report.check("routing", overall >= need and len(per_group) == len(c.groups), agreement=overall,
                   min_group=min(per_group.values()) if per_group else 0.0, groups=len(per_group),
                   required=need, per_group=per_group)


def check_decode_step(c: Comparison) -> None:
    """A decode step with the KV cache equals the last position of the full run."""
    ids = c.prompts[1]
    full, _, _ = c.backend_lm.run(ids)
    _, past, _ = c.backend_lm.run(ids[:, :-1])
    step, _, _ = c.backend_lm.run(ids[:, -1:], past)
    s = compare_logits(full[:, -1:], step)
    c.report.check("decode_step", logits_ok(s, c.dtype), **s)


def check_generation(c: Comparison, tokens: int) -> None:
    """Greedy generation with the KV cache: identical at fp32; at fp16 reported, since rounding
    flips near-tie argmaxes and greedy decoding then diverges."""
    same, total, first_diff = 0, 0, []
    for ids in c.prompts:
        a = c.torch_lm.generate(ids, tokens)
        b = c.backend_lm.generate(ids, tokens)
        same += int((a == b).sum())
        total += a.size
        mismatch = np.nonzero(a[0] != b[0])[0]
        first_diff.append(int(mismatch[0]) if mismatch.size else None)
    rate = same / max(1, total)
    details = {"agreement": rate, "tokens_per_prompt": tokens, "first_mismatch": first_diff}
    if c.dtype == "fp32":
        c.report.check("generation", rate == 1.0, **details)
    else:
        c.report.checks["generation"] = {"passed": None, **details, "reason": "fp16: reported, not a pass criterion"}


def check_perplexity(c: Comparison, windows: np.ndarray) -> None:
    """Perplexity of both on the same windows (relative difference 1e-4 at fp32, 1e-2 at fp16)."""
    t_nll, count = windows_nll(lambda ids: c.torch_lm.run(ids)[0], windows)
    b_nll, _ = c.backend_lm.nll(windows)
    p_torch, p_backend = perplexity_from(t_nll, count), perplexity_from(b_nll, count)
    rel = abs(p_backend - p_torch) / p_torch
    c.report.check("perplexity", rel <= (1e-4 if c.dtype == "fp32" else 1e-2), torch=p_torch,
                   **{c.backend: p_backend}, relative_diff=rel, windows=len(windows), seqlen=windows.shape[1])


def _onnx_tokenizer(folder: Path):
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(folder))
    except Exception:
        return None


def format_report(report: Report) -> str:
    lines = [f"validate {report.onnx_dir} ({report.backend}, {report.dtype}{', portable' if report.portable else ''})"]
    for name, c in report.checks.items():
        state = "PASS" if c["passed"] else ("n/a" if c["passed"] is None else "FAIL")
        details = ", ".join(f"{k}={_fmt(v)}" for k, v in c.items() if k not in ("passed", "per_group"))
        lines.append(f"  {state:4}  {name}: {details}")
    lines.append(f"  -> {'PASSED' if report.passed else 'FAILED'} in {report.seconds:.1f}s")
    return "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if (v == 0 or abs(v) < 1e-2 or abs(v) > 1e4) and not math.isnan(v) else f"{v:.4f}"
    return str(v)


def to_json(report: Report) -> str:
    return json.dumps(report.__dict__, indent=1)
