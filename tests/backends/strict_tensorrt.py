"""A strict stand-in of the TensorRT 10 Python API, for CPU tests of se-export's builder and runtime.

It implements the subset ``trt_build`` and ``trt_runtime`` call and enforces the rules the real
API documents, so that code which breaks one fails here as it would on first contact:

- the plugin registry is one per process; ``load_library`` returns None for a missing library, one
  that does not export ``getCreators``, or one whose creators are already registered;
- the ONNX parser fails on a RoutedSparseMatMul node without a registered creator, on 8/16-bit
  integer initializers (TensorRT has no INT16 and takes INT8 only for quantization), and warns
  about every creator field a node does not carry as an attribute;
- a profile must have min <= opt <= max for every input (``add_optimization_profile`` returns -1),
  and the build fails unless every input has a range in every profile, or when bf16 tensors meet a
  weakly typed network without the BF16 flag;
- ``set_input_shape`` returns False outside the context's profile; ``execute_async_v3`` returns
  False unless every input has a shape and a non-null address (NvInferRuntime.h,
  IExecutionContext::setTensorAddress) and every output an address; a profile serves one context.

The engine computes with ONNX Runtime on the export's ``model.onnx`` (beside the parsed TensorRT
form) and our op library, reading inputs from and writing outputs to the bound addresses, so the
runtime's bindings are exercised byte for byte. Tensors are host memory (torch CPU tensors).
"""

from __future__ import annotations

import ctypes
import enum
import json
from pathlib import Path

import numpy as np

__version__ = "10.3.0"

# the fields RoutedSparseMatMulPluginCreator lists (plugins/trt/routedSparseMatMulPlugin)
PLUGIN_FIELDS = {"out_features", "format", "gemv_max_tokens", "value_dtype", "group_size", "nnz", "has_bias",
                 "has_expert_ids", "x_dtype"}
QUANTIZED_ONLY_FIELDS = {"group_size", "nnz"}


class DataType(enum.Enum):
    FLOAT = "float32"
    HALF = "float16"
    BF16 = "bfloat16"
    INT32 = "int32"
    INT64 = "int64"
    INT8 = "int8"
    BOOL = "bool"


class TensorIOMode(enum.Enum):
    INPUT = 1
    OUTPUT = 2


class NetworkDefinitionCreationFlag(enum.IntEnum):
    STRONGLY_TYPED = 1


class BuilderFlag(enum.Enum):
    FP16 = 0
    BF16 = 1


class MemoryPoolType(enum.Enum):
    WORKSPACE = 0


class Logger:
    ERROR, WARNING, INFO = 1, 2, 3

    def __init__(self, severity: int = WARNING) -> None:
        self.severity = severity
        self.messages: list[str] = []


LOG: list[str] = []  # every error and warning of this process, newest last


def _log(message: str) -> None:
    LOG.append(message)


def _onnx_dtype(elem_type: int) -> DataType:
    from onnx import TensorProto

    return {TensorProto.FLOAT: DataType.FLOAT, TensorProto.FLOAT16: DataType.HALF, TensorProto.BFLOAT16: DataType.BF16,
            TensorProto.INT32: DataType.INT32, TensorProto.INT64: DataType.INT64, TensorProto.INT8: DataType.INT8,
            TensorProto.BOOL: DataType.BOOL}[elem_type]


class _Creator:
    def __init__(self, name: str, version: str, library: str) -> None:
        self.name, self.plugin_version, self.library = name, version, library


class IPluginRegistry:
    def __init__(self) -> None:
        self.creators: dict[tuple[str, str, str], _Creator] = {}

    def get_creator(self, name: str, version: str, plugin_namespace: str = "") -> _Creator | None:
        return self.creators.get((name, version, plugin_namespace))

    def load_library(self, path: str):
        if not Path(path).is_file():
            _log(f"[E] loadLibrary: cannot open {path}")
            return None
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as exc:
            _log(f"[E] loadLibrary: {exc}")
            return None
        if not hasattr(lib, "getCreators"):
            _log(f"[E] loadLibrary: {path} exports no getCreators")
            return None
        key = ("RoutedSparseMatMul", "1", "")
        if key in self.creators:
            _log("[E] loadLibrary: creator RoutedSparseMatMul v1 is already registered")
            return None
        self.creators[key] = _Creator(*key[:2], str(path))
        return lib


_REGISTRY = IPluginRegistry()  # TensorRT keeps one registry per process


def get_plugin_registry() -> IPluginRegistry:
    return _REGISTRY


def reset() -> None:
    """A fresh process as far as TensorRT is concerned (tests call it between cases)."""
    _REGISTRY.creators.clear()
    LOG.clear()


class ITensor:
    def __init__(self, name: str, dtype: DataType, shape: tuple[int, ...]) -> None:
        self.name, self.dtype, self.shape = name, dtype, shape


class INetworkDefinition:
    def __init__(self, flags: int) -> None:
        self.strongly_typed = bool(flags & (1 << int(NetworkDefinitionCreationFlag.STRONGLY_TYPED)))
        self.onnx_path: str | None = None
        self.inputs: list[ITensor] = []
        self.outputs: list[ITensor] = []
        self.bf16 = False
        self.plugin_nodes = 0

    @property
    def num_inputs(self) -> int:
        return len(self.inputs)

    def get_input(self, i: int) -> ITensor:
        return self.inputs[i]


def _shape(value_info) -> tuple[int, ...]:
    return tuple(d.dim_value if d.HasField("dim_value") else -1 for d in value_info.type.tensor_type.shape.dim)


class OnnxParser:
    def __init__(self, network: INetworkDefinition, logger: Logger) -> None:
        self.network, self.errors = network, []

    @property
    def num_errors(self) -> int:
        return len(self.errors)

    def get_error(self, i: int) -> str:
        return self.errors[i]

    def parse_from_file(self, path: str) -> bool:
        import onnx
        from onnx import TensorProto, helper

        model = onnx.load(path, load_external_data=True)
        inits = {t.name: t for t in model.graph.initializer}
        for node in model.graph.node:
            if node.op_type != "RoutedSparseMatMul":
                continue
            self.network.plugin_nodes += 1
            if _REGISTRY.get_creator("RoutedSparseMatMul", "1", "") is None:
                self.errors.append(f"{node.name}: Plugin not found (RoutedSparseMatMul v1): load the library first")
                continue
            for name in node.input:
                t = inits.get(name)
                if t is not None and t.data_type in (TensorProto.INT8, TensorProto.UINT8, TensorProto.INT16,
                                                     TensorProto.UINT16):
                    self.errors.append(f"{node.name}: initializer {name} has a type TensorRT cannot hold here")
                if t is not None and t.data_type == TensorProto.BFLOAT16:
                    self.network.bf16 = True
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            unknown = set(attrs) - PLUGIN_FIELDS
            if unknown:
                self.errors.append(f"{node.name}: attributes {sorted(unknown)} are no field of the plugin")
            quantized = attrs.get("value_dtype") in (b"int8", b"int4")
            wanted = PLUGIN_FIELDS - (set() if quantized else QUANTIZED_ONLY_FIELDS)
            for missing in sorted(wanted - set(attrs)):
                _log(f"[W] {node.name}: attribute {missing} not found in plugin node, using the plugin's default")
        initializer_names = set(inits)
        self.network.inputs = [ITensor(i.name, _onnx_dtype(i.type.tensor_type.elem_type), _shape(i))
                               for i in model.graph.input if i.name not in initializer_names]
        self.network.outputs = [ITensor(o.name, _onnx_dtype(o.type.tensor_type.elem_type), _shape(o))
                                for o in model.graph.output]
        self.network.onnx_path = path
        return not self.errors


class IOptimizationProfile:
    def __init__(self) -> None:
        self.shapes: dict[str, tuple[tuple[int, ...], ...]] = {}

    def set_shape(self, name: str, min, opt, max) -> None:
        self.shapes[name] = (tuple(min), tuple(opt), tuple(max))

    def valid(self) -> bool:
        return all(len(lo) == len(opt) == len(hi) and all(a <= b <= c for a, b, c in zip(lo, opt, hi, strict=True))
                   for lo, opt, hi in self.shapes.values())


class IBuilderConfig:
    def __init__(self) -> None:
        self.flags: set[BuilderFlag] = set()
        self.profiles: list[IOptimizationProfile] = []
        self.pools: dict = {}

    def set_flag(self, flag: BuilderFlag) -> None:
        self.flags.add(flag)

    def set_memory_pool_limit(self, pool: MemoryPoolType, size: int) -> None:
        self.pools[pool] = size

    def add_optimization_profile(self, profile: IOptimizationProfile) -> int:
        if not profile.valid():
            _log("[E] optimization profile is invalid: min <= opt <= max broken")
            return -1
        self.profiles.append(profile)
        return len(self.profiles) - 1


class Builder:
    def __init__(self, logger: Logger) -> None:
        self.logger = logger

    def get_plugin_registry(self) -> IPluginRegistry:
        return _REGISTRY

    def create_network(self, flags: int = 0) -> INetworkDefinition:
        return INetworkDefinition(flags)

    def create_builder_config(self) -> IBuilderConfig:
        return IBuilderConfig()

    def create_optimization_profile(self) -> IOptimizationProfile:
        return IOptimizationProfile()

    def build_serialized_network(self, network: INetworkDefinition, config: IBuilderConfig):
        def fail(why: str):
            _log(f"[E] build: {why}")
            return None

        if network.onnx_path is None:
            return fail("the network is empty (parse failed or never ran)")
        if not config.profiles:
            return fail("a network with dynamic shapes needs an optimization profile")
        for p, profile in enumerate(config.profiles):
            for tensor in network.inputs:
                if tensor.name not in profile.shapes:
                    return fail(f"profile {p} sets no shape for input {tensor.name}")
                for lo, hi, declared in zip(profile.shapes[tensor.name][0], profile.shapes[tensor.name][2],
                                            tensor.shape, strict=True):
                    if declared >= 0 and not lo == hi == declared:
                        return fail(f"profile {p}: {tensor.name} has the fixed size {declared}")
        if network.bf16 and not network.strongly_typed and BuilderFlag.BF16 not in config.flags:
            return fail("bf16 tensors in a weakly typed network need BuilderFlag.BF16")
        blob = {"stand-in": "strict_tensorrt", "onnx": network.onnx_path, "plugin_nodes": network.plugin_nodes,
                "inputs": {t.name: t.dtype.name for t in network.inputs},
                "outputs": {t.name: t.dtype.name for t in network.outputs},
                "profiles": [{n: [list(s) for s in v] for n, v in prof.shapes.items()} for prof in config.profiles]}
        return json.dumps(blob).encode()


class Runtime:
    def __init__(self, logger: Logger) -> None:
        self.logger = logger

    def get_plugin_registry(self) -> IPluginRegistry:
        return _REGISTRY

    def deserialize_cuda_engine(self, blob: bytes):
        try:
            spec = json.loads(bytes(blob))
        except (UnicodeDecodeError, json.JSONDecodeError):
            _log("[E] deserialize: not an engine of this TensorRT")
            return None
        if spec.get("plugin_nodes") and _REGISTRY.get_creator("RoutedSparseMatMul", "1", "") is None:
            _log("[E] deserialize: plugin creator RoutedSparseMatMul v1 not found")
            return None
        return ICudaEngine(spec)


class ICudaEngine:
    def __init__(self, spec: dict) -> None:
        import onnxruntime as ort

        from se_export.backends.ort_runtime import ort_library

        self.spec = spec
        self.names = list(spec["inputs"]) + list(spec["outputs"])
        opts = ort.SessionOptions()
        opts.register_custom_ops_library(str(ort_library()))
        onnx_file = Path(spec["onnx"]).with_name("model.onnx")  # the export the TensorRT form came from
        self.session = ort.InferenceSession(str(onnx_file), opts, providers=["CPUExecutionProvider"])
        self.busy_profiles: set[int] = set()
        self.shape_cache: dict = {}

    @property
    def num_optimization_profiles(self) -> int:
        return len(self.spec["profiles"])

    @property
    def num_io_tensors(self) -> int:
        return len(self.names)

    def get_tensor_name(self, i: int) -> str:
        return self.names[i]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        return TensorIOMode.INPUT if name in self.spec["inputs"] else TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name: str) -> DataType:
        return DataType[{**self.spec["inputs"], **self.spec["outputs"]}[name]]

    def get_tensor_profile_shape(self, name: str, profile: int):
        return [tuple(s) for s in self.spec["profiles"][profile][name]]

    def create_execution_context(self) -> IExecutionContext:
        return IExecutionContext(self)

    def output_shapes(self, input_shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        """What the graph makes of inputs of these shapes (computed once per shape set)."""
        key = tuple(sorted(input_shapes.items()))
        if key not in self.shape_cache:
            feeds = {n: np.ones(s, np.dtype(self.get_tensor_dtype(n).value)) if "mask" in n
                     else np.zeros(s, np.dtype(self.get_tensor_dtype(n).value)) for n, s in input_shapes.items()}
            outs = self.session.run(list(self.spec["outputs"]), feeds)
            self.shape_cache[key] = {n: o.shape for n, o in zip(self.spec["outputs"], outs, strict=True)}
        return self.shape_cache[key]


class IExecutionContext:
    def __init__(self, engine: ICudaEngine) -> None:
        self.engine, self.profile = engine, None
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.streams: list[int] = []

    def set_optimization_profile_async(self, profile: int, stream: int) -> bool:
        if not 0 <= profile < self.engine.num_optimization_profiles or profile in self.engine.busy_profiles:
            _log(f"[E] profile {profile} is out of range or used by another context")
            return False
        self.engine.busy_profiles.discard(self.profile)
        self.engine.busy_profiles.add(profile)
        self.profile = profile
        return True

    def set_input_shape(self, name: str, shape) -> bool:
        if self.engine.get_tensor_mode(name) != TensorIOMode.INPUT or self.profile is None:
            _log(f"[E] set_input_shape: {name} is not an input, or no profile is selected")
            return False
        lo, _, hi = self.engine.get_tensor_profile_shape(name, self.profile)
        shape = tuple(int(d) for d in shape)
        if len(shape) != len(lo) or any(not a <= d <= b for a, d, b in zip(lo, shape, hi, strict=True)):
            _log(f"[E] set_input_shape: {name} {shape} is outside profile {self.profile} ({lo} .. {hi})")
            return False
        self.shapes[name] = shape
        return True

    def set_tensor_address(self, name: str, address: int) -> bool:
        if name not in self.engine.names:
            _log(f"[E] set_tensor_address: no tensor {name}")
            return False
        self.addresses[name] = int(address)
        return True

    def _inputs_complete(self) -> bool:
        return all(n in self.shapes for n in self.engine.spec["inputs"])

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        if self.engine.get_tensor_mode(name) == TensorIOMode.INPUT:
            return self.shapes.get(name, (-1,))
        if not self._inputs_complete():
            return (-1,)
        return self.engine.output_shapes(self.shapes)[name]

    def execute_async_v3(self, stream_handle: int) -> bool:
        self.streams.append(int(stream_handle))
        for name in self.engine.spec["inputs"]:
            if name not in self.shapes:
                _log(f"[E] enqueueV3: input {name} has no shape")
                return False
            if not self.addresses.get(name):
                _log(f"[E] enqueueV3: input {name} is bound to a null address")
                return False
        for name in self.engine.spec["outputs"]:
            if not self.addresses.get(name):
                _log(f"[E] enqueueV3: output {name} has no address")
                return False
        feeds = {n: _read(self.addresses[n], self.shapes[n], self.engine.get_tensor_dtype(n))
                 for n in self.engine.spec["inputs"]}
        outs = self.engine.session.run(list(self.engine.spec["outputs"]), feeds)
        for name, value in zip(self.engine.spec["outputs"], outs, strict=True):
            dtype = np.dtype(self.engine.get_tensor_dtype(name).value)
            data = np.ascontiguousarray(value.astype(dtype))
            ctypes.memmove(self.addresses[name], data.ctypes.data, data.nbytes)
        return True


def _read(address: int, shape: tuple[int, ...], dtype: DataType) -> np.ndarray:
    """A copy of the bound memory as an array (zero elements: nothing is read, the address need only
    be non-null)."""
    np_dtype = np.dtype(dtype.value)
    count = int(np.prod(shape))
    if count == 0:
        return np.zeros(shape, np_dtype)
    buffer = (ctypes.c_char * (count * np_dtype.itemsize)).from_address(address)
    return np.frombuffer(buffer, np_dtype).reshape(shape).copy()
