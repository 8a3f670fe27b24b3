"""A TensorRT engine of ``se-export trt`` as a step model (same interface as ``OrtCausalLM``), so
``validate --backend trt`` runs the same checks.

Tensors live on the GPU through torch. The profile whose range covers a step with the smallest
maximum sequence is used (decode for one token, prefill otherwise); a batch larger than the
profiles' is run in slices that fit. The rules of the TensorRT API this follows (each return value
checked, every input bound to a non-null address, shapes within the selected profile, conversions
and the engine on one stream) are enforced by the strict stand-in the tests drive it with.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import SEError
from ..export.onnx_export import read_onnx_manifest
from .ort_runtime import StepModel
from .trt_build import import_tensorrt, load_plugin, plugin_library, read_engine_info, require_gpu


def runtime_device() -> str:
    """Where the runtime's tensors live: the GPU (the tests' stand-in of TensorRT uses the CPU)."""
    return "cuda"


class TrtCausalLM(StepModel):
    def __init__(self, folder: Path, engine: Path, plugin: Path | None = None) -> None:
        import torch

        trt = import_tensorrt()
        require_gpu()
        self.torch, self.trt = torch, trt
        self.device = runtime_device()
        self.manifest = read_onnx_manifest(folder)
        if not Path(engine).is_file():
            raise SEError(f"no engine at {engine}: build one with se-export trt {folder} --out {engine}")
        self.info = read_engine_info(Path(engine))
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        if self.manifest.get("custom_op_nodes", 0) > 0:
            lib = plugin or (Path(self.info["plugin"]) if self.info.get("plugin") else None)
            load_plugin(self.runtime.get_plugin_registry(), plugin_library(lib))
        self.engine = self.runtime.deserialize_cuda_engine(Path(engine).read_bytes())
        if self.engine is None:
            raise SEError(f"TensorRT cannot load {engine}: built by another TensorRT version or for another GPU?")
        self.contexts = []
        for p in range(self.engine.num_optimization_profiles):
            ctx = self.engine.create_execution_context()
            if ctx is None:
                raise SEError("TensorRT could not create an execution context (out of GPU memory?)")
            if not ctx.set_optimization_profile_async(p, self._stream_handle()):
                raise SEError(f"TensorRT refused optimization profile {p} of {engine}")
            self.contexts.append(ctx)
        self.layers = self.manifest["num_layers"]
        self.kv_heads = self.manifest["num_kv_heads"]
        self.head_dim = self.manifest["head_dim"]
        self.fp16 = bool(self.info.get("fp16")) or self.manifest["dtype"] == "fp16"
        # TensorRT wants a non-null address for every input, and torch gives zero-element tensors
        # (the empty KV cache of a prefill) none: they are bound to this buffer instead
        self._placeholder = torch.zeros(64, dtype=torch.uint8, device=self.device)

    def _stream_handle(self) -> int:
        """torch's current stream: the input conversions are queued there, so the engine runs after
        them, and reading the outputs back waits for it (one stream, no race)."""
        return self.torch.cuda.current_stream().cuda_stream if self.device == "cuda" else 0

    def _torch_dtype(self, name: str):
        trt, torch = self.trt, self.torch
        table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.INT32: torch.int32,
                 trt.DataType.INT64: torch.int64, trt.DataType.BF16: torch.bfloat16}
        return table[self.engine.get_tensor_dtype(name)]

    def max_batch(self) -> int:
        """The largest batch every profile takes."""
        return min(int(self.engine.get_tensor_profile_shape("input_ids", p)[2][0]) for p in range(len(self.contexts)))

    def _context(self, batch: int, seq: int, past: int):
        best, best_max = None, None
        for p, ctx in enumerate(self.contexts):
            lo, _, hi = self.engine.get_tensor_profile_shape("input_ids", p)
            ok = lo[0] <= batch <= hi[0] and lo[1] <= seq <= hi[1]
            if ok and self.layers:
                plo, _, phi = self.engine.get_tensor_profile_shape("past_key_values.0.key", p)
                ok = plo[2] <= past <= phi[2]
            if ok and (best_max is None or hi[1] < best_max):
                best, best_max = ctx, hi[1]
        if best is None:
            raise SEError(f"no optimization profile of the engine covers batch={batch}, seq={seq}, past={past}: "
                          "rebuild with se-export trt --max-batch/--max-seq/--max-past large enough")
        return best

    def run(self, input_ids, past=None, attention_mask=None):
        batch, limit = input_ids.shape[0], self.max_batch()
        if batch <= limit:
            return self._run(input_ids, past, attention_mask)
        parts = [self._run(input_ids[i:i + limit], None if past is None else [t[i:i + limit] for t in past],
                           None if attention_mask is None else attention_mask[i:i + limit])
                 for i in range(0, batch, limit)]
        logits = np.concatenate([p[0] for p in parts])
        present = [np.concatenate([p[1][j] for p in parts]) for j in range(len(parts[0][1]))]
        return logits, present, {}

    def _bind(self, ctx, name: str, tensor) -> None:
        address = tensor.data_ptr() if tensor.numel() else self._placeholder.data_ptr()
        if not ctx.set_tensor_address(name, address):
            raise SEError(f"TensorRT refused the address of {name}")

    def _run(self, input_ids, past, attention_mask):
        torch, trt = self.torch, self.trt
        seq, past_len = input_ids.shape[1], past[0].shape[2] if past else 0
        device = {name: torch.from_numpy(np.ascontiguousarray(v)).to(self.device).to(self._torch_dtype(name))
                  .contiguous() for name, v in self.feeds(input_ids, past, attention_mask).items()}
        ctx = self._context(input_ids.shape[0], seq, past_len)
        for name, tensor in device.items():
            if not ctx.set_input_shape(name, tuple(tensor.shape)):
                raise SEError(f"TensorRT refused input {name} of shape {tuple(tensor.shape)}: outside the engine's "
                              "profiles; rebuild with se-export trt --max-batch/--max-seq/--max-past")
            self._bind(ctx, name, tensor)
        outputs = {}
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            if self.engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT:
                shape = tuple(ctx.get_tensor_shape(name))
                if any(d < 0 for d in shape):
                    raise SEError(f"TensorRT cannot tell the shape of output {name} ({shape}): an input is unset")
                outputs[name] = torch.empty(shape, dtype=self._torch_dtype(name), device=self.device)
                self._bind(ctx, name, outputs[name])
        if not ctx.execute_async_v3(self._stream_handle()):
            raise SEError("TensorRT execution failed (see the TensorRT log)")
        if self.device == "cuda":
            torch.cuda.current_stream().synchronize()
        host = {name: t.float().cpu().numpy() if t.dtype in (torch.float16, torch.bfloat16) else t.cpu().numpy()
                for name, t in outputs.items()}
        present = [host[f"present.{i}.{kind}"] for i in range(self.layers) for kind in ("key", "value")]
        return host["logits"], present, {}
