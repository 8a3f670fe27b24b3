"""The one place that knows model architectures: where the decoder layers and MLP linears are.

Every other module asks ``adapter_for(config)`` and works on names from this table, so adding an
architecture is one row here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import SEError


@dataclass(frozen=True)
class MlpAdapter:
    """Where the expandable linears of one architecture live.

    ``groups`` lists the MLP linears (paths relative to a decoder layer) in execution order;
    linears in one group read the same input and share one router. ``mlp`` is the module whose
    input is the first group's input (None if the layer has no such module, as in OPT), which
    lets later groups be calibrated by re-running only the MLP. ``conv1d`` marks GPT-2's
    transposed Conv1D weights. ``residual`` names the module whose input is the residual stream
    the MLP output is added to (layer output = that input + MLP output, nothing after it), so
    the expansion can build the next layer's input from captured activations instead of running
    the layer again; None where the layer does more (post-MLP norms, parallel or scaled residuals).
    """

    layers: str
    groups: tuple[tuple[str, ...], ...]
    mlp: str | None = "mlp"
    conv1d: bool = False
    residual: str | None = None


_GATED = MlpAdapter("model.layers", (("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",)))
_GATED_PRE_NORM = MlpAdapter("model.layers", _GATED.groups, residual="post_attention_layernorm")

ADAPTERS: dict[str, MlpAdapter] = {
    **{t: _GATED_PRE_NORM for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "smollm3")},
    **{t: _GATED for t in ("gemma2", "gemma3_text", "olmo", "olmo2", "granite", "cohere", "helium")},
    "gpt_neox": MlpAdapter("gpt_neox.layers", (("mlp.dense_h_to_4h",), ("mlp.dense_4h_to_h",))),
    "opt": MlpAdapter("model.decoder.layers", (("fc1",), ("fc2",)), mlp=None),
    "gpt2": MlpAdapter("transformer.h", (("mlp.c_fc",), ("mlp.c_proj",)), conv1d=True),
}


def adapter_for(config) -> MlpAdapter:
    """The adapter of a transformers config, or a clear error listing what is supported."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise SEError(f"architecture '{model_type}' is not supported yet (supported: "
                      f"{', '.join(sorted(ADAPTERS))}); add a row to se_export/adapters.py")
    return ADAPTERS[model_type]


def decoder_layers(model: nn.Module, adapter: MlpAdapter) -> nn.ModuleList:
    return model.get_submodule(adapter.layers)


def linear_weight(module: nn.Module, adapter: MlpAdapter) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight [out, in], bias [out] or None)`` of a dense linear, whatever its storage."""
    weight = module.weight.detach()
    if adapter.conv1d:
        weight = weight.t()
    bias = getattr(module, "bias", None)
    return weight, (None if bias is None else bias.detach())


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)
