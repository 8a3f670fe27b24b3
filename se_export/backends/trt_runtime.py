"""A TensorRT engine of ``se-export trt`` as a step model (same interface as ``OrtCausalLM``), so
``validate --backend trt`` runs the same checks. Tensors live on the GPU through torch; the
profile whose range covers a step with the smallest maximum sequence is used (decode for one
token, prefill otherwise)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import SEError
from ..export.onnx_export import read_onnx_manifest
from .ort_runtime import StepModel
from .trt_build import engine_info_path, import_tensorrt, plugin_library, require_gpu


class TrtCausalLM(StepModel):
    def __init__(self, folder: Path, engine: Path, plugin: Path | None = None) -> None:
        import torch

        trt = import_tensorrt()
        require_gpu()
        self.torch, self.trt = torch, trt
        self.manifest = read_onnx_manifest(folder)
        if not Path(engine).is_file():
            raise SEError(f"no engine at {engine}: build one with se-export trt {folder} --out {engine}")
        info_path = engine_info_path(Path(engine))
        self.info = json.loads(info_path.read_text()) if info_path.is_file() else {}
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        if self.manifest.get("custom_op_nodes", 0) > 0:
            lib = plugin or (Path(self.info["plugin"]) if self.info.get("plugin") else None)
            self.runtime.get_plugin_registry().load_library(str(plugin_library(lib)))
        self.engine = self.runtime.deserialize_cuda_engine(Path(engine).read_bytes())
        if self.engine is None:
            raise SEError(f"TensorRT cannot load {engine}: built by another TensorRT version or for another GPU?")
        self.stream = torch.cuda.Stream()
        self.contexts = []
        for p in range(self.engine.num_optimization_profiles):
            ctx = self.engine.create_execution_context()
            ctx.set_optimization_profile_async(p, self.stream.cuda_stream)
            self.contexts.append(ctx)
        self.layers = self.manifest["num_layers"]
        self.kv_heads = self.manifest["num_kv_heads"]
        self.head_dim = self.manifest["head_dim"]
        self.fp16 = bool(self.info.get("fp16")) or self.manifest["dtype"] == "fp16"

    def _torch_dtype(self, name: str):
        trt, torch = self.trt, self.torch
        table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.INT32: torch.int32,
                 trt.DataType.INT64: torch.int64, trt.DataType.BF16: torch.bfloat16}
        return table[self.engine.get_tensor_dtype(name)]

    def _context(self, seq: int, past: int):
        best, best_max = None, None
        for p, ctx in enumerate(self.contexts):
            lo, _, hi = self.engine.get_tensor_profile_shape("input_ids", p)
            ok = lo[1] <= seq <= hi[1]
            if ok and self.layers:
                plo, _, phi = self.engine.get_tensor_profile_shape("past_key_values.0.key", p)
                ok = plo[2] <= past <= phi[2]
            if ok and (best_max is None or hi[1] < best_max):
                best, best_max = ctx, hi[1]
        if best is None:
            raise SEError(f"no optimization profile of the engine covers seq={seq}, past={past}: rebuild with larger "
                          "--max-seq/--max-past")
        return best

    def run(self, input_ids, past=None, attention_mask=None):
        torch, trt = self.torch, self.trt
        seq, past_len = input_ids.shape[1], past[0].shape[2] if past else 0
        device = {name: torch.from_numpy(np.ascontiguousarray(v)).cuda().to(self._torch_dtype(name)).contiguous()
                  for name, v in self.feeds(input_ids, past, attention_mask).items()}
        ctx = self._context(seq, past_len)
        for name, tensor in device.items():
            ctx.set_input_shape(name, tuple(tensor.shape))
            ctx.set_tensor_address(name, tensor.data_ptr())
        outputs = {}
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            if self.engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT:
                shape = tuple(ctx.get_tensor_shape(name))
                outputs[name] = torch.empty(shape, dtype=self._torch_dtype(name), device="cuda")
                ctx.set_tensor_address(name, outputs[name].data_ptr())
        if not ctx.execute_async_v3(self.stream.cuda_stream):
            raise SEError("TensorRT execution failed (see the TensorRT log)")
        self.stream.synchronize()
        host = {name: t.float().cpu().numpy() if t.dtype in (torch.float16, torch.bfloat16) else t.cpu().numpy()
                for name, t in outputs.items()}
        present = [host[f"present.{i}.{kind}"] for i in range(self.layers) for kind in ("key", "value")]
        return host["logits"], present, {}
