"""Prepare an se-export ONNX graph for TensorRT's ONNX parser (a graph rewrite, no TensorRT needed).

TensorRT differs from ONNX Runtime in three ways that matter to ``RoutedSparseMatMul``:
it has no 16-bit integer type and limits 8-bit integer tensors to I/O casts and quantization, so
the indices (bitmap bytes or csr16 columns) and int8/int4 codes become int32 words holding the
same little-endian bytes, zero-padded to a whole word (the plugin reads that form, and our ONNX
Runtime op reads it for indices); a plugin layer has a fixed number of outputs (every node gets
its ``expert_ids`` output), and empty optional inputs are dropped. The node then says which
inputs it has in attributes (``has_bias``, ``has_expert_ids``: 0 or 1), so input 6 never needs to
be told apart by its type, which a weakly typed build may change; the scales of int8/int4 codes
are always last. Quantized nodes gain the attributes ``value_dtype`` ("int8" / "int4") and
``nnz``, which the words no longer carry; float nodes get ``value_dtype`` "fp32" / "fp16" /
"bf16", and with ``x_dtype`` every node names its activation type, so each plugin offers TensorRT
exactly one format combination (nothing for the builder to time on synthetic inputs). Every node gets ``gemv_max_tokens`` (0: the kernel
library's default), so each field the plugin's creator lists is an attribute of the node.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..atomic import atomic_path
from ..errors import SEError
from . import onnx_schema

EXTERNAL_DATA_THRESHOLD = 256 << 20


def as_int32_words(indices: np.ndarray) -> np.ndarray:
    """The little-endian bytes of ``indices`` as int32 words, zero-padded to a whole word."""
    raw = np.ascontiguousarray(indices).astype(indices.dtype.newbyteorder("<")).view(np.uint8).reshape(-1)
    padded = np.zeros((raw.size + 3) // 4 * 4, np.uint8)
    padded[: raw.size] = raw
    return padded.view("<i4").astype(np.int32)


def _is_empty_initializer(name: str, inits: dict) -> bool:
    return name in inits and int(np.prod(inits[name].dims)) == 0


def _initializer(node, position: int, what: str, inits: dict):
    name = node.input[position]
    if name not in inits:
        raise SEError(f"node {node.name}: {what} '{name}' are not an initializer; re-export with se-export onnx")
    return inits[name]


def _kept_values(node, inits: dict) -> int:
    """nnz of a node: csr16 has a column per value; a bitmap's last row ends at its start plus its bits."""
    from onnx import helper, numpy_helper

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    indices = numpy_helper.to_array(_initializer(node, 4, "indices", inits))
    if attrs.get("format", b"bitmap") in (b"csr16", "csr16"):
        return int(indices.size)
    row_ptr = numpy_helper.to_array(_initializer(node, 5, "row_ptr", inits))
    in_features = int(_initializer(node, 1, "router_weight", inits).dims[0])
    if row_ptr.size == 0:
        return 0
    row_bytes = (in_features + 7) // 8  # the bitmap's bytes, whether still uint8 or already int32 words
    bitmap = np.ascontiguousarray(indices).reshape(-1).view(np.uint8)[: row_ptr.size * row_bytes]
    return int(row_ptr[-1]) + int(np.unpackbits(bitmap[-row_bytes:]).sum())


def _retype_codes(node, inits: dict, consumers: dict, converted: set) -> None:
    """int8/int4 codes of a version-2 node as int32 words, with ``value_dtype`` and ``nnz`` attributes."""
    from onnx import TensorProto, helper, numpy_helper

    values = _initializer(node, 3, "values", inits)
    if values.data_type not in (TensorProto.INT8, TensorProto.UINT8):
        raise SEError(f"node {node.name}: values of a node with scales must be int8 or uint8 codes; "
                      "re-export with se-export onnx")
    value_dtype = "int8" if values.data_type == TensorProto.INT8 else "int4"
    nnz = _kept_values(node, inits)
    if values.name not in converted:
        if any(c.op_type != onnx_schema.OP_TYPE for c in consumers[values.name]):
            raise SEError(f"initializer {values.name} is shared with other ops; cannot retype it for TensorRT")
        values.CopyFrom(numpy_helper.from_array(as_int32_words(numpy_helper.to_array(values)), values.name))
        converted.add(values.name)
    kept = [a for a in node.attribute if a.name not in ("value_dtype", "nnz")]
    del node.attribute[:]
    node.attribute.extend([*kept, helper.make_attribute("value_dtype", value_dtype), helper.make_attribute("nnz", nnz)])


def _attribute(node, name: str, default):
    from onnx import helper

    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _set_attributes(node, **values) -> None:
    """Set (or replace) integer or string attributes of ``node``."""
    from onnx import helper

    kept = [a for a in node.attribute if a.name not in values]
    del node.attribute[:]
    node.attribute.extend([*kept, *(helper.make_attribute(k, v if isinstance(v, str) else int(v))
                                     for k, v in values.items())])


FLOAT_VALUE_DTYPES = {"FLOAT": "fp32", "FLOAT16": "fp16", "BFLOAT16": "bf16"}  # TensorProto names


def prepare_graph(model, drop_empty_bias: bool = True, x_dtype: str | None = None) -> dict:
    """Rewrite every RoutedSparseMatMul node of ``model`` (onnx.ModelProto) in place; returns counts.

    ``drop_empty_bias=False`` keeps the 0-element bias placeholder (a form ONNX Runtime's schema
    still accepts, used to check the rest of the rewrite there). ``x_dtype`` ("fp32"/"fp16"), when
    given, is the one activation type each plugin offers TensorRT (with ``value_dtype``, the one
    format combination the graph needs)."""
    from onnx import TensorProto, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    stats = {"nodes": 0, "indices_packed": 0, "outputs_added": 0, "inputs_dropped": 0, "quantized": 0,
             "bf16_values": 0}
    converted: set[str] = set()
    for node in graph.node:
        if node.domain != onnx_schema.DOMAIN or node.op_type != onnx_schema.OP_TYPE:
            continue
        stats["nodes"] += 1
        quantized = len(node.input) > 8 and node.input[8] != ""
        if quantized:  # before the indices change form: nnz is read from them
            _retype_codes(node, inits, consumers, converted)
            stats["quantized"] += 1
        else:
            kind = TensorProto.DataType.Name(_initializer(node, 3, "values", inits).data_type)
            if kind not in FLOAT_VALUE_DTYPES:
                raise SEError(f"node {node.name}: values of type {kind} without scales; re-export with se-export onnx")
            stats["bf16_values"] += kind == "BFLOAT16"
            _set_attributes(node, value_dtype=FLOAT_VALUE_DTYPES[kind])
        if x_dtype is not None:
            _set_attributes(node, x_dtype=x_dtype)
        tensor = _initializer(node, 4, "indices", inits)
        name = tensor.name
        if tensor.data_type in (TensorProto.UINT8, TensorProto.INT16) and name not in converted:
            if any(c.op_type != onnx_schema.OP_TYPE for c in consumers[name]):
                raise SEError(f"initializer {name} is shared with other ops; cannot retype it for TensorRT")
            tensor.CopyFrom(numpy_helper.from_array(as_int32_words(numpy_helper.to_array(tensor)), name))
            converted.add(name)
            stats["indices_packed"] += 1
        inputs = list(node.input)
        has_bias = len(inputs) >= 7 and inputs[6] != "" and not _is_empty_initializer(inputs[6], inits)
        has_ids = len(inputs) >= 8 and inputs[7] != ""
        scales = [inputs.pop(8)] if quantized else []
        del inputs[8:]
        while inputs and inputs[-1] == "":
            inputs.pop()
        if drop_empty_bias and len(inputs) >= 7 and (inputs[6] == "" or _is_empty_initializer(inputs[6], inits)):
            del inputs[6]  # no bias: position 6 is then expert_ids (int32) or nothing
            stats["inputs_dropped"] += 1
        inputs += scales  # the scales of int8/int4 codes come last
        if inputs != list(node.input):
            del node.input[:]
            node.input.extend(inputs)
        _set_attributes(node, has_bias=int(has_bias), has_expert_ids=int(has_ids),
                        gemv_max_tokens=_attribute(node, "gemv_max_tokens", 0))
        if len(node.output) < 2 or node.output[1] == "":
            outputs = [node.output[0], f"{node.output[0]}__expert_ids_unused"]
            del node.output[:]
            node.output.extend(outputs)
            stats["outputs_added"] += 1
    return stats


def prepare_for_tensorrt(src: Path, dst: Path, drop_empty_bias: bool = True, x_dtype: str | None = None) -> dict:
    """Write the TensorRT form of ``src`` (model.onnx of se-export onnx) to ``dst`` (a file path)."""
    import onnx


    try:
        model = onnx.load(str(src), load_external_data=True)
    except Exception as exc:  # onnx raises DecodeError / OSError variants
        raise SEError(f"cannot read {src}: {exc}: re-run se-export onnx") from None
    stats = prepare_graph(model, drop_empty_bias, x_dtype)
    large = sum(len(t.raw_data) for t in model.graph.initializer) > EXTERNAL_DATA_THRESHOLD
    data_name = dst.name + ".data"
    with atomic_path(dst) as tmp:  # the weights file is written first; model.onnx appears last
        if large:
            (dst.parent / data_name).unlink(missing_ok=True)
            onnx.save_model(model, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=1024)
        else:
            onnx.save_model(model, str(tmp))
    stats["external_data"] = large
    return stats
