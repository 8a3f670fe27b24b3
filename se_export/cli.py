"""The ``se-export`` command line (typer). Every user error ends in one line on stderr, exit 2."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from .errors import SEError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Sparse Expansion of Hugging Face causal LMs: expand, evaluate, export.")
err = Console(stderr=True)


def _parse_layers(text: str | None) -> list[int] | None:
    """``"0-3,7"`` -> [0, 1, 2, 3, 7]."""
    if not text:
        return None
    out: list[int] = []
    try:
        for part in text.split(","):
            a, _, b = part.partition("-")
            out.extend(range(int(a), int(b) + 1) if b else [int(a)])
    except ValueError:
        raise SEError(f"bad --layers '{text}': use indices and ranges like 0-3,7") from None
    return sorted(set(out))


@app.command()
def expand(
    model: Annotated[str, typer.Argument(help="HF hub id, local HF folder, .gguf file, or 'default'")],
    out: Annotated[Path, typer.Option("--out", help="checkpoint folder to write")],
    experts: Annotated[int | None, typer.Option("--experts", "-k", help="experts per linear (se: 16)")] = None,
    sparsity: Annotated[str, typer.Option(help="fraction of zeros per expert (0.5, 70%) or N:M (2:4)")] = "0.5",
    method: Annotated[str, typer.Option(help="se | sparsegpt | wanda | magnitude")] = "se",
    calib: Annotated[str, typer.Option(help="'wiki' (Wikipedia summaries) or a text file (magnitude reads none)")] = "wiki",
    calib_samples: Annotated[int, typer.Option(help="calibration windows")] = 128,
    seqlen: Annotated[int, typer.Option(help="tokens per calibration window")] = 512,
    pca_factor: Annotated[int, typer.Option(help="router PCA keeps in_features // F components (0: no PCA)")] = 32,
    seed: Annotated[int, typer.Option(help="seed of windows and k-means")] = 0,
    true_sequential: Annotated[bool, typer.Option(help="calibrate down-proj on the expanded gate/up outputs")] = True,
    min_cluster_tokens: Annotated[int, typer.Option(help="smaller clusters are merged away")] = 128,
    value_dtype: Annotated[str, typer.Option(help="stored values: fp16 | bf16 | fp32, or int8 | int4 (quantized "
                                                  "jointly with SparseGPT; by rounding for wanda/magnitude)")] = "fp16",
    group_size: Annotated[int | None, typer.Option(help="int8/int4: input columns per scale (default: 128 for "
                                                     "int8, 32 for int4)")] = None,
    quant_method: Annotated[str, typer.Option(help="int8/int4 with sparsegpt/se: joint (inside the SparseGPT "
                                                   "sweep) | rtn (rounded after it)")] = "joint",
    fmt: Annotated[str, typer.Option("--format", help="auto | bitmap | csr16")] = "auto",
    layers: Annotated[str | None, typer.Option(help="expand only these decoder layers, e.g. 0-3,7")] = None,
    allocate: Annotated[str, typer.Option(help="uniform | wasserstein: per-layer K from the layers' WD, same total")] = "uniform",
    layer_sparsity: Annotated[str, typer.Option(help="uniform | owl: per-layer sparsity from the layers' outlier "
                                                     "ratios (OWL), same total kept weights")] = "uniform",
    owl_lambda: Annotated[float, typer.Option(help="owl: per-layer densities spread over 2 x lambda")] = 0.08,
    owl_threshold: Annotated[float, typer.Option(help="owl: outlier = score above this x the layer mean")] = 5.0,
    hessian_prior: Annotated[float, typer.Option(help="se: shrink each expert's Hessian toward the layer's with "
                                                      "this x in_features tokens of prior (0: off)")] = 0.0,
    max_memory_gb: Annotated[float | None, typer.Option(help="refuse a plan above this many GiB of host memory "
                                                             "(default: the memory available now)")] = None,
    plan_only: Annotated[bool, typer.Option(help="print the memory plan and exit")] = False,
    resume: Annotated[bool, typer.Option(help="continue an interrupted expansion in --out")] = False,
    overwrite: Annotated[bool, typer.Option(help="replace whatever --out holds")] = False,
    quiet: Annotated[bool, typer.Option(help="no progress bars")] = False,
) -> None:
    """Expand every MLP linear into K routed sparse experts and save a compact checkpoint."""
    from .api import expand as expand_model

    t0 = time.perf_counter()
    expansion = expand_model(model, out, method=method, experts=experts, sparsity=sparsity, calib=calib,
                             calib_samples=calib_samples, seqlen=seqlen, pca_factor=pca_factor, seed=seed,
                             true_sequential=true_sequential, min_cluster_tokens=min_cluster_tokens,
                             value_dtype=value_dtype, group_size=group_size, quant_method=quant_method, format=fmt, layers=_parse_layers(layers),
                             layer_sparsity=layer_sparsity, owl_lambda=owl_lambda, owl_threshold=owl_threshold,
                             hessian_prior=hessian_prior, max_memory_gb=max_memory_gb, plan_only=plan_only,
                             allocate=allocate,
                             resume=resume, overwrite=overwrite, show_progress=not quiet, log=err.print)
    if expansion is None:  # --plan-only
        return
    result, stats = expansion.result, expansion.info["stats"]
    err.print(f"[green]expanded[/] {len(result.layers)} layers in {time.perf_counter() - t0:.1f}s "
              f"(peak RSS {result.peak_rss_mb:.0f} MB) -> {out}")
    err.print(f"MLP bytes: experts {stats['expert_bytes'] / 1e6:.1f} MB in memory, "
              f"{stats['expert_bytes_stored'] / 1e6:.1f} MB stored, vs dense {stats['dense_mlp_bytes'] / 1e6:.1f} MB "
              f"(ratio {stats['expert_bytes_stored'] / max(1, stats['dense_mlp_bytes']):.2f}); "
              f"report: {out / 'expand_report.json'}")


@app.command("eval")
def evaluate(
    model: Annotated[str, typer.Argument(help="checkpoint folder, HF folder, .gguf, hub id or 'default'")],
    text: Annotated[str, typer.Option(help="'wikitext2', 'wiki' or a text file")] = "wikitext2",
    seqlen: Annotated[int, typer.Option(help="tokens per window")] = 512,
    max_windows: Annotated[int | None, typer.Option(help="evaluate only the first N windows")] = None,
    allow_calibration_text: Annotated[bool, typer.Option(help="allow evaluating on the calibration text")] = False,
    cache_gb: Annotated[float | None, typer.Option(help="GB of decoded experts kept between windows (default: none "
                                                        "where the C++ kernels are built, else up to 8 within half "
                                                        "the free memory)")] = None,
    batch: Annotated[int, typer.Option(help="windows per forward pass")] = 4,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object (with every window's NLL)")] = False,
    resume: Annotated[Path | None, typer.Option(help="keep the window NLLs in this file after every batch; a re-run "
                                                     "with the same model, text and settings continues from it")] = None,
    quiet: Annotated[bool, typer.Option(help="no progress")] = False,
) -> None:
    """Perplexity on non-overlapping windows (the standard protocol)."""
    from .api import evaluate as evaluate_model

    result = evaluate_model(model, text, seqlen=seqlen, max_windows=max_windows, batch=batch, cache_gb=cache_gb,
                            resume=resume, allow_calibration_text=allow_calibration_text,
                            show_progress=not (as_json or quiet))
    if as_json:
        print(json.dumps(result))
    else:
        err.print(f"perplexity [bold]{result['perplexity']:.3f}[/] on {result['windows']} x {seqlen} tokens "
                  f"of {result['text']} ({result['seconds']:.1f}s)")


@app.command()
def analyze(
    model: Annotated[str, typer.Argument(help="checkpoint folder, HF folder, .gguf, hub id or 'default'")],
    out: Annotated[Path, typer.Option("--out", help="report folder")],
    text: Annotated[str, typer.Option(help="'wiki', 'wikitext2' or a text file")] = "wiki",
    tokens: Annotated[int, typer.Option(help="tokens per neuron distribution")] = 16384,
    seqlen: Annotated[int, typer.Option(help="tokens per window")] = 512,
    top: Annotated[float, typer.Option(help="fraction of neurons per layer called Wasserstein neurons")] = 0.03,
    neuron: Annotated[str | None, typer.Option(help="LAYER:INDEX to plot (default: the highest WD)")] = None,
    plot_sparsity: Annotated[str, typer.Option(help="sparsity of the neuron comparison plot")] = "0.9",
    pairs: Annotated[int, typer.Option(help="anchor tokens for the mapping difficulty")] = 2048,
    seed: Annotated[int, typer.Option(help="seed of windows and pairs")] = 0,
    quiet: Annotated[bool, typer.Option(help="no progress bars")] = False,
) -> None:
    """Wasserstein neurons: per-neuron WD to N(0,1), mapping difficulty, plots and a report."""
    from .data import calibration_windows, load_text, tokenize
    from .eval import plots
    from .eval.analyze import (
        analyze_model,
        neuron_outputs,
        neuron_variants,
        write_arrays,
        write_report,
        write_summary,
    )
    from .models import load_model

    if not 0 < top < 1:
        raise SEError(f"--top must be a fraction in (0, 1), e.g. 0.03 (got {top})")
    if tokens < seqlen:
        raise SEError(f"--tokens {tokens} is smaller than one window (--seqlen {seqlen})")
    body = load_text(text)
    loaded = load_model(model)
    windows = calibration_windows(tokenize(loaded.tokenizer, body), tokens // seqlen, seqlen, seed)
    chosen = None
    if neuron:
        try:
            chosen = tuple(int(v) for v in neuron.split(":"))
            assert len(chosen) == 2
        except (ValueError, AssertionError):
            raise SEError(f"bad --neuron '{neuron}': use LAYER:INDEX, e.g. 12:345") from None
    results, kept = analyze_model(loaded.model, windows, top=top, pairs=pairs, seed=seed,
                                  show_progress=not quiet, keep_inputs={chosen[0]} if chosen else "max_wd")
    if chosen is None:
        best = results[next(iter(kept))]
        chosen = (best.layer, int(best.wd.argmax()))
    layer_idx, index = chosen
    if not (0 <= layer_idx < len(results)) or not (0 <= index < results[layer_idx].wd.numel()):
        raise SEError(f"--neuron {neuron} is out of range: {len(results)} layers of {results[0].wd.numel()} neurons")
    out.mkdir(parents=True, exist_ok=True)
    meta = {"model": model, "text": body.name, "tokens": int(windows.numel()), "seqlen": seqlen, "seed": seed,
            "top": top, "pairs": pairs}
    write_arrays(results, out)
    rows = write_summary(results, out, meta)
    plots.wd_histograms([r.wd for r in results], top, out / "wd_histograms.png")
    plots.wd_heatmap([r.wd for r in results], out / "wd_heatmap.png")

    from .adapters import adapter_for, decoder_layers, linear_weight

    adapter = adapter_for(loaded.model.config)
    target = decoder_layers(loaded.model, adapter)[layer_idx].get_submodule(adapter.groups[0][0])
    x = kept[layer_idx]
    dense = neuron_outputs(target, x, adapter)[:, index]
    from .modeling.modules import RoutedSparseLinear

    neuron_info = None
    if not isinstance(target, RoutedSparseLinear):  # a checkpoint's experts have no single dense row
        weight, bias = linear_weight(target, adapter)
        variants = neuron_variants(x, weight[index].float(), 0.0 if bias is None else float(bias[index]), dense,
                                   sparsity=plot_sparsity, seed=seed)
        plot_name = f"neuron_{layer_idx}_{index}.png"
        plots.neuron_overlay(dense, variants, f"layer {layer_idx} neuron {index}: dense vs {plot_sparsity} sparse",
                             out / plot_name)
        neuron_info = {"layer": layer_idx, "index": index, "wd": float(results[layer_idx].wd[index]),
                       "sparsity": plot_sparsity, "plot": plot_name,
                       "distances": {k: d for k, (_, d) in variants.items()}}
    write_report(out, rows, meta, neuron_info)
    err.print(f"[green]analysed[/] {len(results)} layers -> {out / 'report.md'}")


@app.command("onnx")
def onnx_cmd(
    model: Annotated[str | None, typer.Argument(help="expanded checkpoint, HF folder, .gguf, hub id or 'default'")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="folder to write (model.onnx, se_onnx.json, tokenizer)")] = None,
    model_option: Annotated[str | None, typer.Option("--model", help="the same as the MODEL argument")] = None,
    dtype: Annotated[str, typer.Option(help="fp32 | fp16")] = "fp32",
    opset: Annotated[int, typer.Option(help="default-domain opset (18..23)")] = 18,
    portable: Annotated[bool, typer.Option(help="lower RoutedSparseMatMul to standard ONNX ops")] = False,
    overwrite: Annotated[bool, typer.Option(help="replace an existing --out")] = False,
    quiet: Annotated[bool, typer.Option(help="no progress")] = False,
) -> None:
    """Export a generation-ready ONNX graph (past/present KV cache, dynamic batch/sequence/past)."""
    from .api import export_onnx

    if (model is None) == (model_option is None):
        raise SEError("give the model once: se-export onnx MODEL --out DIR, or se-export onnx --model MODEL --out DIR")
    if out is None:
        raise SEError("--out DIR is missing: the folder to write the export to")
    model = model if model is not None else model_option

    manifest = export_onnx(model, out, dtype=dtype, opset=opset, portable=portable, overwrite=overwrite,
                           show_progress=not quiet)
    err.print(f"[green]exported[/] {out / 'model.onnx'}: {manifest['custom_op_nodes']} RoutedSparseMatMul nodes, "
              f"{manifest['num_layers']} layers, {dtype}, opset {opset} ({manifest['export_seconds']:.0f}s)")


@app.command("validate")
def validate_cmd(
    onnx_dir: Annotated[Path, typer.Argument(help="folder written by se-export onnx")],
    backend: Annotated[str, typer.Option(help="ort | trt")] = "ort",
    provider: Annotated[str, typer.Option(help="ort: ONNX Runtime's execution provider, cpu | cuda "
                                               "(onnxruntime-gpu)")] = "cpu",
    tokens: Annotated[int, typer.Option(help="greedy tokens generated per prompt with the KV cache")] = 32,
    model: Annotated[str | None, typer.Option(help="PyTorch model to compare with (default: the export's source)")] = None,
    ppl_windows: Annotated[int, typer.Option(help="perplexity windows compared (0: skip)")] = 4,
    as_json: Annotated[bool, typer.Option("--json", help="print the JSON report")] = False,
    report_path: Annotated[Path | None, typer.Option("--report", help="also write the JSON report here")] = None,
    engine: Annotated[Path | None, typer.Option(help="trt: engine file (default ONNX_DIR/model.engine)")] = None,
    plugin: Annotated[Path | None, typer.Option(help="trt: libse_trt_plugin.so (default: the built one)")] = None,
    quiet: Annotated[bool, typer.Option(help="no progress")] = False,
) -> None:
    """Compare an exported graph with PyTorch: logits, routing, decode step, generation, perplexity."""
    from .api import validate
    from .atomic import atomic_write_text
    from .eval.validate import format_report, to_json

    report = validate(onnx_dir, backend=backend, tokens=tokens, model=model, ppl_windows=ppl_windows, engine=engine,
                      plugin=plugin, show_progress=not (as_json or quiet), provider=provider)
    if report_path:
        atomic_write_text(report_path, to_json(report))
    if as_json:
        print(to_json(report))
    else:
        err.print(format_report(report), highlight=False)
    if not report.passed:
        raise typer.Exit(1)


@app.command("trt")
def trt_cmd(
    onnx_dir: Annotated[Path, typer.Argument(help="folder written by se-export onnx")],
    out: Annotated[Path | None, typer.Option("--out", help="engine file (default ONNX_DIR/model.engine)")] = None,
    fp16: Annotated[bool, typer.Option(help="fp16 engine (TensorRT 10: kFP16 flag; 11: needs an fp16 export)")] = False,
    plugin: Annotated[Path | None, typer.Option(help="libse_trt_plugin.so (default: build/plugins)")] = None,
    max_batch: Annotated[int, typer.Option(
        help="largest batch of both profiles (validate's batch of 3 fits; larger batches run in slices)")] = 3,
    opt_seq: Annotated[int | None, typer.Option(help="prefill profile: tuned prompt length (default: 128, at most "
                                                     "--max-seq)")] = None,
    max_seq: Annotated[int, typer.Option(help="prefill profile: longest prompt")] = 512,
    opt_past: Annotated[int | None, typer.Option(help="decode profile: tuned cache length (default: 256, at "
                                                      "most --max-past)")] = None,
    max_past: Annotated[int, typer.Option(help="longest KV cache (both profiles)")] = 1024,
    workspace_gb: Annotated[float, typer.Option(help="builder workspace limit, GiB")] = 4.0,
    dry_run: Annotated[bool, typer.Option(help="prepare the graph and print the trtexec line; build nothing")] = False,
) -> None:
    """Build a TensorRT engine (prefill + decode profiles) with the RoutedSparseMatMul plugin."""
    from .backends.trt_build import DEFAULT_ENGINE, ShapeRanges, build_engine

    ranges = ShapeRanges(max_batch=max_batch, opt_seq=opt_seq, max_seq=max_seq, opt_past=opt_past, max_past=max_past)
    engine = out or onnx_dir / DEFAULT_ENGINE
    info = build_engine(onnx_dir, engine, fp16=fp16, plugin=plugin, ranges=ranges, workspace_gb=workspace_gb,
                        dry_run=dry_run, log=lambda msg: err.print(msg, highlight=False, soft_wrap=True))
    if info["engine"]:
        err.print(f"[green]built[/] {engine} (TensorRT {info['tensorrt']}, {info['build_seconds']}s)")


bench_app = typer.Typer(no_args_is_help=True, help="Latency benchmarks.")
app.add_typer(bench_app, name="bench")


@bench_app.command("ort")
def bench_ort_cmd(
    onnx_dirs: Annotated[list[Path], typer.Argument(help="export folders to compare (e.g. dense and expanded)")],
    prompt_len: Annotated[int, typer.Option(help="prefill tokens")] = 128,
    decode_tokens: Annotated[int, typer.Option(help="decode steps timed")] = 32,
    repeats: Annotated[int, typer.Option(help="timed repeats (median reported)")] = 3,
    threads: Annotated[int, typer.Option(help="ONNX Runtime intra-op threads (0: default)")] = 0,
    provider: Annotated[str, typer.Option(help="ONNX Runtime's execution provider: cpu | cuda (onnxruntime-gpu)")] = "cpu",
    interleave: Annotated[int, typer.Option(
        help="time decode only, in this many alternating blocks per export, ratios paired per block "
             "(for machines whose speed drifts; 0: prefill and decode, export after export)")] = 0,
    out: Annotated[Path | None, typer.Option("--json", help="write results here")] = None,
) -> None:
    """Prefill latency and decode tokens/s in ONNX Runtime (CPU, or CUDA), every export in one run."""
    from .eval.bench_ort import ort_loader

    _latency_bench(onnx_dirs, ort_loader(threads, provider), prompt_len, decode_tokens, repeats, interleave, out,
                   threads)


def _latency_bench(targets: list[Path], load, prompt_len: int, decode_tokens: int, repeats: int, interleave: int,
                   out: Path | None, threads: int = 0) -> None:
    """bench ort / bench trt: every target in one run (alternating decode blocks with
    ``interleave``), the table on stdout, the JSON to ``out``."""
    from .atomic import atomic_write_text
    from .eval.bench_ort import bench_interleaved, bench_ort, format_interleaved_table, format_table

    if interleave < 0:
        raise SEError(f"--interleave must be >= 0, got {interleave}")
    if interleave:
        results = bench_interleaved(targets, prompt_len=prompt_len, decode_tokens=decode_tokens, blocks=interleave,
                                    threads=threads, load=load)
        print(format_interleaved_table(results))
    else:
        results = bench_ort(targets, prompt_len=prompt_len, decode_tokens=decode_tokens, repeats=repeats,
                            threads=threads, load=load)
        print(format_table(results))
    if out:
        atomic_write_text(out, json.dumps(results, indent=1))


@bench_app.command("trt")
def bench_trt_cmd(
    engine: Annotated[Path, typer.Argument(help="engine of se-export trt (its ONNX folder is found beside it)")],
    dense_engine: Annotated[Path | None, typer.Option(help="a dense model's engine, timed in the same run")] = None,
    plugin: Annotated[Path | None, typer.Option(help="libse_trt_plugin.so (default: the one the engine was built "
                                                     "with, else build/plugins)")] = None,
    prompt_len: Annotated[int, typer.Option(help="prefill tokens")] = 128,
    decode_tokens: Annotated[int, typer.Option(help="decode steps timed")] = 32,
    repeats: Annotated[int, typer.Option(help="timed repeats (median reported)")] = 3,
    interleave: Annotated[int, typer.Option(
        help="time decode only, in this many alternating blocks per engine, ratios paired per block")] = 0,
    out: Annotated[Path | None, typer.Option("--json", help="write results here")] = None,
) -> None:
    """Prefill latency and decode tokens/s of TensorRT engines (the dense one first when given), with
    the same protocol and JSON as bench ort."""
    from .eval.bench_ort import trt_loader

    engines = ([dense_engine] if dense_engine else []) + [engine]
    _latency_bench(engines, trt_loader(plugin), prompt_len, decode_tokens, repeats, interleave, out)


@app.command("lm-eval-task")
def lm_eval_task_cmd(
    out: Annotated[Path, typer.Argument(help="task folder to write (pass it to lm_eval --include_path)")],
    text: Annotated[str, typer.Option(help="'wikitext2', 'wiki', 'pydocs' or a text file")] = "wikitext2",
    docs: Annotated[int, typer.Option(help="documents in the task")] = 20,
    min_chars: Annotated[int, typer.Option(help="paragraphs are joined into documents of at least this size")] = 2000,
) -> None:
    """A local lm-eval-harness task (rolling log-likelihood of documents of TEXT), no Hub needed."""
    from .eval.lm_eval_task import write_lm_eval_task

    task = write_lm_eval_task(out, text, docs, min_chars)
    print(f"lm-eval task {task['task']}: {task['documents']} documents, {task['characters']} characters, in {out}\n"
          f"run: lm_eval --model hf --model_args pretrained=CKPT,trust_remote_code=True "
          f"--include_path {out} --tasks {task['task']} --device cpu --batch_size 1")


@app.command()
def doctor(
    out: Annotated[Path | None, typer.Option("--json", help="also write the report here")] = None,
) -> None:
    """What this installation can run: packages, plugin libraries, CPU kernel path, GPUs."""
    from .atomic import atomic_write_text
    from .doctor import format_report, report

    rep = report()
    print(format_report(rep))
    if out:
        atomic_write_text(out, json.dumps(rep, indent=1))


def main() -> None:
    try:
        app()
    except SEError as exc:
        err.print(f"[red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
