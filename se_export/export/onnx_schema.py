"""The ONNX form of the operator contract (docs/routed_sparse_matmul.md): ``se::RoutedSparseMatMul``.

Version 1 takes float values; version 2 adds quantized experts (int8 codes, or int4 codes two per
byte as uint8, with an fp16 ``scales`` input and a ``group_size`` attribute). Exports use version
1 unless a node is quantized, so readers of version 1 keep reading every float export.

Registering the schema lets ``onnx.checker`` (full check) validate our nodes and lets ONNX shape
inference give ``y [..., out_features]`` and ``expert_ids [...]`` symbolic shapes.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, defs, shape_inference

DOMAIN = "se"
OP_TYPE = "RoutedSparseMatMul"
OP_VERSION = 2  # the newest version this package writes and reads
QUANTIZED_SINCE = 2

# input positions of the node (optional ones may be given as "")
INPUTS = ("x", "router_weight", "router_bias", "values", "indices", "row_ptr", "bias", "expert_ids", "scales")


def op_version(quantized: bool) -> int:
    """The version an export's nodes declare: the oldest that can hold them."""
    return QUANTIZED_SINCE if quantized else 1
OUTPUTS = ("y", "expert_ids_out")


def _infer(ctx: shape_inference.InferenceContext) -> None:
    x_type = ctx.get_input_type(0)
    if x_type is None or not x_type.HasField("tensor_type"):
        return
    out_attr = ctx.get_attribute("out_features")
    elem = x_type.tensor_type.elem_type
    dims = list(x_type.tensor_type.shape.dim) if x_type.tensor_type.HasField("shape") else None

    def tensor(elem_type: int, last: int | None) -> onnx.TypeProto:
        proto = onnx.TypeProto()
        proto.tensor_type.elem_type = elem_type
        if dims is not None and len(dims) >= 1:
            shape = proto.tensor_type.shape
            for d in dims[:-1]:
                shape.dim.add().CopyFrom(d)
            if last is not None:
                shape.dim.add().dim_value = last
        return proto

    out_features = out_attr.i if out_attr is not None else None
    ctx.set_output_type(0, tensor(elem, out_features))
    if ctx.get_num_outputs() > 1:
        ctx.set_output_type(1, tensor(TensorProto.INT32, None))


def schema(version: int = OP_VERSION) -> defs.OpSchema:
    param = defs.OpSchema.FormalParameter
    optional = defs.OpSchema.FormalParameterOption.Optional
    quantized = version >= QUANTIZED_SINCE
    inputs = [
        param("x", "T", "activations [..., in]"),
        param("router_weight", "tensor(float)", "folded router G [in, K]"),
        param("router_bias", "tensor(float)", "folded router b [K]"),
        param("values", "V", "kept weights [nnz], expert-major, row-major" +
              ("; int8 codes, or int4 codes two per byte (uint8, even value in the low nibble)" if quantized else "")),
        param("indices", "I", "bitmap or 16-bit column indices"),
        param("row_ptr", "tensor(int32)", "start of every expert row in values [K*out]"),
        param("bias", "tensor(float)", "expert bias [K, out]; a 0-element tensor means none", param_option=optional),
        param("expert_ids", "tensor(int32)", "precomputed routing [...]: skips the router; a 0-element tensor "
              "means none", param_option=optional),
    ]
    value_types = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
    attributes = [
        defs.OpSchema.Attribute("out_features", defs.OpSchema.AttrType.INT, "rows of every expert"),
        defs.OpSchema.Attribute("format", defs.OpSchema.AttrType.STRING, "'bitmap' or 'csr16'"),
    ]
    if quantized:
        inputs.append(param("scales", "tensor(float16)", "[K, out, ceil(in / group_size)]: weight = code * scale; "
                            "required with int8/uint8 values", param_option=optional))
        value_types += ["tensor(int8)", "tensor(uint8)"]
        attributes.append(defs.OpSchema.Attribute("group_size", defs.OpSchema.AttrType.INT,
                                                  "input columns per scale (int8/int4 values)", required=False))
    s = defs.OpSchema(
        OP_TYPE, DOMAIN, version,
        "Route each token of x to its nearest-centroid expert (argmin of x G + b, fp32) and multiply "
        "it by that expert's packed sparse weight. Formats: 'bitmap' (uint8 [K,out,ceil(in/8)] "
        "LSB-first) or 'csr16' (uint16 columns stored as int16 [nnz]); row_ptr holds int32 start "
        "offsets of every expert row into values. csr16 columns may also be given as uint8 little-endian "
        "byte pairs (the TensorRT form).",
        inputs=inputs,
        outputs=[
            param("y", "T", "[..., out_features] in the dtype of x"),
            param("expert_ids_out", "tensor(int32)", "the routing used [...]", param_option=optional),
        ],
        type_constraints=[
            ("T", ["tensor(float)", "tensor(float16)"], "activations"),
            ("V", value_types, "stored values"),
            ("I", ["tensor(uint8)", "tensor(int16)", "tensor(int32)"], "bitmap bytes, csr16 columns, or int32 words"),
        ],
        attributes=attributes,
    )
    s.set_type_and_shape_inference_function(_infer)
    return s


def register() -> None:
    """Register every version's schema once per process (idempotent)."""
    for version in range(1, OP_VERSION + 1):  # has(): any schema with since_version <= version
        if not defs.has(OP_TYPE, version, DOMAIN) or defs.get_schema(OP_TYPE, version, DOMAIN).since_version != version:
            defs.register_schema(schema(version))
