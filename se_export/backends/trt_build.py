"""``se-export trt``: build a TensorRT engine from an ``se-export onnx`` folder.

The graph is first rewritten into TensorRT's form (``trt_onnx``), our plugin library is loaded
into the builder's registry (``RoutedSparseMatMul`` v1), and two optimization profiles are made:
prefill (many tokens, tuned at ``opt_seq``) and decode (one token, tuned at ``opt_past``), so one
engine serves both phases. TensorRT 10 builds fp16 from an fp32 graph with the kFP16 flag;
TensorRT 11 removed weak typing, so it builds strongly typed and fp16 needs an fp16 export.
"""

from __future__ import annotations

import json
import shlex
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..atomic import atomic_path, atomic_write_text
from ..errors import SEError
from ..export.onnx_export import MODEL_FILE, read_onnx_manifest
from ..export.trt_onnx import prepare_for_tensorrt
from .kernels import find_library

TRT_PLUGIN_LIB = "libse_trt_plugin.so"
TRT_AUTOLOAD_LIB = "libse_trt_plugin_autoload.so"  # registers the plugin on a plain dlopen (polygraphy --plugins)
TRT_ONNX_FILE = "model.trt.onnx"
DEFAULT_ENGINE = "model.engine"  # se-export trt's --out default, inside the ONNX folder
PLUGIN_NAME, PLUGIN_VERSION = "RoutedSparseMatMul", "1"  # plugins/trt/routedSparseMatMulPlugin


DEFAULT_MAX_BATCH = 3  # validate compares a batch of 3 prompts; larger batches are split to fit
DEFAULT_OPT_SEQ, DEFAULT_OPT_PAST = 128, 256


@dataclass(frozen=True)
class ShapeRanges:
    """Batch, prompt and cache ranges of the two profiles (tokens). An ``opt_*`` left at None is
    its default capped at the maximum, so ``--max-seq 64`` alone is a valid range."""

    max_batch: int = DEFAULT_MAX_BATCH
    opt_seq: int | None = None
    max_seq: int = 512
    opt_past: int | None = None
    max_past: int = 1024

    def __post_init__(self) -> None:
        if self.opt_seq is None:
            object.__setattr__(self, "opt_seq", min(DEFAULT_OPT_SEQ, self.max_seq))
        if self.opt_past is None:
            object.__setattr__(self, "opt_past", min(DEFAULT_OPT_PAST, self.max_past))

    def check(self) -> None:
        for opt, hi, name in ((self.opt_seq, self.max_seq, "seq"), (self.opt_past, self.max_past, "past")):
            if not 1 <= opt <= hi:
                raise SEError(f"bad shape ranges: --opt-{name} {opt} must be between 1 and --max-{name} {hi}")
        if self.max_batch < 1:
            raise SEError(f"bad shape ranges: --max-batch {self.max_batch} must be >= 1")


def profiles(manifest: dict, r: ShapeRanges) -> list[dict[str, tuple[tuple[int, ...], ...]]]:
    """``[prefill, decode]``, each ``{input: (min, opt, max)}`` in the export's I/O names."""
    heads, dim = manifest["num_kv_heads"], manifest["head_dim"]

    def one(seq: tuple[int, int, int], past: tuple[int, int, int]) -> dict:
        batch = (1, 1, r.max_batch)
        shapes = {"input_ids": tuple((batch[i], seq[i]) for i in range(3)),
                  "attention_mask": tuple((batch[i], seq[i] + past[i]) for i in range(3))}
        if manifest.get("uses_position_ids"):
            shapes["position_ids"] = shapes["input_ids"]
        for name in manifest["inputs"]:
            if name.startswith("past_key_values."):
                shapes[name] = tuple((batch[i], heads, past[i], dim) for i in range(3))
        return shapes

    return [one((1, r.opt_seq, r.max_seq), (0, 0, r.max_past)), one((1, 1, 1), (1, r.opt_past, r.max_past))]


def trtexec_command(onnx_path: Path, engine: Path, plugin: Path, fp16: bool, profile: dict,
                    strongly_typed: bool = False) -> str:
    """The equivalent trtexec line. It names one profile: the prefill one, which covers decode too
    (past 0..max), without the decode-tuned second profile that the Python build adds. A strongly
    typed build (an fp16 export; every build on TensorRT 11) is ``--stronglyTyped``: the tensor
    types come from the graph, and TensorRT 11's trtexec has no ``--fp16``; a weakly typed fp16
    build of an fp32 export (TensorRT 10) is ``--fp16``."""
    def shapes(k: int) -> str:
        return ",".join(f"{name}:{'x'.join(map(str, s[k]))}" for name, s in profile.items())

    args = ["trtexec", f"--onnx={onnx_path}", f"--saveEngine={engine}", f"--dynamicPlugins={plugin}",
            f"--minShapes={shapes(0)}", f"--optShapes={shapes(1)}", f"--maxShapes={shapes(2)}"]
    if strongly_typed:
        args.append("--stronglyTyped")
    elif fp16:
        args.append("--fp16")
    return shlex.join(args)


def polygraphy_commands(trt_onnx: Path, autoload: Path, profile: dict, fp16: bool, strongly_typed: bool) -> list[str]:
    """Polygraphy's parity check of the engine, at the decode profile's tuned shapes. Polygraphy's
    ONNX Runtime runner cannot register our op library, so the reference is a ``--portable``
    export of the same checkpoint (standard ops; the same inputs and outputs), whose inputs and
    outputs the TensorRT run then loads (its profile is the loaded inputs' shapes). ``--plugins``
    only dlopens a library: the autoload one registers the plugin when it is. Attention masks are
    all ones (random 0/1 masks can mask a whole row)."""
    shapes = [f"{name}:[{','.join(map(str, s[1]))}]" for name, s in profile.items()]
    reference = ["polygraphy", "run", "PORTABLE_EXPORT/model.onnx", "--onnxrt", "--input-shapes", *shapes,
                 "--val-range", "attention_mask:[1,1]", "--save-inputs", "se_inputs.json", "--save-outputs", "se_ort.json"]
    engine = ["polygraphy", "run", str(trt_onnx), "--trt", "--plugins", str(autoload), "--load-inputs", "se_inputs.json",
              "--load-outputs", "se_ort.json"]
    engine += ["--strongly-typed"] if strongly_typed else ["--fp16"] if fp16 else []
    return [shlex.join(reference) + "   # PORTABLE_EXPORT: se-export onnx CKPT --out DIR --portable",
            shlex.join(engine)]


def plugin_library(explicit: Path | None) -> Path:
    if explicit is not None:
        if not explicit.is_file():
            raise SEError(f"plugin library {explicit} does not exist: build it with `make plugins`")
        return explicit
    found = find_library(TRT_PLUGIN_LIB)
    if found is None:
        raise SEError(f"{TRT_PLUGIN_LIB} is not built (it needs nvcc): run `make plugins` on a machine with the CUDA "
                      "toolkit, or pass --plugin PATH")
    return found


def load_plugin(registry, lib: Path) -> None:
    """Make our creators available in ``registry`` (a builder's or runtime's; TensorRT keeps one per
    process). A creator that is already there is success: a second ``load_library`` of the same
    library may fail because its creators are registered. A failed load is an error, not a
    warning to miss before the parser or the engine fails further on."""
    if plugin_registered(registry):
        return
    if registry.load_library(str(lib)) is None or not plugin_registered(registry):
        raise SEError(f"TensorRT could not load the plugin library {lib} (see the TensorRT log above): rebuild it "
                      "with `make plugins` against this TensorRT version, or pass --plugin PATH")


def plugin_registered(registry) -> bool:
    """Whether RoutedSparseMatMul v1 is in ``registry`` (IPluginRegistry.get_creator, TensorRT 10+)."""
    return registry.get_creator(PLUGIN_NAME, PLUGIN_VERSION, "") is not None


def import_tensorrt():
    """The tensorrt module, or a one-line SEError saying how to get it."""
    try:
        import tensorrt as trt
    except ImportError:
        raise SEError("the tensorrt Python module is not installed: install TensorRT 10 (pip install tensorrt, from "
                      "NVIDIA's index, on a machine with a CUDA GPU), or run the trtexec line printed by --dry-run"
                      ) from None
    return trt


def require_gpu() -> None:
    """A one-line error unless torch sees a CUDA GPU (the Python builder and runtime hold tensors in
    torch). On Jetson the PyPI torch wheel is CPU-only: the message says which torch to install."""
    import torch

    if torch.cuda.is_available():
        return
    if Path("/etc/nv_tegra_release").exists() or torch.version.cuda is None:
        raise SEError(f"this PyTorch ({torch.__version__}) has no CUDA support: the Python TensorRT path needs a "
                      "CUDA-enabled torch (on Jetson, NVIDIA's torch wheel for your JetPack, not PyPI's CPU-only "
                      "one), or run the engine with the C++ runtime build/cpp_runtime/se_runtime")
    raise SEError("no CUDA GPU is visible: TensorRT builds and runs engines on the GPU they target "
                  "(use --dry-run to print the trtexec line for another machine)")


def build_engine(onnx_dir: Path, engine: Path, *, fp16: bool = False, plugin: Path | None = None,
                 ranges: ShapeRanges = ShapeRanges(), workspace_gb: float = 4.0, dry_run: bool = False,
                 log=print) -> dict:
    """Prepare the graph, print the trtexec equivalent, build and save the engine atomically."""
    ranges.check()
    manifest = read_onnx_manifest(onnx_dir)
    trt = None
    if not dry_run:  # fail fast, before rewriting a large graph
        trt = import_tensorrt()
        require_gpu()
    needs_plugin = manifest.get("custom_op_nodes", 0) > 0
    lib = plugin_library(plugin) if needs_plugin else None
    trt_onnx = onnx_dir / TRT_ONNX_FILE
    x_dtype = "fp16" if fp16 or manifest["dtype"] == "fp16" else "fp32"  # what the plugins compute in
    stats = prepare_for_tensorrt(onnx_dir / MODEL_FILE, trt_onnx, x_dtype=x_dtype)
    log(f"TensorRT form of the graph: {trt_onnx} ({stats['nodes']} RoutedSparseMatMul nodes, "
        f"{stats['indices_packed']} index tensors as int32 words"
        + (f", {stats['quantized']} with int8/int4 codes as int32 words" if stats["quantized"] else "") + ")")
    trt_major = None if trt is None else int(trt.__version__.split(".")[0])
    strongly_typed = manifest["dtype"] == "fp16" or (trt_major or 0) >= 11  # TensorRT 11 has no weak typing
    log("equivalent: " + trtexec_command(trt_onnx, engine, lib or Path("<none>"), fp16,
                                         profiles(manifest, ranges)[0], strongly_typed))
    if lib is not None:
        for line in polygraphy_commands(trt_onnx, lib.with_name(TRT_AUTOLOAD_LIB), profiles(manifest, ranges)[1],
                                        fp16, strongly_typed):
            log("parity: " + line)
    if trt is None:
        return {"engine": None, "trt_onnx": str(trt_onnx), **stats}
    major = trt_major
    if fp16 and major >= 11 and manifest["dtype"] != "fp16":
        raise SEError("TensorRT 11 builds strongly typed networks only: export with se-export onnx --dtype fp16 "
                      "and build that folder (--fp16 is implied)")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    if lib is not None:
        load_plugin(builder.get_plugin_registry(), lib)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(trt_onnx)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise SEError(f"TensorRT cannot parse {trt_onnx}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if fp16 and not strongly_typed:
        config.set_flag(trt.BuilderFlag.FP16)
    if stats["bf16_values"] and not strongly_typed:  # bf16 expert values are refused without the flag
        config.set_flag(trt.BuilderFlag.BF16)
    for shapes in profiles(manifest, ranges):
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes.items():
            profile.set_shape(name, lo, opt, hi)
        if config.add_optimization_profile(profile) < 0:
            raise SEError(f"TensorRT refused an optimization profile ({shapes}): check --max-seq/--max-past")
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise SEError("TensorRT could not build the engine (see the TensorRT log above)")
    info = {"engine": str(engine), "trt_onnx": str(trt_onnx), "tensorrt": trt.__version__,
            "build_seconds": round(time.perf_counter() - start, 1), "fp16": fp16 or manifest["dtype"] == "fp16",
            "plugin": str(lib) if lib else None, "ranges": asdict(ranges), **stats}
    with atomic_path(engine) as tmp:
        tmp.write_bytes(bytes(serialized))
    atomic_write_text(engine_info_path(engine), json.dumps(info, indent=1))
    return info


def read_engine_info(engine: Path) -> dict:
    """The build facts ``se-export trt`` kept beside ``engine`` ({} for an engine built elsewhere)."""
    path = engine_info_path(Path(engine))
    return json.loads(path.read_text()) if path.is_file() else {}


def engine_info_path(engine: Path) -> Path:
    """Build facts kept beside the engine (precision, plugin, ranges) for validate and bench."""
    return engine.with_name(engine.name + ".json")
