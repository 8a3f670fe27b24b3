"""Shared fixtures: tiny random models of both MLP families, a byte-level tokenizer, and text."""

from __future__ import annotations

import random
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from se_export.backends.ort_runtime import ort_library
from se_export.export import onnx_schema


def pytest_configure(config) -> None:
    """Under pytest-xdist, split the cores between the workers: two workers with every core each
    would spin OpenMP threads against each other."""
    import os

    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))

def random_experts(seed: int, k: int, out: int, inn: int, fmt: str, vdtype: torch.dtype, density: float = 0.5):
    """Packed random experts keeping about ``density`` of their weights, a random router, and the
    generator that drew them (for the activations)."""
    from se_export.formats.sparse_format import pack_experts

    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(k, out, inn, generator=gen) < density
    packed = pack_experts(torch.randn(k, out, inn, generator=gen) * mask, mask, fmt, vdtype)
    return packed, torch.randn(inn, k, generator=gen), torch.randn(k, generator=gen), gen


WORDS = ["the", "of", "and", "to", "in", "is", "was", "for", "on", "as", "with", "by", "at", "from", "his", "her", "an", "are", "which", "that", "this", "river", "city", "king", "war", "music", "film", "song", "team", "game", "church", "school", "ship", "army", "party", "island", "north", "south", "east", "west", "old", "new", "great", "small", "first", "second", "early", "late", "long", "short", "high"]


def make_text(n_words: int, seed: int) -> str:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_words // 12):
        lines.append(" ".join(rng.choice(WORDS) for _ in range(12)) + ".")
    return "\n".join(lines)


def make_tokenizer(tmp: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([make_text(3000, 1)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def tiny_config(family: str, vocab: int):
    from transformers import AutoConfig

    if family == "llama":
        return AutoConfig.for_model("llama", vocab_size=vocab, hidden_size=64, intermediate_size=96,
                                    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                    max_position_embeddings=256, tie_word_embeddings=True)
    if family == "gpt_neox":
        return AutoConfig.for_model("gpt_neox", vocab_size=vocab, hidden_size=64, intermediate_size=128,
                                    num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=256,
                                    rotary_pct=0.25)
    if family in ("qwen2", "mistral", "gemma"):
        return AutoConfig.for_model(family, vocab_size=vocab, hidden_size=64, intermediate_size=96,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                    head_dim=16, max_position_embeddings=256)
    if family == "opt":
        return AutoConfig.for_model("opt", vocab_size=vocab, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                    num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=64)
    if family == "gpt2":
        return AutoConfig.for_model("gpt2", vocab_size=vocab, n_embd=64, n_inner=128, n_layer=2, n_head=4,
                                    n_positions=256)
    raise ValueError(family)


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "calib.txt"
    path.write_text(make_text(6000, 2))
    return path


@pytest.fixture(scope="session")
def eval_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "eval.txt"
    path.write_text(make_text(3000, 3))
    return path


def build_tiny_model(family: str, tokenizer, folder: Path | None = None, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, len(tokenizer)), dtype=torch.float32)
    model.eval()
    if folder is not None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return model


@pytest.fixture(scope="session", params=["llama", "gpt_neox"])
def tiny_model_dir(request, tmp_path_factory, tiny_tokenizer) -> Path:
    folder = tmp_path_factory.mktemp(f"tiny-{request.param}")
    build_tiny_model(request.param, tiny_tokenizer, folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama-only")
    build_tiny_model("llama", tiny_tokenizer, folder)
    return folder


# ------------------------------------------------------------------ one custom-op node in ONNX Runtime


def _tensor(t: torch.Tensor, name: str) -> onnx.TensorProto:
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: pass the raw bits
        return helper.make_tensor(name, TensorProto.BFLOAT16, list(t.shape), t.view(torch.int16).numpy().tobytes(), raw=True)
    return numpy_helper.from_array(t.numpy(), name)


def single_node_model(packed, g, b, bias, with_ids: bool, x_type=TensorProto.FLOAT) -> onnx.ModelProto:
    """One RoutedSparseMatMul node with its weights as initializers (checked by onnx.checker)."""
    inits = [_tensor(t, n) for t, n in
             [(g, "G"), (b, "b"), (packed.values, "values"), (packed.indices, "indices"), (packed.row_ptr, "row_ptr")]]
    inputs = ["x", "G", "b", "values", "indices", "row_ptr"]
    if bias is not None or with_ids:
        bias_t = bias if bias is not None else torch.zeros(0)
        inits.append(numpy_helper.from_array(bias_t.numpy(), "bias"))
        inputs.append("bias")
    graph_inputs = [helper.make_tensor_value_info("x", x_type, ["T", packed.in_features])]
    if with_ids:
        inputs.append("ids")
        graph_inputs.append(helper.make_tensor_value_info("ids", TensorProto.INT32, ["T"]))
    node = helper.make_node("RoutedSparseMatMul", inputs, ["y", "ids_out"], domain="se",
                            out_features=packed.out_features, format=packed.format)
    outputs = [helper.make_tensor_value_info("y", x_type, ["T", packed.out_features]),
               helper.make_tensor_value_info("ids_out", TensorProto.INT32, ["T"])]
    graph = helper.make_graph([node], "one", graph_inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("se", 1)],
                              ir_version=10)
    onnx_schema.register()
    onnx.checker.check_model(model, full_check=True)
    return model


def ort_session(model: onnx.ModelProto) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.register_custom_ops_library(str(ort_library()))
    return ort.InferenceSession(model.SerializeToString(), opts)
