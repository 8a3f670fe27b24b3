"""Quality grid (issue: quality benchmark): dense vs magnitude / Wanda / SparseGPT / Sparse
Expansion (K = 2, 4, 8, 16) at 50%, 70%, 90% and 2:4 MLP sparsity on the default model, plus
the ablations at 70% (PCA factor, true-sequential, calibration samples).

Every configuration is expanded in-process, evaluated on WikiText-2 test (512-token
non-overlapping windows) and on an out-of-domain text (Python's language reference,
``pydocs``), and its result is cached in ``bench/results/quality/<key>.json`` keyed by the full
configuration; a re-run reuses finished configurations, resumes an interrupted expansion
from ``out/quality/<key>`` (per-layer partial state) and an interrupted evaluation from
``out/quality/partial-evals`` (window NLLs so far). ``--report`` only rebuilds the summary
JSON, the Markdown table and the plots from the cache.

Expanded grid points are kept as se-export checkpoints under ``out/quality/ckpt/<config key>``,
so the final evaluation on all WikiText-2 windows (``--eval-windows 0``) does not expand again.
Every window's NLL is stored, which gives paired bootstrap intervals for SE vs SparseGPT.

    .venv/bin/python bench/quality.py --grid main --grid ablation          # first 40 windows
    .venv/bin/python bench/quality.py --eval-windows 0 --only "@ 0.9"      # all 589 windows
    .venv/bin/python bench/quality.py --eval-windows 0 --jobs 2            # two workers, 1 thread each
    .venv/bin/python bench/quality.py --report

Every configuration is claimed with a lock (``out/quality/locks``, released by the kernel when
its process ends), so ``--jobs N`` workers, or runs started from two shells, share one grid
without doing a configuration twice.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import math
import os
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from se_export.api import evaluate, expand
from se_export.atomic import atomic_write_text
from se_export.eval.stats import claim_check, claim_table
from se_export.formats.checkpoint import is_checkpoint
from se_export.formats.partial import PARTIAL_DIR
from se_export.formats.quantization import DEFAULT_GROUP_SIZE, QUANT_GRID
from se_export.formats.sparse_format import packed_nbytes
from se_export.method.expand import DATA_FREE_METHODS
from se_export.modeling.modules import RoutedSparseLinear
from se_export.models import load_model

RESULTS = Path("bench/results")
CACHE = RESULTS / "quality"
WORK = Path("out/quality")
EVAL_TEXTS = ("wikitext2", "pydocs")  # in-domain test text, out-of-domain text
SPARSITIES = ("0.7", "0.9", "0.5", "2:4")  # order = priority when the grid is cut short
SUBSET_WINDOWS = 40  # WikiText-2 windows while iterating over the grid; the final table uses all
EVAL_BATCH = 4  # windows per forward pass (more tokens per expert; same perplexity up to rounding)


@dataclass(frozen=True)
class Config:
    """One grid point; every field changes the result, so all of them are in the cache key."""

    method: str  # dense | magnitude | wanda | sparsegpt | se
    sparsity: str = "0"
    experts: int = 1
    pca_factor: int = 32
    true_sequential: bool = True
    calib_samples: int = 128
    seqlen: int = 512
    seed: int = 0
    value_dtype: str = "fp16"  # fp16, or int8 / int4 quantized values
    group_size: int = 0  # input columns per scale of int8/int4 (0: the dtype's default)
    quant: str = "joint"  # int8/int4 with SparseGPT: joint (in the sweep) or rtn (rounded after it)
    quant_grid: str = QUANT_GRID  # int8/int4 codes: full-range (signed scales), or the older symmetric grid
    layer_sparsity: str = "uniform"  # or owl: per-layer sparsity from outlier ratios, same total
    hessian_prior: float = 0.0  # se: tokens of the pooled Hessian per expert, in units of in_features

    @property
    def quantized(self) -> bool:
        return self.value_dtype in ("int8", "int4")

    @property
    def precision(self) -> str:
        """``fp16``, ``int4``, ``int4 RTN``: the value precision and, for SparseGPT-based methods,
        how it was reached (wanda and magnitude always round to nearest)."""
        if not self.quantized:
            return self.value_dtype
        text = self.value_dtype + (f" G{self.group_size}" if self.group_size else "")
        text += " RTN" if self.quant == "rtn" and self.method in ("se", "sparsegpt") else ""
        return text + (" symmetric grid" if self.quant_grid == "symmetric" else "")

    @property
    def label(self) -> str:
        if self.method == "dense":
            return "dense"
        if self.sparsity == "0":  # a dense model quantized: GPTQ is SparseGPT's sweep at sparsity 0
            return f"dense {self.precision} ({'GPTQ' if self.method == 'sparsegpt' else 'RTN'})"
        name = f"se K={self.experts}" if self.method == "se" else self.method
        extras = []
        if self.pca_factor != 32:
            extras.append(f"pca={self.pca_factor or 'none'}")
        if not self.true_sequential:
            extras.append("dense-output down")
        if self.calib_samples != 128:
            extras.append(f"calib={self.calib_samples}")
        if self.seed != 0:
            extras.append(f"seed={self.seed}")
        if self.layer_sparsity != "uniform":
            extras.append(self.layer_sparsity)
        if self.hessian_prior:
            extras.append(f"prior={self.hessian_prior:g}")
        values = f" {self.precision}" if self.quantized else ""
        return f"{name} @ {self.sparsity}{values}" + (f" ({', '.join(extras)})" if extras else "")

    def fields(self) -> dict:
        """The configuration as hashed into cache keys: the value-precision fields only when they
        differ from fp16 values (and the grid only when it is not the symmetric one, the only one
        before the field existed), so rows cached before those fields existed keep their keys."""
        out = asdict(self)
        for name, default in (("value_dtype", "fp16"), ("group_size", 0), ("quant", "joint"),
                              ("layer_sparsity", "uniform"), ("hessian_prior", 0.0)):
            if out[name] == default:
                del out[name]
        if not self.quantized or self.quant_grid == "symmetric":
            del out["quant_grid"]
        return out

    @classmethod
    def of(cls, fields: dict) -> Config:
        """The Config a cached row recorded (quantized rows from before the grid field: symmetric)."""
        quantized = fields.get("value_dtype", "fp16") in ("int8", "int4")
        return cls(**{"quant_grid": QUANT_GRID if not quantized else "symmetric", **fields})


def main_grid() -> list[Config]:
    grid = [Config("dense")]
    for s in SPARSITIES:
        grid += [Config("sparsegpt", s), Config("se", s, 16), Config("magnitude", s), Config("wanda", s),
                 Config("se", s, 8), Config("se", s, 4), Config("se", s, 2)]
    return grid


def ablation_grid() -> list[Config]:
    """At 70%: router features, the down projection's calibration, less calibration data; the
    down projection calibrated on the dense gate/up outputs at 50% and 90% as well (a default
    changes only for what wins at every sparsity)."""
    return [Config("se", "0.7", 16, pca_factor=0), Config("se", "0.7", 16, pca_factor=8),
            Config("se", "0.7", 16, true_sequential=False), Config("se", "0.7", 16, calib_samples=32),
            Config("se", "0.5", 16, true_sequential=False), Config("se", "0.9", 16, true_sequential=False)]


def lever_grid() -> list[Config]:
    """Levers toward dense at equal bytes and active weights (OWL per-layer sparsity for SE and
    SparseGPT alike; the Hessian prior for SE, with the full and the small calibration set)."""
    return [Config("se", "0.7", 16, layer_sparsity="owl"), Config("sparsegpt", "0.7", layer_sparsity="owl"),
            Config("se", "0.7", 16, hessian_prior=1.0), Config("se", "0.7", 16, calib_samples=32, hessian_prior=1.0),
            Config("se", "0.5", 16, layer_sparsity="owl"), Config("sparsegpt", "0.5", layer_sparsity="owl")]


def seed_grid() -> list[Config]:
    """The claim's two rows at 90% with other calibration samples and k-means seeds (1, 2): how far
    a re-expansion moves a 90% model, against the SE K=16 / SparseGPT gap."""
    return [Config(method, "0.9", experts, seed=seed) for seed in (1, 2)
            for method, experts in (("sparsegpt", 1), ("se", 16))]


def quant_grid() -> list[Config]:
    """Quantized values (issue: quantized sparse experts), in priority order: SE K=16 at 50% with
    int8, joint int4 and RTN int4 (the targets); the dense int8/int4 models a user would pick
    instead (GPTQ = SparseGPT at sparsity 0, and RTN); then SparseGPT and SE K=16 / K=4 at 50% and
    70% with each precision."""
    precisions = (("int8", "joint"), ("int4", "joint"), ("int4", "rtn"))
    grid = [Config("se", "0.5", 16, value_dtype=v, quant=q) for v, q in precisions]
    grid += [Config(m, "0", 1, value_dtype=v) for v in ("int4", "int8") for m in ("sparsegpt", "magnitude")]
    for sparsity in ("0.5", "0.7"):
        for method, experts in (("sparsegpt", 1), ("se", 16), ("se", 4)):
            grid += [Config(method, sparsity, experts, value_dtype=v, quant=q) for v, q in precisions]
    return list(dict.fromkeys(grid))


GRIDS = {"main": main_grid, "ablation": ablation_grid, "levers": lever_grid, "seeds": seed_grid, "quant": quant_grid}


def cache_key(cfg: Config, eval_setup: dict) -> str:
    blob = json.dumps({"config": cfg.fields(), "eval": eval_setup}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def checkpoint_dir(cfg: Config, model: str) -> Path:
    """Where a grid point's expanded model is kept, keyed by what changes the weights only, so
    another evaluation setting (all windows) re-evaluates it without expanding again."""
    blob = json.dumps({"config": cfg.fields(), "model": model}, sort_keys=True)
    return WORK / "ckpt" / hashlib.sha256(blob.encode()).hexdigest()[:16]


def mlp_accounting(model: torch.nn.Module, dense_linears: dict[str, tuple[int, int]]) -> dict:
    """Active MLP weights per token (chosen expert's kept weights + router), the MLP bytes a token
    reads (that expert's values, index and scales, and the router) and stored bytes (the smaller of
    the two formats, so every grid point is priced the same way; experts that keep every weight are
    priced without an index, as a dense quantized model stores them)."""
    active, stored, read, router_bytes = 0.0, 0, 0.0, 0
    for name, (out_f, in_f) in dense_linears.items():
        module = model.get_submodule(name)
        if isinstance(module, RoutedSparseLinear):
            k, nnz = module.num_experts, module.values.numel()
            value_bytes = module.quant.bits / 8 if module.quant is not None else module.values.element_size()
            scale_bytes = 0 if module.quant is None else module.scales.numel() * 2  # fp16 on disk
            # the compact storage's price whatever format --format auto chose for speed (value bytes 0:
            # the index and row pointers only)
            index_bytes = 0 if nnz == k * out_f * in_f else min(
                packed_nbytes(f, k, out_f, in_f, nnz, 0) for f in ("bitmap", "csr16"))
            router = (module.router_weight.numel() + module.router_bias.numel()) * 4 if k > 1 else 0
            expert_bytes = math.ceil(nnz * value_bytes) + index_bytes + scale_bytes
            active += nnz / k + (in_f * k if k > 1 else 0)
            stored += expert_bytes
            read += expert_bytes / k + router
            router_bytes += router
        else:
            active += out_f * in_f
            stored += out_f * in_f * 2  # dense fp16, the same value precision as the experts
            read += out_f * in_f * 2
    dense = sum(o * i for o, i in dense_linears.values())
    return {"active_weights_per_token": int(active), "active_fraction": active / dense,
            "stored_mlp_bytes": stored, "read_mlp_bytes_per_token": int(read), "router_bytes": router_bytes,
            "dense_mlp_bytes_fp16": dense * 2}


def mlp_linears(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    from se_export.adapters import adapter_for, decoder_layers, linear_weight

    adapter = adapter_for(model.config)
    shapes = {}
    for i, layer in enumerate(decoder_layers(model, adapter)):
        for group in adapter.groups:
            for name in group:
                w, _ = linear_weight(layer.get_submodule(name), adapter)
                shapes[f"{adapter.layers}.{i}.{name}"] = tuple(w.shape)
    return shapes


def router_summary(layers: list[dict]) -> dict:
    routers = [g["router"] for rep in layers for g in rep["groups"] if "router" in g]
    if not routers:
        return {}
    shares = [max(r["cluster_sizes"]) / sum(r["cluster_sizes"]) for r in routers]
    inference = [g["inference_routing_agreement"] for rep in layers for g in rep["groups"]
                 if "inference_routing_agreement" in g]
    measured = {"inference_routing_agreement_min": min(inference),
                "inference_routing_agreement_mean": sum(inference) / len(inference)} if inference else {}
    return {**measured, "fold_agreement_min": min(r.get("fold_agreement", 1.0) for r in routers),
            "fold_agreement_mean": sum(r.get("fold_agreement", 1.0) for r in routers) / len(routers),
            "largest_cluster_share_mean": sum(shares) / len(shares),
            "experts_after_merge_mean": sum(r["experts"] for r in routers) / len(routers),
            "outliers_excluded_mean": sum(r["outliers_excluded"] for r in routers) / len(routers)}


def config_of_checkpoint(path: Path) -> tuple[Config, dict]:
    """The grid configuration an ``se-export expand`` checkpoint was made with (and its manifest)."""
    from se_export.formats.checkpoint import read_manifest

    m = read_manifest(path)
    calib = m.get("calibration", {})
    if m["method"] in DATA_FREE_METHODS:  # no calibration: the grid's settings describe it as well as any
        calib = {"source": "wiki", "samples": Config.calib_samples, "seqlen": Config.seqlen, "seed": Config.seed}
    if m.get("owl_lambda", 0.08) != 0.08 or m.get("owl_threshold", 5.0) != 5.0:
        raise SystemExit(f"{path}: OWL settings differ from the grid's (lambda 0.08, threshold 5)")
    if calib.get("source") != "wiki" or m.get("allocation", "uniform") != "uniform":
        raise SystemExit(f"{path}: not calibrated like the grid (wiki text, uniform K)")
    value_dtype = m.get("value_dtype", "fp16")
    group_size = int(m.get("group_size") or 0)
    if group_size == DEFAULT_GROUP_SIZE.get(value_dtype):
        group_size = 0
    return Config(m["method"], str(m["sparsity"]), int(m["experts"]), int(m["pca_factor"]), bool(m["true_sequential"]),
                  int(calib["samples"]), int(calib["seqlen"]), int(calib["seed"]), value_dtype, group_size,
                  m.get("quant_method", "joint"), m.get("quant_grid", "symmetric"),
                  m.get("layer_sparsity", "uniform"), float(m.get("hessian_prior", 0.0))), m


def expansion_summary(seconds: float | None, resumed_layers: int, layers: list[dict]) -> dict:
    """What a grid row records of its expansion, whether just run or read from a checkpoint."""
    errors = [e for rep in layers for g in rep["groups"] for e in g.get("reconstruction_error", [])]  # none: data-free
    return {"expand_seconds": seconds, "resumed_layers": resumed_layers, "router": router_summary(layers),
            "reconstruction_error_mean": sum(errors) / len(errors) if errors else None}


def run_config(cfg: Config, args, eval_setup: dict, key: str, checkpoint: Path | None = None) -> dict:
    start = time.perf_counter()
    loaded = load_model(str(checkpoint) if checkpoint else args.model)
    model = loaded.model
    linears = None if checkpoint else mlp_linears(model)
    report: dict = {"config": asdict(cfg), "label": cfg.label, "key": key, "eval": eval_setup}
    if checkpoint is not None:  # expanded earlier by `se-export expand` with the same settings
        from se_export.formats.checkpoint import read_manifest

        manifest = read_manifest(checkpoint)
        exp = json.loads((checkpoint / "expand_report.json").read_text())
        expansion = manifest.get("expansion", {})
        report.update(expansion_summary(expansion.get("seconds"), expansion.get("resumed_layers", 0), exp["layers"]))
        report["from_checkpoint"] = str(checkpoint)
    elif cfg.method != "dense":  # `se-export expand`'s recipe, kept as a checkpoint (resumable in place)
        out = checkpoint_dir(cfg, args.model)
        expansion = expand(loaded, out, method=cfg.method, experts=cfg.experts, sparsity=cfg.sparsity,
                           calib_samples=cfg.calib_samples, seqlen=cfg.seqlen, pca_factor=cfg.pca_factor,
                           seed=cfg.seed, true_sequential=cfg.true_sequential, value_dtype=cfg.value_dtype,
                           group_size=cfg.group_size or None,
                           quant_method=cfg.quant if cfg.quantized and cfg.method in ("se", "sparsegpt") else "joint",
                           layer_sparsity=cfg.layer_sparsity, hessian_prior=cfg.hessian_prior,
                           resume=(out / PARTIAL_DIR).is_dir(),
                           show_progress=not args.quiet)
        loaded = expansion.loaded
        report.update(expansion_summary(expansion.result.seconds, expansion.result.resumed_layers,
                                        expansion.result.layers))
    if checkpoint is not None:
        linears = {n: (m.out_features, m.in_features) for n, m in model.named_modules() if isinstance(m, RoutedSparseLinear)}
    report.update(mlp_accounting(model, linears))
    for name, windows in zip(EVAL_TEXTS, (args.eval_windows, args.ood_windows), strict=True):
        report[name] = evaluate(loaded, name, seqlen=512, max_windows=windows or None, batch=EVAL_BATCH,
                                resume=partial_eval_path(key, name), show_progress=not args.quiet)
    report["seconds"] = round(time.perf_counter() - start, 1)
    report["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return report


@contextmanager
def config_lock(key: str) -> Iterator[bool]:
    """Hold this grid point's lock while it runs: yields False when another live process holds it.
    An flock, not a PID file, so a killed worker never leaves a stale lock behind."""
    path = WORK / "locks" / f"{key}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def worker_command(argv: list[str], threads: int) -> list[str]:
    """This script's command line for one ``--jobs`` worker: the same grid, one job, its share of
    the cores, no progress bars and no report (the parent writes it once all have finished)."""
    rest, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--jobs":
            skip = True
        elif not arg.startswith("--jobs="):
            rest.append(arg)
    return [sys.executable, str(Path(__file__).resolve()), *rest, "--threads", str(threads), "--quiet", "--no-report"]


def partial_eval_path(key: str, text: str) -> Path:
    """Where an interrupted evaluation of this grid point on this text keeps its window NLLs."""
    return WORK / "partial-evals" / f"{key}.{text}.json"  # atomic writes create the folder


def remove_partial_evals(key: str) -> None:
    for text in EVAL_TEXTS:
        partial_eval_path(key, text).unlink(missing_ok=True)


def load_results(eval_setup: dict | None = None) -> list[dict]:
    rows = [json.loads(p.read_text()) for p in sorted(CACHE.glob("*.json"))]
    for r in rows:  # labels as the current code names them (older rows: their quantization grid)
        r["label"] = Config.of(r["config"]).label
    return [r for r in rows if eval_setup is None or r["eval"] == eval_setup]


def markdown_table(rows: list[dict]) -> str:
    dense = next((r for r in rows if r["config"]["method"] == "dense"), None)
    head = ("| configuration | WikiText-2 ppl | vs dense | out-of-domain ppl | active MLP weights/token | "
            "stored MLP MB | MLP MB read/token | largest cluster | MLP output error | expand s |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    order = {"dense": 0, "magnitude": 1, "wanda": 2, "sparsegpt": 3, "se": 4}
    spars = {s: i for i, s in enumerate(("0", "0.5", "0.7", "0.9", "2:4"))}

    def sort_key(r):
        c = r["config"]
        return spars.get(c["sparsity"], 9), order[c["method"]], c["experts"], c.get("value_dtype", "fp16"), r["label"]

    for r in sorted(rows, key=sort_key):
        ppl = r["wikitext2"]["perplexity"]
        rel = f"{ppl / dense['wikitext2']['perplexity']:.2f}x" if dense else "-"
        lines.append(f"| {r['label']} | {ppl:.2f} | {rel} | {r['pydocs']['perplexity']:.2f} | "
                     f"{r['active_weights_per_token'] / 1e6:.2f} M ({r['active_fraction']:.0%}) | "
                     f"{r['stored_mlp_bytes'] / 1e6:.1f} | {read_bytes(r) / 1e6:.1f} | {largest_cluster(r)} | {output_error(r)} | {expand_time(r)} |")
    return "\n".join(lines)


def read_bytes(row: dict) -> float:
    """MLP bytes a token reads (its experts' values, index and scales, plus the routers); rows cached
    before this was recorded get it from the stored bytes (each expert holds 1/K of them)."""
    if "read_mlp_bytes_per_token" in row:
        return row["read_mlp_bytes_per_token"]
    return row["stored_mlp_bytes"] / row["config"]["experts"] + row.get("router_bytes", 0)


def expand_time(row: dict) -> str:
    """Expansion seconds; a resumed expansion only timed the layers it did in its last run."""
    seconds = row.get("expand_seconds") or 0
    resumed = row.get("resumed_layers") or 0
    return f"{seconds:.0f}" + (f" ({resumed} layers resumed)" if resumed else "")


def output_error(row: dict) -> str:
    """Mean relative squared output error of the pruned linears on their own calibration inputs
    (per expert, on its cluster: ``||X_k (W_k - W)^T||^2 / ||X_k W^T||^2``)."""
    err = row.get("reconstruction_error_mean")
    return "-" if err is None else f"{err:.1%}"


def largest_cluster(row: dict) -> str:
    """Mean share of a linear group's tokens in its largest cluster (cluster balance; 1/K is even)."""
    share = (row.get("router") or {}).get("largest_cluster_share_mean")
    return "-" if share is None else f"{share:.0%}"


def plots(rows: list[dict], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    main = [r for r in rows if r["label"].count("(") == 0 and r["config"].get("value_dtype", "fp16") == "fp16"]
    dense = next((r for r in main if r["config"]["method"] == "dense"), None)
    series: dict[str, list[dict]] = {}
    for r in main:
        c = r["config"]
        if c["method"] == "dense":
            continue
        series.setdefault(f"se K={c['experts']}" if c["method"] == "se" else c["method"], []).append(r)
    xs = {"0.5": 0.5, "0.7": 0.7, "0.9": 0.9}
    paths = []
    fig, (ax, ax24) = plt.subplots(1, 2, figsize=(11, 4.5), gridspec_kw={"width_ratios": [3, 1]})
    for name, items in sorted(series.items()):
        pts = sorted((xs[r["config"]["sparsity"]], r["wikitext2"]["perplexity"]) for r in items
                     if r["config"]["sparsity"] in xs)
        if pts:
            line, = ax.plot(*zip(*pts, strict=True), marker="o", label=name)
            for r in items:
                if r["config"]["sparsity"] == "2:4":
                    ax24.scatter([name], [r["wikitext2"]["perplexity"]], color=line.get_color())
    for a in (ax, ax24):
        a.set_yscale("log")
        if dense:
            a.axhline(dense["wikitext2"]["perplexity"], color="k", ls="--", lw=1, label="dense")
    ax.set_xlabel("MLP sparsity")
    ax.set_ylabel("WikiText-2 perplexity (log)")
    ax.set_title("Perplexity vs sparsity (SmolLM2-135M)")
    ax.legend(fontsize=8)
    ax24.set_title("2:4")
    ax24.tick_params(axis="x", rotation=60, labelsize=7)
    fig.tight_layout()
    paths.append(out_dir / "quality_ppl_vs_sparsity.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, items in sorted(series.items()):
        pts = sorted((r["stored_mlp_bytes"] / 1e6, r["wikitext2"]["perplexity"], r["config"]["sparsity"]) for r in items)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        for x, y, s in pts:
            ax.annotate(s, (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")
    if dense:
        ax.scatter([dense["stored_mlp_bytes"] / 1e6], [dense["wikitext2"]["perplexity"]], color="k", marker="*",
                   s=120, label="dense (fp16)", zorder=5)
    ax.set_xscale("log")
    ax.set_yscale("log")
    paths.append(_save_ppl_plot(fig, ax, "stored MLP bytes, MB (packed experts, fp16 values)",
                                "The memory price of experts", out_dir / "quality_ppl_vs_bytes.png"))

    by_sparsity: dict[str, list[tuple[int, float]]] = {}
    for r in main:  # SparseGPT is Sparse Expansion with one expert
        c = r["config"]
        if c["method"] in ("se", "sparsegpt"):
            by_sparsity.setdefault(c["sparsity"], []).append((c["experts"], r["wikitext2"]["perplexity"]))
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for sparsity, pts in sorted(by_sparsity.items()):
        if len(pts) > 1:
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"sparsity {sparsity}")
    if dense:
        ax.axhline(dense["wikitext2"]["perplexity"], color="k", ls="--", lw=1, label="dense")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks([1, 2, 4, 8, 16], ["1 (SparseGPT)", "2", "4", "8", "16"])
    paths.append(_save_ppl_plot(fig, ax, "experts K per linear", "More experts at the same sparsity",
                                out_dir / "quality_ppl_vs_experts.png"))
    return paths


def pareto_plot(rows: list[dict], path: Path) -> Path | None:
    """Perplexity against stored MLP bytes and against MLP bytes read per token, every method and
    value precision at 50% and 70% sparsity and the dense models: the trade-off a user picks from."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [r for r in rows if r["label"].count("(") == 0 or r["config"]["sparsity"] == "0"]
    points = [r for r in points if r["config"]["sparsity"] in ("0", "0.5", "0.7")
              and r["config"]["method"] in ("dense", "sparsegpt", "se", "magnitude")
              and (r["config"]["method"] != "magnitude" or r["config"]["sparsity"] == "0")]
    if not points:
        return None
    markers = {"fp16": "o", "int8": "s", "int4": "^", "int4 RTN": "v"}
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    families: dict[str, str] = {}
    for r in sorted(points, key=lambda r: r["label"]):
        c = r["config"]
        family = ("dense" if c["sparsity"] == "0" or c["method"] == "dense"
                  else f"se K={c['experts']} @ {c['sparsity']}" if c["method"] == "se" else f"sparsegpt @ {c['sparsity']}")
        precision = Config.of(c).precision.replace(f" G{c.get('group_size', 0)}", "")
        symmetric = precision.endswith(" symmetric grid")  # rows of the older int8/int4 grid
        precision = precision.removesuffix(" symmetric grid")
        text = (precision if c["method"] != "magnitude" else f"{precision} RTN") + (" (sym.)" if symmetric else "")
        color = families.setdefault(family, plt.get_cmap("tab20")(len(families) % 20))
        for ax, x in zip(axes, (r["stored_mlp_bytes"], read_bytes(r)), strict=True):
            ax.scatter([x / 1e6], [r["wikitext2"]["perplexity"]], color=color, marker=markers.get(precision, "x"),
                       s=45, edgecolors="k", linewidths=0.4, alpha=0.5 if symmetric else 1.0)
            ax.annotate(text, (x / 1e6, r["wikitext2"]["perplexity"]), fontsize=6, xytext=(3, 2),
                        textcoords="offset points")
    for ax, xlabel in zip(axes, ("stored MLP bytes, MB", "MLP bytes read per token, MB"), strict=True):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.grid(True, which="both", lw=0.3, alpha=0.5)
    axes[0].set_ylabel("WikiText-2 perplexity, all windows (log)")
    handles = [plt.Line2D([], [], color=col, marker="o", ls="", label=f) for f, col in families.items()]
    handles += [plt.Line2D([], [], color="grey", marker=m, ls="", label=p) for p, m in markers.items()]
    axes[1].legend(handles=handles, fontsize=7, loc="upper right")
    fig.suptitle("Quality against memory and bytes read (SmolLM2-135M MLPs; marker: value precision; "
                 "faded, sym.: the older symmetric int grid)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _save_ppl_plot(fig, ax, xlabel: str, title: str, path: Path) -> Path:
    """Label a perplexity plot the way all of them are labelled, write it, free it."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel("WikiText-2 perplexity (log)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def eval_setup_for(model: str, wikitext2_windows: int, pydocs_windows: int) -> dict:
    return {"model": model, "wikitext2_windows": wikitext2_windows, "pydocs_windows": pydocs_windows,
            "seqlen": 512, "calibration": "wiki"}


def dense_ppl(rows: list[dict]) -> float | None:
    return next((r["wikitext2"]["perplexity"] for r in rows if r["config"]["method"] == "dense"), None)


def write_report(model: str, subset: tuple[int, int]) -> None:
    """quality.json / quality.md: the grid on the window subset, the all-windows table, the claim."""
    grid_rows = load_results(eval_setup_for(model, *subset))
    full_rows = load_results(eval_setup_for(model, 0, subset[1]))
    if not grid_rows and not full_rows:
        print("no cached results for this evaluation setting")
        return
    claims = {"subset": claim_check(grid_rows, dense_ppl(grid_rows)),
              "all_windows": claim_check(full_rows, dense_ppl(full_rows))}
    summary = {"subset": {"eval": eval_setup_for(model, *subset), "results": grid_rows},
               "all_windows": {"eval": eval_setup_for(model, 0, subset[1]), "results": full_rows}, "claim": claims}
    atomic_write_text(RESULTS / "quality.json", json.dumps(summary, indent=1))
    parts = [f"### Grid: first {subset[0]} WikiText-2 windows, {subset[1]} out-of-domain windows", "",
             markdown_table(grid_rows) if grid_rows else "(none yet)", "",
             "### All WikiText-2 windows", "", markdown_table(full_rows) if full_rows else "(none yet)", "",
             "### The paper's claim (all windows)", "", claim_table(claims["all_windows"]), "",
             f"### The paper's claim (first {subset[0]} windows)", "", claim_table(claims["subset"])]
    text = "\n".join(parts) + "\n"
    atomic_write_text(RESULTS / "quality.md", text)
    print(text)
    for p in plots(grid_rows, Path("docs")):
        print(f"wrote {p}")
    if full_rows and (p := pareto_plot(full_rows, Path("docs") / "quality_pareto.png")):
        print(f"wrote {p}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--grid", action="append", choices=tuple(GRIDS), default=None)
    parser.add_argument("--only", default=None, help="run only configurations whose label contains this")
    parser.add_argument("--eval-windows", type=int, default=SUBSET_WINDOWS, help="WikiText-2 windows (0: all)")
    parser.add_argument("--ood-windows", type=int, default=16, help="out-of-domain windows (0: all)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--report", action="store_true", help="only rebuild table, JSON and plots")
    parser.add_argument("--from-checkpoint", type=Path, action="append", default=[],
                        help="evaluate an existing se-export expand checkpoint as its grid point")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--jobs", type=int, default=1,
                        help="run the grid in this many worker processes (threads split between them)")
    parser.add_argument("--no-report", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.jobs > 1:
        if args.report or args.from_checkpoint:
            parser.error("--jobs runs grid points; it does not combine with --report or --from-checkpoint")
        threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
        workers = [subprocess.Popen(worker_command(sys.argv[1:], threads)) for _ in range(args.jobs)]
        failed = sum(1 for w in workers if w.wait() != 0)
        write_report(args.model, (SUBSET_WINDOWS, args.ood_windows))
        if failed:
            sys.exit(f"{failed} of {args.jobs} workers failed (see their output above); finished grid points are cached")
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    eval_setup = eval_setup_for(args.model, args.eval_windows, args.ood_windows)
    for ckpt in args.from_checkpoint:
        cfg, _ = config_of_checkpoint(ckpt)
        key = cache_key(cfg, eval_setup)
        if not (CACHE / f"{key}.json").exists():
            print(f"{cfg.label} <- {ckpt}", flush=True)
            report = run_config(cfg, args, eval_setup, key, checkpoint=ckpt)
            atomic_write_text(CACHE / f"{key}.json", json.dumps(report, indent=1))
            remove_partial_evals(key)
            print(f"    wikitext2 ppl {report['wikitext2']['perplexity']:.2f}, pydocs {report['pydocs']['perplexity']:.2f}")
    if not args.report and not args.from_checkpoint:
        grid = []
        for name in args.grid or ["main"]:
            grid += GRIDS[name]()
        grid = [c for c in grid if args.only is None or args.only in c.label]
        CACHE.mkdir(parents=True, exist_ok=True)
        for i, cfg in enumerate(grid):
            key = cache_key(cfg, eval_setup)
            path = CACHE / f"{key}.json"
            if path.exists():
                continue
            with config_lock(key) as mine:
                if not mine or path.exists():  # another worker runs it, or finished it meanwhile
                    continue
                kept = checkpoint_dir(cfg, args.model)
                print(f"[{i + 1}/{len(grid)}] {cfg.label}" + (f" <- {kept}" if is_checkpoint(kept) else ""), flush=True)
                report = run_config(cfg, args, eval_setup, key, checkpoint=kept if is_checkpoint(kept) else None)
                atomic_write_text(path, json.dumps(report, indent=1))
                remove_partial_evals(key)
                print(f"    {cfg.label}: wikitext2 ppl {report['wikitext2']['perplexity']:.2f}, "
                      f"pydocs {report['pydocs']['perplexity']:.2f}, {report['seconds']:.0f}s", flush=True)
    if not args.no_report:
        write_report(args.model, (SUBSET_WINDOWS, args.ood_windows))


if __name__ == "__main__":
    main()
