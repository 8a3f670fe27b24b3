"""Pruning experiment (issue: Wasserstein neurons): does sparsifying the top-WD neurons hurt
more than sparsifying as many neurons chosen otherwise?

Per layer, the top ``--top`` neurons of the analysed MLP linear (gate for Llama) are selected
by: highest WD, random (``--seeds``), lowest weight-row norm, highest output std. Their weight
rows are pruned to ``--sparsity`` by magnitude (``zero`` removes them), and WikiText-2 test
perplexity is measured; the weights are restored between runs.

    .venv/bin/python bench/wasserstein.py --eval-windows 32
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from se_export.adapters import adapter_for, decoder_layers
from se_export.data import calibration_windows, eval_windows, load_text, tokenize
from se_export.eval import plots
from se_export.eval.analyze import analyze_model
from se_export.eval.evaluate import perplexity
from se_export.models import load_model


def prune_rows(weight: torch.Tensor, rows: list[int], sparsity: str) -> None:
    """In place: rows zeroed, or pruned to ``sparsity`` by magnitude within each row."""
    idx = torch.tensor(rows, dtype=torch.int64)
    if sparsity == "zero":
        weight[idx] = 0
        return
    sub = weight[idx]
    count = round(float(sparsity) * sub.shape[1])
    drop = torch.topk(sub.abs(), count, dim=1, largest=False).indices
    weight[idx] = sub.scatter(1, drop, 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--text", default="wiki", help="analysis text (calibration side)")
    parser.add_argument("--eval-text", default="wikitext2")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--top", type=float, default=0.03)
    parser.add_argument("--sparsity", default="0.95", help="per-row sparsity of selected neurons, or 'zero'")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/results/wasserstein_pruning.json"))
    parser.add_argument("--plot", type=Path, default=Path("docs/wasserstein_pruning.png"))
    args = parser.parse_args()

    start = time.perf_counter()
    loaded = load_model(args.model)
    model = loaded.model
    analysis_windows = calibration_windows(tokenize(loaded.tokenizer, load_text(args.text)),
                                           args.tokens // args.seqlen, args.seqlen, 0)
    results, _ = analyze_model(model, analysis_windows, top=args.top, pairs=16)
    windows = eval_windows(tokenize(loaded.tokenizer, load_text(args.eval_text)), args.seqlen, args.eval_windows)

    adapter = adapter_for(model.config)
    linears = [layer.get_submodule(adapter.groups[0][0]) for layer in decoder_layers(model, adapter)]
    neurons = results[0].wd.numel()
    count = max(1, round(args.top * neurons))
    selections: dict[str, list[list[int]]] = {"wasserstein (top WD)": [r.top for r in results]}
    for seed in range(args.seeds):
        gen = torch.Generator().manual_seed(seed)
        selections[f"random seed {seed}"] = [torch.randperm(neurons, generator=gen)[:count].tolist() for _ in results]
    selections["lowest weight norm"] = [
        torch.topk(lin.weight.detach().norm(dim=1 if not adapter.conv1d else 0), count, largest=False).indices.tolist()
        for lin in linears]
    selections["highest output std"] = [torch.topk(r.std, count).indices.tolist() for r in results]

    dense = perplexity(model, windows)["perplexity"]
    rows = {"dense": dense}
    for name, chosen in selections.items():
        saved = [lin.weight.detach().clone() for lin in linears]
        with torch.no_grad():
            for lin, rows_ in zip(linears, chosen, strict=True):
                prune_rows(lin.weight.data if not adapter.conv1d else lin.weight.data.t(), rows_, args.sparsity)
        rows[name] = perplexity(model, windows)["perplexity"]
        with torch.no_grad():
            for lin, w in zip(linears, saved, strict=True):
                lin.weight.copy_(w)
        print(f"{name:24s} ppl {rows[name]:.3f}", flush=True)

    random_ppl = [v for k, v in rows.items() if k.startswith("random")]
    report = {"model": args.model, "linear": adapter.groups[0][0], "top": args.top, "neurons_per_layer": count,
              "sparsity": args.sparsity, "eval_windows": int(windows.shape[0]), "seqlen": args.seqlen,
              "analysis_tokens": int(analysis_windows.numel()), "perplexity": rows,
              "random_mean": sum(random_ppl) / len(random_ppl),
              "seconds": round(time.perf_counter() - start, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    plots.bars({k: v for k, v in rows.items() if k != "dense"}, "WikiText-2 perplexity",
               f"{count} neurons/layer of {adapter.groups[0][0]} pruned to {args.sparsity}", args.plot,
               baseline=dense, logy=True)
    print("\n| selection | perplexity | vs dense |\n|---|---|---|")
    for name, ppl in rows.items():
        print(f"| {name} | {ppl:.3f} | {ppl / dense:.3f}x |")


if __name__ == "__main__":
    main()
