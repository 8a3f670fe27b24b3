"""``se-export onnx``: a generation-ready ONNX graph of a (dense or expanded) causal LM.

The graph follows Optimum's "text-generation-with-past" convention: ``input_ids``,
``attention_mask``, ``position_ids`` (when the model takes them) and ``past_key_values.{i}.key|value``
in; ``logits`` and ``present.{i}.key|value`` out; batch, sequence and past length are dynamic, so
one graph serves prefill (past length 0) and decode.

Every ``RoutedSparseLinear`` becomes one ``se::RoutedSparseMatMul`` node (its packed tensors are
initializers fed as inputs); gate and up of a gated MLP share one routing through the node's
``expert_ids`` output/input. ``portable=True`` instead lowers every expanded linear to standard
ONNX ops (bit unpacking, a gather of the packed values, all-experts MatMul, per-token select): any
runtime can run it, at the cost of speed and of decoding the experts at load time.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..atomic import umask
from ..errors import SEError
from ..formats.checkpoint import expanded_modules
from ..formats.sparse_format import mask_to_bitmap
from ..modeling.modules import (
    RoutedSparseLinear,
    remember_expert_ids,
    shared_expert_ids,
    shared_routing,
)
from ..progress import progress_bar
from . import onnx_schema
from .onnx_rewrites import simplify_for_runtimes

MANIFEST = "se_onnx.json"
MODEL_FILE = "model.onnx"
EXTERNAL_DATA_BYTES = 1 << 28  # larger graphs keep their weights in model.onnx.data
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


@dataclass
class KvLayout:
    """What the past/present tensors look like: ``[batch, kv_heads, past, head_dim]`` per layer."""

    layers: int
    kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, config) -> KvLayout:
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(config.num_hidden_layers, kv_heads, head_dim)

    def names(self, prefix: str) -> list[str]:
        return [f"{prefix}.{i}.{kind}" for i in range(self.layers) for kind in ("key", "value")]


def cache_argument(model: nn.Module) -> str:
    """transformers >= 5.x names the KV cache ``cache`` (``past_key_values`` before)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def returned_cache(output):
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


class CausalLMWithPast(nn.Module):
    """Flat tensors in and out around a transformers causal LM and its DynamicCache."""

    def __init__(self, model: nn.Module, layout: KvLayout, uses_position_ids: bool) -> None:
        super().__init__()
        self.model = model
        self.layout = layout
        self.uses_position_ids = uses_position_ids

    def forward(self, input_ids, attention_mask, *rest):
        from transformers import DynamicCache

        position_ids, past = (rest[0], rest[1:]) if self.uses_position_ids else (None, rest)
        cache = DynamicCache(config=self.model.config)
        for i in range(self.layout.layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        kwargs = {"position_ids": position_ids} if self.uses_position_ids else {}
        kwargs[cache_argument(self.model)] = cache
        with shared_routing():
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True, **kwargs)
        present = []
        for layer in returned_cache(out).layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


class PortableRoutedLinear(nn.Module):
    """``RoutedSparseLinear`` in standard ops only, for runtimes without our custom op.

    Experts are stored as a bitmap plus packed values (csr16 is converted). Each token gathers only
    its routed expert's bitmap rows and row starts, unpacks the bits, and a ``cumsum`` along the
    row indexes ``values``: ``tokens x out x in`` work per call (decode: one expert's worth), never
    the K dense experts, and nothing a constant folder could precompute into dense copies.
    int8/int4 experts keep their int8 codes; each token also gathers its expert's fp16 scales,
    one per row and group, spread over the columns by a constant group index (``Gather``), and
    ``code * scale`` is computed in fp32 as in the reference.
    """

    def __init__(self, src: RoutedSparseLinear) -> None:
        super().__init__()
        self.in_features, self.out_features, self.num_experts = src.in_features, src.out_features, src.num_experts
        self.router_group = src.router_group
        packed = src.packed()
        mask = packed.mask()
        self.register_buffer("router_weight", src.router_weight)
        self.register_buffer("router_bias", src.router_bias)
        self.register_buffer("bitmap", mask_to_bitmap(mask))
        self.register_buffer("row_start", packed.row_ptr.to(torch.int32).reshape(self.num_experts, self.out_features))
        # one trailing zero so the gather below never indexes an empty tensor
        self.register_buffer("values", torch.cat([packed.values, packed.values.new_zeros(1)]))
        self.register_buffer("bias", None if src.bias is None else src.bias.float())
        self.register_buffer("scales", packed.scales)  # None for float values
        group = packed.quant.group_size if packed.quant else 1
        self.register_buffer("column_group", torch.arange(self.in_features, dtype=torch.int64) // group)

    def routed_weights(self, ids: torch.Tensor) -> torch.Tensor:
        """``[tokens, out, in]``: each token's routed expert, decoded from its packed rows.

        Narrow types keep the transient memory at ~15 bytes per decoded weight: bool bits, int32
        running counts and gather indices, the gathered values in their stored precision."""
        powers = torch.tensor([1 << j for j in range(8)], dtype=torch.uint8)  # LSB first
        rows = self.bitmap[ids]  # [T, out, nb] uint8
        bits = torch.bitwise_and(rows.unsqueeze(-1), powers) != 0
        mask = bits.reshape(ids.shape[0], self.out_features, -1)[:, :, : self.in_features]
        position = self.row_start[ids].unsqueeze(-1) + torch.cumsum(mask.to(torch.int32), dim=-1, dtype=torch.int32) - 1
        index = torch.clamp(position, min=0).reshape(-1)  # int32: ONNX Gather takes it (GatherND would not)
        picked = torch.index_select(self.values, 0, index).reshape(position.shape)  # stored precision
        weight = picked.to(torch.float32)
        if self.scales is not None:  # int codes: times their row and group's scale
            weight = weight * torch.index_select(self.scales[ids], 2, self.column_group).to(torch.float32)
        return torch.where(mask, weight, 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(torch.float32)
        given = shared_expert_ids(self.router_group, x)
        if given is not None:
            ids = given.reshape(-1).to(torch.int64)
        else:
            ids = torch.argmin(flat @ self.router_weight + self.router_bias, dim=-1)
            remember_expert_ids(self.router_group, x, ids)
        y = torch.matmul(self.routed_weights(ids), flat.unsqueeze(-1)).squeeze(-1)
        if self.bias is not None:
            y = y + self.bias[ids]
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


def _custom_op_translation():
    """onnxscript translation of ``se::routed_sparse_matmul`` into one ``se.RoutedSparseMatMul`` node."""
    import numpy as np
    import onnx
    from onnxscript import opset18 as op
    from onnxscript.values import Opset

    def routed_sparse_matmul(x, router_weight, router_bias, values, indices, row_ptr, bias=None, expert_ids=None,
                             out_features: int = 0, format: str = "bitmap", scales=None, group_size: int = 0):
        # no gap before a given input: ONNX Runtime's lite custom-op API cannot skip a middle input,
        # so "no bias" / "no expert_ids" are empty tensors (the contract treats them as absent)
        if bias is None and (expert_ids is not None or scales is not None):
            bias = op.Constant(value=onnx.numpy_helper.from_array(np.zeros(0, np.float32)))
        if scales is None:
            return Opset(onnx_schema.DOMAIN, 1).RoutedSparseMatMul(
                x, router_weight, router_bias, values, indices, row_ptr, bias, expert_ids,
                out_features=out_features, format=format, _outputs=2)
        if expert_ids is None:
            expert_ids = op.Constant(value=onnx.numpy_helper.from_array(np.zeros(0, np.int32)))
        return Opset(onnx_schema.DOMAIN, 2).RoutedSparseMatMul(
            x, router_weight, router_bias, values, indices, row_ptr, bias, expert_ids, scales,
            out_features=out_features, format=format, group_size=group_size, _outputs=2)

    return {torch.ops.se.routed_sparse_matmul.default: routed_sparse_matmul}


def make_portable(model: nn.Module) -> int:
    """Swap every ``RoutedSparseLinear`` for its standard-op form; returns how many."""
    mods = expanded_modules(model)
    for name, module in mods.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, PortableRoutedLinear(module))
    return len(mods)


def cast_model(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast the dense parts to ``dtype``; routers (fp32 by contract) and packed experts stay as stored."""
    keep: dict[int, dict[str, torch.Tensor]] = {}
    for module in model.modules():
        if isinstance(module, RoutedSparseLinear | PortableRoutedLinear):
            keep[id(module)] = {n: b for n, b in module.named_buffers(recurse=False) if b is not None}
    model.to(dtype)
    for module in model.modules():
        for name, buf in keep.get(id(module), {}).items():
            setattr(module, name, buf)


def example_inputs(layout: KvLayout, uses_position_ids: bool, dtype: torch.dtype, vocab: int,
                   batch: int = 2, seq: int = 3, past: int = 4) -> tuple[torch.Tensor, ...]:
    ids = torch.randint(0, vocab, (batch, seq))
    mask = torch.ones(batch, past + seq, dtype=torch.int64)
    inputs = [ids, mask]
    if uses_position_ids:
        inputs.append(torch.arange(past, past + seq).expand(batch, seq).contiguous())
    inputs += [torch.zeros(batch, layout.kv_heads, past, layout.head_dim, dtype=dtype) for _ in range(2 * layout.layers)]
    return tuple(inputs)


def uses_position_ids(model: nn.Module) -> bool:
    return "position_ids" in inspect.signature(model.forward).parameters


@contextlib.contextmanager
def eager_attention(model: nn.Module):
    """Export attention as transformers' eager code: ``MatMul``/``Softmax``/``MatMul``, which ONNX
    Runtime fuses. SDPA's ONNX decomposition instead transposes the key through a rank-generic
    Shape/Slice/Concat/Reshape chain and guards the softmax with IsNaN/Where: ~11 more nodes per
    layer that run on every decode step (the dense default model: 2094 -> 1764 nodes after ONNX
    Runtime's optimizer). Same math; the mask uses the dtype's minimum, so padded rows stay finite."""
    previous = getattr(model.config, "_attn_implementation", None)
    switch = getattr(model, "set_attn_implementation", None)
    try:
        if switch is not None and previous not in (None, "eager"):
            switch("eager")
    except (ValueError, ImportError):  # a model without an eager path keeps its own
        switch = None
    try:
        yield
    finally:
        if switch is not None and previous not in (None, "eager"):
            switch(previous)


def check_export_args(dtype: str, opset: int) -> None:
    """Refuse bad --dtype/--opset before any model is loaded."""
    if dtype not in DTYPES:
        raise SEError(f"unknown --dtype '{dtype}': use fp32 or fp16")
    if not 18 <= opset <= 23:
        raise SEError(f"--opset {opset} is not supported: use 18..23")


def export_onnx(model: nn.Module, tokenizer, out: Path, *, dtype: str = "fp32", opset: int = 18,
                portable: bool = False, source: str = "", overwrite: bool = False, show_progress: bool = True) -> dict:
    """Export ``model`` to ``out/model.onnx`` (+ manifest, config, tokenizer); written atomically.
    Progress: one step each for tracing and translating, simplifying, saving and checking."""
    check_export_args(dtype, opset)
    if out.exists() and not overwrite:
        raise SEError(f"{out} already exists: pass --overwrite to replace it or choose another --out")
    onnx_schema.register()
    torch_dtype = DTYPES[dtype]
    model.eval()
    modules = expanded_modules(model)
    expanded = len(modules)
    quantized = any(m.quant is not None for m in modules.values())
    if portable:
        make_portable(model)
    else:
        for module in modules.values():
            module.pack_for_export()
    if torch_dtype != torch.float32:
        cast_model(model, torch_dtype)
    layout = KvLayout.of(model.config)
    with_pos = uses_position_ids(model)
    wrapper = CausalLMWithPast(model, layout, with_pos)
    inputs = example_inputs(layout, with_pos, torch_dtype, model.config.vocab_size)
    input_names = ["input_ids", "attention_mask"] + (["position_ids"] if with_pos else []) + layout.names("past_key_values")
    output_names = ["logits", *layout.names("present")]
    from torch.export import Dim

    batch, seq, past, total = Dim("batch"), Dim("sequence_length"), Dim("past_sequence_length"), Dim.AUTO
    rest: list[dict] = [{0: batch, 1: seq}] if with_pos else []
    rest += [{0: batch, 2: past}] * (2 * layout.layers)
    shapes = ({0: batch, 1: seq}, {0: batch, 1: total}, tuple(rest))  # matches forward(ids, mask, *rest)
    start = time.perf_counter()
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # e.g. "torchvision is not installed" notes
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes a 0700 folder; the export gets normal permissions
    try:
        with progress_bar(show_progress) as bar:
            step = bar.add_task(f"ONNX export: tracing {layout.layers} layers (torch.onnx, dynamo)", total=3)
            with warnings.catch_warnings(), torch.no_grad(), eager_attention(model):
                warnings.simplefilter("ignore")
                program = torch.onnx.export(
                    wrapper, inputs, dynamo=True, opset_version=opset, input_names=input_names,
                    output_names=output_names, dynamic_shapes=shapes, verbose=False,
                    custom_translation_table=_custom_op_translation(), report=False, optimize=True,
                )
            bar.update(step, advance=1, description="ONNX export: traced")
            program.model = simplify_for_runtimes(program.model)
            bar.update(step, advance=1, description="ONNX export: simplified for the runtimes")
            weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
            external = weight_bytes > EXTERNAL_DATA_BYTES
            program.save(str(tmp / MODEL_FILE), external_data=external)
            check_graph(tmp / MODEL_FILE)
            bar.update(step, advance=1, description="ONNX export: saved and checked")
        manifest = {
            "format": "se-onnx", "version": 1, "source": source, "dtype": dtype, "opset": opset,
            "portable": portable, "external_data": external,
            "op": {"domain": onnx_schema.DOMAIN, "type": onnx_schema.OP_TYPE,
                   "version": onnx_schema.op_version(quantized)},
            "expanded_linears": expanded, "custom_op_nodes": count_custom_nodes(tmp / MODEL_FILE),
            "inputs": input_names, "outputs": output_names, "uses_position_ids": with_pos,
            "num_layers": layout.layers, "num_kv_heads": layout.kv_heads, "head_dim": layout.head_dim,
            "vocab_size": model.config.vocab_size, "model_type": model.config.model_type,
            "export_seconds": round(time.perf_counter() - start, 1),
        }
        model.config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))  # last: marks the folder complete
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return manifest


def check_graph(path: Path) -> None:
    """``onnx.checker`` full check (types and shapes) with our schema registered."""
    import onnx

    onnx_schema.register()
    onnx.checker.check_model(str(path), full_check=True)


def count_custom_nodes(path: Path) -> int:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return sum(1 for n in graph.node if n.domain == onnx_schema.DOMAIN and n.op_type == onnx_schema.OP_TYPE)


def read_onnx_manifest(folder: Path) -> dict:
    """The export's manifest, or an SEError saying what the folder is missing."""
    path = folder / MANIFEST
    if not folder.is_dir():
        raise SEError(f"{folder} is not a folder: pass the --out folder of se-export onnx")
    if not path.is_file() or not (folder / MODEL_FILE).is_file():
        raise SEError(f"{folder} is not an se-export ONNX folder ({MANIFEST} or {MODEL_FILE} missing): "
                      "run se-export onnx first")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise SEError(f"{path} is corrupt: re-run se-export onnx") from None
