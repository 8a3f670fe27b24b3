"""Where does Sparse Expansion's perplexity gain come from? Layer by layer, against the dense model.

For each expanded checkpoint, on the same WikiText-2 windows as the dense model:

* **hidden-state drift** after every decoder layer, per token ``||h_t - h_dense_t|| / ||h_dense_t||``
  averaged over tokens (how far the pruned model has wandered from the dense one, errors of all
  earlier layers included), separately for each window's first token (which this model, like
  most, turns into an attention sink with massive activations) and over the whole tensor
  (Frobenius: dominated by those first tokens);
* **injected MLP error** of every layer, per token, on the pruned model's own MLP input ``a_t``:
  ``||mlp(a_t) - mlp_dense(a_t)|| / ||h_t||`` (the whole gated MLP against the dense one on the
  activations it really sees, relative to the residual stream it is added to), averaged over
  tokens; and the plain relative MLP error ``||mlp(a) - mlp_dense(a)|| / ||mlp_dense(a)||``;
* **coherence** of that error over each window's tokens after the first:
  ``||mean_t delta_t|| / mean_t ||delta_t||`` (1: every token gets the same error, a shift that
  adds up layer after layer; ~1/sqrt(tokens): unrelated errors);
* the windows' perplexity, and optionally under interventions (dense MLPs for the first token,
  dense MLPs in chosen layers, or every MLP's window-mean error removed).

The quality grid found the per-linear calibration error of SE K=16 equal to SparseGPT's at 90%
while perplexity halves; these two curves say whether the gain is local (a better MLP on its
real inputs) or compounding (less drift passed on).

    .venv/bin/python bench/drift.py --checkpoint "SparseGPT 90%=out/quality/ckpt/d9ad8234974092dc" \\
        --checkpoint "SE K=16 90%=out/quality/ckpt/e40dba8cbe7b12bb" --windows 8
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from se_export.adapters import adapter_for, decoder_layers
from se_export.atomic import atomic_write_text
from se_export.data import eval_windows, load_text, tokenize
from se_export.eval.evaluate import perplexity
from se_export.method.capture import layer_output
from se_export.modeling.modules import decoded_expert_cache
from se_export.models import load_model

OUT_JSON = Path("bench/results/drift.json")
OUT_PNG = Path("docs/quality_drift.png")


@torch.no_grad()
def layer_states(model, windows: torch.Tensor, dense_mlps=None, dense_first_token: bool = False,
                 dense_layers: tuple[int, ...] = (), remove_mean_error: bool = False) -> dict:
    """Every decoder layer's output on ``windows`` (``states``); with ``dense_mlps``, each layer's
    MLP error against the dense MLP on the same inputs (per-token norms and whole-tensor ratio);
    and the windows' mean next-token NLL. Interventions: ``dense_first_token`` gives each window's
    first token the dense MLPs' outputs (every other token keeps the pruned ones); ``dense_layers``
    gives the listed layers' MLPs back their dense outputs for every token; ``remove_mean_error``
    subtracts from every MLP output after the first token its error averaged over those tokens
    (an oracle bias correction: what is left is the token-dependent part of the error)."""
    adapter = adapter_for(model.config)
    layers = decoder_layers(model, adapter)
    outputs: list[list[torch.Tensor]] = [[] for _ in layers]
    delta_norms: list[list[torch.Tensor]] = [[] for _ in layers]
    num, den = [0.0] * len(layers), [0.0] * len(layers)
    mean_err: list[list[float]] = [[] for _ in layers]  # per window: ||mean_t delta_t|| / mean_t ||delta_t||
    hooks = []
    for i, layer in enumerate(layers):
        hooks.append(layer.register_forward_hook(lambda _m, _a, out, i=i: outputs[i].append(layer_output(out).detach())))
        if dense_mlps is not None:
            def local(_m, args, out, i=i):
                ref = dense_mlps[i](args[0])
                delta = out.double() - ref.double()
                norms = delta.norm(dim=-1)
                delta_norms[i].append(norms.flatten())
                rest = delta[:, 1:]  # the first token's (massive) error would dominate the mean
                mean_err[i].append(float(rest.mean(dim=1).norm(dim=-1).mean() / norms[:, 1:].mean().clamp_min(1e-30)))
                num[i] += float(delta.pow(2).sum())
                den[i] += float(ref.double().pow(2).sum())
                if i in dense_layers:
                    return ref
                if dense_first_token:
                    out = out.clone()
                    out[:, 0] = ref[:, 0]
                    return out
                if remove_mean_error:
                    out = out.clone()
                    out[:, 1:] -= rest.mean(dim=1, keepdim=True).to(out.dtype)
                    return out
                return None
            hooks.append(layer.get_submodule(adapter.mlp).register_forward_hook(local))
    try:
        nll = perplexity(model, windows, show_progress=False)["nll"]  # one window per pass, hooks see each
    finally:
        for h in hooks:
            h.remove()
    states = [torch.cat(o).reshape(-1, o[0].shape[-1]) for o in outputs]
    result = {"states": states, "nll": nll}
    if dense_mlps is not None:
        result["injected_mlp_error"] = [float((torch.cat(d) / s.double().norm(dim=-1).clamp_min(1e-30)).mean())
                                        for d, s in zip(delta_norms, states, strict=True)]
        result["relative_mlp_error"] = [math.sqrt(n / d) if d else float("nan") for n, d in zip(num, den, strict=True)]
        result["mlp_error_coherence"] = [sum(v) / len(v) for v in mean_err]
    return result


def drift(states: torch.Tensor, dense: torch.Tensor, seqlen: int) -> tuple[float, float, float]:
    """Relative distance to dense: mean over tokens after the first of each window, mean over the
    first tokens, and over the whole tensor."""
    diff = states.double() - dense.double()
    per_token = (diff.norm(dim=-1) / dense.double().norm(dim=-1).clamp_min(1e-30)).reshape(-1, seqlen)
    whole = diff.norm() / dense.double().norm().clamp_min(1e-30)
    return float(per_token[:, 1:].mean()), float(per_token[:, 0].mean()), float(whole)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b, c) = plt.subplots(1, 3, figsize=(16, 4))
    for r in results:
        line, = a.plot(r["drift_per_token"], marker=".", label=f"{r['label']} (ppl {r['perplexity']:.0f})")
        a.plot(r["drift_first_token"], ls=":", color=line.get_color())
        b.plot(r["injected_mlp_error"], marker=".", color=line.get_color(), label=r["label"])
        c.plot(r["mlp_error_coherence"], marker=".", color=line.get_color(), label=r["label"])
    a.set_title("drift from dense after each layer (dotted: first tokens)")
    a.set_ylabel("mean_t ||h_t - h_dense_t|| / ||h_dense_t||")
    b.set_title("MLP error injected into the residual stream")
    b.set_ylabel("mean_t ||mlp(a_t) - mlp_dense(a_t)|| / ||h_t||")
    c.set_title("coherence of the MLP error over tokens")
    c.set_ylabel("||mean_t delta_t|| / mean_t ||delta_t||")
    for ax in (a, b, c):
        ax.set_xlabel("decoder layer")
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
    a.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", action="append", required=True, metavar="LABEL=PATH",
                        help="an expanded checkpoint of the default model (repeat)")
    parser.add_argument("--windows", type=int, default=8, help="first N WikiText-2 test windows of 512 tokens")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--dense-first-token", action="store_true",
                        help="also evaluate each checkpoint with the first token's MLP outputs taken from dense")
    parser.add_argument("--remove-mean-error", action="store_true",
                        help="also evaluate each checkpoint with every MLP's window-mean error removed (oracle)")
    parser.add_argument("--dense-layers", default="",
                        help="also evaluate each checkpoint with these layers' MLPs dense, e.g. 0 or 0,1")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    pairs = []
    for spec in args.checkpoint:
        label, sep, path = spec.rpartition("=")  # labels may hold "=" (K=16)
        if not sep or not Path(path).is_dir():
            raise SystemExit(f"--checkpoint '{spec}': use LABEL=PATH with an existing checkpoint folder")
        pairs.append((label, path))

    interventions = []  # (result key, description, layer_states arguments)
    if args.dense_first_token:
        interventions.append(("dense_first_token", "the first token's MLPs dense", {"dense_first_token": True}))
    if args.remove_mean_error:
        interventions.append(("mean_error_removed", "every MLP's mean error removed", {"remove_mean_error": True}))
    if args.dense_layers:
        layers = tuple(int(v) for v in args.dense_layers.split(","))
        interventions.append((f"dense_layers_{args.dense_layers}", f"layer(s) {args.dense_layers} MLPs dense",
                              {"dense_layers": layers}))

    start = time.perf_counter()
    dense = load_model("default")
    windows = eval_windows(tokenize(dense.tokenizer, load_text("wikitext2")), 512, args.windows)
    reference = layer_states(dense.model, windows)
    adapter = adapter_for(dense.model.config)
    dense_mlps = [layer.get_submodule(adapter.mlp) for layer in decoder_layers(dense.model, adapter)]
    results = []
    for label, path in pairs:
        loaded = load_model(path)
        with decoded_expert_cache(8 << 30):
            got = layer_states(loaded.model, windows, dense_mlps)
        per_token, first, whole = zip(*(drift(s, d, windows.shape[1])
                                        for s, d in zip(got["states"], reference["states"], strict=True)), strict=True)
        results.append({"label": label, "checkpoint": path, "perplexity": math.exp(got["nll"]),
                        "drift_per_token": list(per_token), "drift_first_token": list(first), "drift_frobenius": list(whole),
                        "injected_mlp_error": got["injected_mlp_error"], "relative_mlp_error": got["relative_mlp_error"],
                        "mlp_error_coherence": got["mlp_error_coherence"]})
        inj, coh = got["injected_mlp_error"], got["mlp_error_coherence"]
        print(f"{label}: ppl {math.exp(got['nll']):.2f}; per-token drift after layer 0/15/last "
              f"{per_token[0]:.3f}/{per_token[15]:.3f}/{per_token[-1]:.3f} (first tokens {first[0]:.3f}/"
              f"{first[15]:.3f}/{first[-1]:.3f}); injected MLP error mean "
              f"{sum(inj) / len(inj):.4f}, coherence mean {sum(coh) / len(coh):.3f}", flush=True)
        for key, what, kwargs in interventions:
            with decoded_expert_cache(8 << 30):
                repaired = layer_states(loaded.model, windows, dense_mlps, **kwargs)
            results[-1][f"perplexity_{key}"] = math.exp(repaired["nll"])
            print(f"{label} with {what}: ppl {math.exp(repaired['nll']):.2f}", flush=True)
            del repaired
        del loaded, got
    norms = [h.norm(dim=-1).reshape(-1, windows.shape[1]) for h in reference["states"]]
    sink = [float(n[:, 0].mean() / n[:, 1:].median()) for n in norms]  # massive activations: >> 1
    print("dense first-token norm / median token norm after layer 0/10/11/last: "
          f"{sink[0]:.1f}/{sink[10]:.1f}/{sink[11]:.1f}/{sink[-1]:.1f}")
    report = {"model": "default", "windows": args.windows, "seqlen": 512, "dense_perplexity": math.exp(reference["nll"]),
              "dense_first_token_norm_ratio": sink,
              "seconds": round(time.perf_counter() - start, 1), "results": results}
    atomic_write_text(OUT_JSON, json.dumps(report, indent=1))
    plot(results, OUT_PNG)
    print(f"wrote {OUT_JSON} and {OUT_PNG}")


if __name__ == "__main__":
    main()
