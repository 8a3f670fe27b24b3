"""Shared fixtures: tiny random models of both MLP families, a byte-level tokenizer, and text."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch


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
    from se_export.sparse_format import pack_experts

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
