"""``se-export analyze``: Wasserstein neurons of every MLP, layer by layer, with a report.

The analysed neurons are the outputs of the first linear of each MLP (gate for gated MLPs,
``dense_h_to_4h``/``fc1``/``c_fc`` otherwise): their pre-activations ``w.x + b``. Layers are run
one at a time on captured hidden states, so memory holds one layer's activations and one
``[tokens, neurons]`` buffer, whatever the depth of the model.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..adapters import adapter_for, decoder_layers, linear_weight
from ..atomic import atomic_path, atomic_write_text
from ..method.capture import capture_decoder_inputs, capture_input, layer_output
from ..method.router import fit_router
from ..method.sparsegpt import ClusterHessians, sparsegpt_prune
from ..method.sparsity import parse_sparsity
from ..modeling.modules import RoutedSparseLinear, decoded_expert_cache, default_cache_bytes
from ..progress import progress_bar
from .wasserstein import NeuronStats, mapping_difficulty, wasserstein_between

QUANTILES = (0.0, 0.5, 0.9, 0.97, 0.99, 1.0)


@dataclass
class LayerNeurons:
    layer: int
    linear: str
    wd: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    md: torch.Tensor
    top: list[int] = field(default_factory=list)

    def summary(self) -> dict:
        q = torch.quantile(self.wd.double(), torch.tensor(QUANTILES, dtype=torch.float64)).tolist()
        return {"layer": self.layer, "linear": self.linear, "neurons": int(self.wd.numel()),
                "wd_mean": float(self.wd.mean()), **{f"wd_q{int(p * 100)}": v for p, v in zip(QUANTILES, q, strict=True)},
                "md_mean": float(self.md.mean()),
                "wd_md_spearman": _spearman(self.wd, self.md), "top_neurons": self.top}


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra = torch.argsort(torch.argsort(a)).double()
    rb = torch.argsort(torch.argsort(b)).double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp(min=1e-30))


def neuron_outputs(module: nn.Module, x: torch.Tensor, adapter) -> torch.Tensor:
    """Pre-activations ``[tokens, neurons]`` of a (dense or expanded) linear for inputs ``x``."""
    if isinstance(module, RoutedSparseLinear):
        return module(x)
    weight, bias = linear_weight(module, adapter)
    y = x @ weight.float().t()
    return y if bias is None else y + bias.float()


@torch.no_grad()
def analyze_model(model: nn.Module, windows: torch.Tensor, *, top: float = 0.03, batch_size: int = 8,
                  pairs: int = 2048, seed: int = 0, show_progress: bool = True,
                  keep_inputs: set[int] | str | None = None) -> tuple[list[LayerNeurons], dict[int, torch.Tensor]]:
    """Per-layer neuron statistics; also returns the linear inputs of layers in ``keep_inputs``
    (``"max_wd"``: of the layer holding the highest-WD neuron, without a second pass)."""
    model.eval()
    adapter = adapter_for(model.config)
    layers = decoder_layers(model, adapter)
    target_name = adapter.groups[0][0]
    states, kwargs_list = capture_decoder_inputs(model, layers, windows, batch_size)
    tokens = windows.numel()
    results: list[LayerNeurons] = []
    kept: dict[int, torch.Tensor] = {}
    with progress_bar(show_progress) as bar, decoded_expert_cache(default_cache_bytes(2.0)):
        task = bar.add_task("wasserstein", total=len(layers))
        for index, layer in enumerate(layers):
            target = layer.get_submodule(target_name)
            x = torch.cat([capture_input(target, lambda h=h, kw=kw, layer=layer: layer(h, **kw))
                           for h, kw in zip(states, kwargs_list, strict=True)])
            y = neuron_outputs(target, x, adapter)
            stats = NeuronStats(y.shape[1], tokens)
            for chunk in y.split(4096):
                stats.update(chunk)
            out = stats.finalize()
            md = mapping_difficulty(x, y, pairs=pairs, seed=seed + index).float()
            count = max(1, round(top * y.shape[1]))
            top_idx = torch.topk(out["wd"], count).indices.tolist()
            results.append(LayerNeurons(index, f"{adapter.layers}.{index}.{target_name}", out["wd"], out["mean"],
                                        out["std"], md, top_idx))
            if keep_inputs == "max_wd":
                if not kept or float(out["wd"].max()) > max(float(results[i].wd.max()) for i in kept):
                    kept = {index: x}
            elif keep_inputs and index in keep_inputs:
                kept[index] = x
            del x, y, stats
            if index + 1 < len(layers):
                states = [layer_output(layer(h, **kw)) for h, kw in zip(states, kwargs_list, strict=True)]
            bar.update(task, advance=1, description=f"wasserstein layer {index}")
    return results, kept


def write_arrays(results: list[LayerNeurons], out: Path) -> None:
    tensors = {}
    for r in results:
        for name in ("wd", "mean", "std", "md"):
            tensors[f"layer.{r.layer}.{name}"] = getattr(r, name).contiguous()
    with atomic_path(out / "neurons.safetensors") as tmp:
        save_file(tensors, str(tmp))


def write_summary(results: list[LayerNeurons], out: Path, meta: dict) -> list[dict]:
    rows = [r.summary() for r in results]
    atomic_write_text(out / "summary.json", json.dumps({**meta, "layers": rows}, indent=1))
    buf = io.StringIO()
    fields = [k for k in rows[0] if k != "top_neurons"] + ["top_neurons"]
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    for row in rows:
        writer.writerow({**row, "top_neurons": " ".join(map(str, row["top_neurons"]))})
    atomic_write_text(out / "summary.csv", buf.getvalue())
    return rows


def neuron_variants(x: torch.Tensor, weight_row: torch.Tensor, bias: float, dense: torch.Tensor, *,
                    experts: tuple[int, ...] = (1, 2, 4, 8, 16), sparsity: str = "0.9", pca_factor: int = 32,
                    seed: int = 0, min_cluster_tokens: int = 64) -> dict[str, tuple[torch.Tensor, float]]:
    """One neuron's outputs when its weights are pruned by SparseGPT (K=1) and by Sparse
    Expansion with K experts, each with its W1 distance to the dense outputs."""
    spec = parse_sparsity(sparsity)
    out: dict[str, tuple[torch.Tensor, float]] = {}
    for k in experts:
        if k == 1:
            labels = torch.zeros(x.shape[0], dtype=torch.int64)
        else:
            _, labels, _ = fit_router(x, k, pca_factor=pca_factor, seed=seed, min_cluster_tokens=min_cluster_tokens)
        k_eff = int(labels.max()) + 1
        hessians = ClusterHessians(x, labels, k_eff).hessians(list(range(k_eff)))
        pruned = sparsegpt_prune(weight_row.unsqueeze(0), hessians, spec).weight[:, 0]  # [K, in]
        y = (x * pruned[labels]).sum(1) + bias
        name = f"SparseGPT {spec}" if k == 1 else f"Sparse Expansion K={k}"
        out[name] = (y.float(), wasserstein_between(y, dense))
    return out


def write_report(out: Path, rows: list[dict], meta: dict, neuron: dict | None) -> None:
    lines = [f"# Wasserstein neurons of {meta['model']}", "",
             f"{meta['tokens']} tokens of `{meta['text']}` (windows of {meta['seqlen']}, seed {meta['seed']}); "
             f"neurons = pre-activations of `{rows[0]['linear'].split('.')[-1]}` in every layer. "
             "WD = Wasserstein-1 distance of the standardized output distribution to N(0,1) (exact, "
             "analytic quantiles); MD = mapping difficulty (mean output gap between each of "
             f"{meta['pairs']} tokens and its nearest input neighbour, over the gap for random pairs). Top {meta['top']:.0%} by WD are the Wasserstein neurons.", "",
             "![WD histograms](wd_histograms.png)", "", "![WD by layer](wd_heatmap.png)", "",
             "| layer | mean WD | median | q97 | max | mean MD | Spearman(WD, MD) | top neurons |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        top = ", ".join(map(str, r["top_neurons"][:6])) + (" ..." if len(r["top_neurons"]) > 6 else "")
        lines.append(f"| {r['layer']} | {r['wd_mean']:.4f} | {r['wd_q50']:.4f} | {r['wd_q97']:.4f} | "
                     f"{r['wd_q100']:.4f} | {r['md_mean']:.3f} | {r['wd_md_spearman']:.3f} | {top} |")
    if neuron:
        lines += ["", f"## Neuron {neuron['layer']}:{neuron['index']} (WD {neuron['wd']:.4f})", "",
                  f"Its weights pruned to {neuron['sparsity']} sparsity by SparseGPT and by Sparse Expansion "
                  "(each expert pruned on its own cluster); W1 distance of each output distribution to the dense one:", "",
                  "| method | W1 to dense |", "|---|---|"]
        lines += [f"| {name} | {dist:.5f} |" for name, dist in neuron["distances"].items()]
        lines += ["", f"![neuron]({neuron['plot']})"]
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
