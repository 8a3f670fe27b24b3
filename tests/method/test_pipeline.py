"""End-to-end expansion on tiny random models of both MLP families (CPU, seconds)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import build_tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import se_export
import se_export.method.expand as expand_mod
from se_export.adapters import ADAPTERS
from se_export.data import Text, calibration_windows, tokenize
from se_export.errors import SEError
from se_export.formats import checkpoint
from se_export.formats.checkpoint import MANIFEST, WEIGHTS, save_checkpoint
from se_export.formats.partial import prepare_workdir
from se_export.method.capture import layer_output, stack_rows
from se_export.method.expand import ExpandConfig, ExpansionInterrupted, expand_model
from se_export.modeling.modules import RoutedSparseLinear

FAMILIES = ["llama", "gpt_neox"]


@pytest.fixture(scope="module")
def calib(tiny_tokenizer, calib_file):
    ids = tokenize(tiny_tokenizer, Text("calib", calib_file.read_text()))
    return calibration_windows(ids, 12, 48, seed=0)


def _cfg(**kw) -> ExpandConfig:
    base = {"experts": 4, "min_cluster_tokens": 8, "batch_size": 4}
    return ExpandConfig(**{**base, **kw})


def _expand(family, tokenizer, calib, **kw):
    model = build_tiny_model(family, tokenizer)
    result = expand_model(model, calib, _cfg(**kw), show_progress=False)
    return model, result


@pytest.mark.parametrize("family", FAMILIES)
def test_every_mlp_linear_is_expanded_with_exact_sparsity(family, tiny_tokenizer, calib):
    model, result = _expand(family, tiny_tokenizer, calib)
    mods = [m for m in model.modules() if isinstance(m, RoutedSparseLinear)]
    assert len(mods) == 3 * (3 if family == "llama" else 2)
    for m in mods:
        assert m.values.numel() == m.num_experts * m.out_features * m.in_features // 2
    assert all("reconstruction_error" in g for layer in result.layers for g in layer["groups"])


@pytest.mark.parametrize("family", [*FAMILIES, "qwen2", "mistral", "gemma", "opt", "gpt2"])
def test_expanded_model_matches_dense_recomputation_of_its_experts(family, tiny_tokenizer, calib):
    """Rebuild each expanded MLP as dense masked weights and per-token routing: same logits."""
    model, _ = _expand(family, tiny_tokenizer, calib)
    x = calib[:2, :20]
    logits = model(x).logits

    def dense_forward(module, inputs, output):
        flat = inputs[0].reshape(-1, module.in_features).double()
        ids = torch.argmin(flat @ module.router_weight.double() + module.router_bias.double(), 1)
        w = module.packed().unpack(torch.float64)
        y = torch.einsum("toi,ti->to", w[ids], flat)
        if module.bias is not None:
            y = y + module.bias.double()[ids]
        return y.to(output.dtype).reshape(output.shape)

    hooks = [m.register_forward_hook(dense_forward) for m in model.modules() if isinstance(m, RoutedSparseLinear)]
    assert len(hooks) == model.config.num_hidden_layers * (3 if family not in ("gpt_neox", "opt", "gpt2") else 2)
    reference = model(x).logits
    for h in hooks:
        h.remove()
    assert torch.allclose(logits, reference, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_gives_identical_logits(family, tiny_tokenizer, calib, tmp_path):
    model, _ = _expand(family, tiny_tokenizer, calib)
    save_checkpoint(model, tiny_tokenizer, tmp_path / "ckpt", {"method": "se"})
    loaded = se_export.load(tmp_path / "ckpt")
    x = calib[:3, :32]
    assert torch.equal(model(x).logits, loaded(x).logits)
    manifest = json.loads((tmp_path / "ckpt" / MANIFEST).read_text())
    stored = load_file(str(tmp_path / "ckpt" / WEIGHTS))
    assert not any(k.endswith("mlp.gate_proj.weight") or k.endswith("dense_h_to_4h.weight") for k in stored)
    # gate and up share one stored router
    if family == "llama":
        assert "model.layers.0.mlp.up_proj.router_weight" in manifest["aliases"]


@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_auto_class_loads_a_checkpoint(family, tiny_tokenizer, calib, tmp_path):
    """AutoModelForCausalLM.from_pretrained(ckpt, trust_remote_code=True) (what pipelines and
    lm-eval-harness call) gives se_export.load's model; without trust_remote_code transformers
    stops at the missing model.safetensors instead of loading random MLP weights; a dtype the
    experts do not run in is refused."""
    from transformers import AutoModelForCausalLM

    model, _ = _expand(family, tiny_tokenizer, calib)
    save_checkpoint(model, tiny_tokenizer, tmp_path / "ckpt", {"method": "se"})
    auto = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", trust_remote_code=True)
    x = calib[:2, :24]
    assert torch.equal(auto(x).logits, se_export.load(tmp_path / "ckpt")(x).logits)
    assert torch.equal(auto(x).logits, model(x).logits)
    assert "auto_map" not in auto.config.to_dict(), "a config saved again points at no missing code"
    with pytest.raises(OSError, match=r"model\.safetensors"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    with pytest.raises(SEError, match="float32"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", trust_remote_code=True, dtype=torch.float16)


@pytest.mark.parametrize("fmt", ["bitmap", "csr16"])
def test_checkpoint_stores_coded_masks_and_still_reads_format_1(fmt, tiny_tokenizer, calib, tmp_path, monkeypatch):
    model, _ = _expand("llama", tiny_tokenizer, calib, format=fmt, sparsity="0.9")
    x = calib[:2, :16]
    manifest = checkpoint.save_checkpoint(model, tiny_tokenizer, tmp_path / "v2", {"method": "se"})
    assert manifest["format_version"] == 4 and len(manifest["storage"]) == 9
    memory = sum(m.packed().nbytes() for m in checkpoint.expanded_modules(model).values())
    assert 0 < manifest["expert_bytes_stored"] < memory
    loaded = se_export.load(tmp_path / "v2")
    assert {m.format for m in checkpoint.expanded_modules(loaded).values()} == {fmt}
    assert torch.equal(loaded(x).logits, model(x).logits)
    # a checkpoint written before masks were coded (format 1: raw bitmaps and row pointers)
    monkeypatch.setattr(checkpoint, "encode_masks", lambda tensors, modules: (tensors, {}))
    monkeypatch.setattr(checkpoint, "FORMAT_VERSION", 1)
    monkeypatch.setattr(checkpoint, "WEIGHTS", checkpoint.LEGACY_WEIGHTS)  # versions 1-3 used transformers' name
    old = checkpoint.save_checkpoint(model, tiny_tokenizer, tmp_path / "v1", {"method": "se"})
    assert old["format_version"] == 1 and old["expert_bytes_stored"] == memory
    monkeypatch.undo()
    assert torch.equal(se_export.load(tmp_path / "v1")(x).logits, model(x).logits)
    # a version this se-export does not know is refused with the fix
    unknown = max(checkpoint.READABLE_VERSIONS) + 1
    bumped = json.loads((tmp_path / "v1" / checkpoint.MANIFEST).read_text()) | {"format_version": unknown}
    (tmp_path / "v1" / checkpoint.MANIFEST).write_text(json.dumps(bumped))
    with pytest.raises(SEError, match=f"format version {unknown}"):
        se_export.load(tmp_path / "v1")


def test_same_seed_same_checkpoint_and_other_seed_differs(tiny_tokenizer, calib):
    a, _ = _expand("llama", tiny_tokenizer, calib, seed=1)
    b, _ = _expand("llama", tiny_tokenizer, calib, seed=1)
    c, _ = _expand("llama", tiny_tokenizer, calib, seed=2)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa if k.endswith("values"))


@pytest.mark.parametrize("sparsity", ["0.5", "2:4"])
def test_experts_pruned_in_chunks_equal_one_batched_pass(sparsity, tiny_tokenizer, calib, monkeypatch):
    """A memory budget too small for all K Hessians prunes a few experts at a time (the derived
    Hessian last): the same checkpoint and report as one pass over all experts."""
    whole, whole_result = _expand("llama", tiny_tokenizer, calib, sparsity=sparsity)
    in_features = max(m.in_features for m in whole.modules() if isinstance(m, RoutedSparseLinear))
    budget = 8 * 4 * in_features * in_features  # one expert per pass at the widest linear
    monkeypatch.setattr(expand_mod, "_PRUNE_BUDGET_BYTES", budget)
    assert expand_mod.experts_per_chunk(in_features, 4) == 1
    calls = []
    real = expand_mod.sparsegpt_prune
    monkeypatch.setattr(expand_mod, "sparsegpt_prune", lambda w, h, *a, **kw: calls.append(h.shape[0]) or real(w, h, *a, **kw))
    chunked, chunked_result = _expand("llama", tiny_tokenizer, calib, sparsity=sparsity)
    assert max(calls) < 4
    sw, sc = whole.state_dict(), chunked.state_dict()
    assert all(torch.equal(sw[k], sc[k]) for k in sw)
    for lw, lc in zip(whole_result.layers, chunked_result.layers, strict=True):
        for gw, gc in zip(lw["groups"], lc["groups"], strict=True):
            for key in ("reconstruction_error", "damping", "dead_inputs", "cluster_sizes"):
                assert gw[key] == gc[key], key


@pytest.mark.parametrize("family", FAMILIES)
def test_resume_equals_uninterrupted_run(family, tiny_tokenizer, calib, tmp_path):
    full, _ = _expand(family, tiny_tokenizer, calib)
    cfg = _cfg()
    work = prepare_workdir(tmp_path / "out", "key", resume=False)
    first = build_tiny_model(family, tiny_tokenizer)
    with pytest.raises(ExpansionInterrupted):
        expand_model(first, calib, cfg, workdir=work, show_progress=False, stop_after_layer=0)
    with pytest.raises(SEError, match="--resume"):
        prepare_workdir(tmp_path / "out", "key", resume=False)
    with pytest.raises(SEError, match="other settings"):
        prepare_workdir(tmp_path / "out", "other-key", resume=True)
    work = prepare_workdir(tmp_path / "out", "key", resume=True)
    second = build_tiny_model(family, tiny_tokenizer)
    result = expand_model(second, calib, cfg, workdir=work, show_progress=False)
    assert result.resumed_layers == 1
    sf, ss = full.state_dict(), second.state_dict()
    assert sf.keys() == ss.keys()
    assert all(torch.equal(sf[k], ss[k]) for k in sf)


@pytest.mark.parametrize(("method", "sparsity"), [("sparsegpt", "0.5"), ("wanda", "2:4"), ("magnitude", "0.7"),
                                                  ("se", "2:4")])
def test_methods_and_patterns(method, sparsity, tiny_tokenizer, calib):
    model, _ = _expand("llama", tiny_tokenizer, calib, method=method, sparsity=sparsity,
                       experts=4 if method == "se" else 1)
    for m in model.modules():
        if isinstance(m, RoutedSparseLinear):
            keep = m.packed().mask()
            if sparsity == "2:4":
                assert torch.all(keep.view(m.num_experts, m.out_features, -1, 4).sum(-1) == 2)
            else:
                assert keep.float().mean().item() == pytest.approx(1 - float(sparsity), abs=0.01)
            assert (m.num_experts > 1) == (method == "se")


def test_magnitude_needs_no_data_and_keeps_the_largest_weights(tiny_tokenizer, monkeypatch):
    """Data-free: no calibration tokens, no layer pass; the mask is the top |W| of each linear."""
    model = build_tiny_model("llama", tiny_tokenizer)
    dense = {n: m.weight.detach().clone() for n, m in model.named_modules() if n.endswith(("gate_proj", "up_proj", "down_proj"))}

    def no_forward(*args, **kwargs):
        raise AssertionError("magnitude pruning ran the model")

    for layer in model.model.layers:
        monkeypatch.setattr(layer, "forward", no_forward)
    result = expand_model(model, None, _cfg(method="magnitude", experts=1, sparsity="0.7"), show_progress=False)
    assert len(result.layers) == len(model.model.layers)
    assert all("reconstruction_error" not in g for layer in result.layers for g in layer["groups"])
    for name, weight in dense.items():
        module = model.get_submodule(name)
        keep = module.packed().mask()[0]
        kept, dropped = weight.abs()[keep], weight.abs()[~keep]
        assert keep.float().mean().item() == pytest.approx(0.3, abs=0.01)
        assert kept.min() >= dropped.max()  # ties aside, exactly the largest magnitudes survive
        assert torch.allclose(module.packed().unpack_expert(0, torch.float32), (weight * keep).float(), atol=1e-3)
    with pytest.raises(SEError, match="needs calibration"):
        expand_model(build_tiny_model("llama", tiny_tokenizer), None, _cfg(), show_progress=False)


def test_dense_output_calibration_differs_from_true_sequential(tiny_tokenizer, calib):
    seq, r1 = _expand("llama", tiny_tokenizer, calib)
    dense, r2 = _expand("llama", tiny_tokenizer, calib, true_sequential=False)
    assert r1.layers[0]["true_sequential"] and not r2.layers[0]["true_sequential"]
    a = seq.model.layers[0].mlp.down_proj.values
    b = dense.model.layers[0].mlp.down_proj.values
    assert not torch.equal(a, b)
    # gate/up see the same inputs either way
    assert torch.equal(seq.model.layers[0].mlp.gate_proj.values, dense.model.layers[0].mlp.gate_proj.values)


def test_layer_subset_and_bad_settings(tiny_tokenizer, calib):
    model, result = _expand("llama", tiny_tokenizer, calib, layers=[1])
    assert [r["layer"] for r in result.layers] == [1]
    assert not isinstance(model.model.layers[0].mlp.down_proj, RoutedSparseLinear)
    with pytest.raises(SEError, match="out of range"):
        _expand("llama", tiny_tokenizer, calib, layers=[7])
    with pytest.raises(SEError, match="larger than the"):
        _expand("llama", tiny_tokenizer, calib[:1, :3], experts=4)
    with pytest.raises(SEError, match="unknown method"):
        _expand("llama", tiny_tokenizer, calib, method="obs")
    with pytest.raises(SEError, match="prunes one expert"):
        _expand("llama", tiny_tokenizer, calib, method="wanda", experts=4)


@pytest.mark.parametrize("family", [*FAMILIES, "qwen2", "gemma", "opt", "gpt2"])
def test_zero_sparsity_expansion_reproduces_the_dense_model(family, tiny_tokenizer, calib):
    """With nothing pruned every expert is the dense weight: logits equal the original model's.
    This catches transposed (Conv1D) or misplaced weights that a self-consistency test cannot."""
    x = calib[:2, :24]
    dense = build_tiny_model(family, tiny_tokenizer)(x).logits
    model, _ = _expand(family, tiny_tokenizer, calib, sparsity="0", value_dtype="fp32", experts=2)
    assert torch.allclose(model(x).logits, dense, atol=1e-4)


@pytest.mark.parametrize("method", ["sparsegpt", "se"])
def test_rtn_quantization_rounds_the_finished_sparsegpt_weights(method, tiny_tokenizer, calib):
    """--quant-method rtn is the fp32 expansion rounded to the int4 grid afterwards (float64 RTN
    recomputed here), while the joint sweep's weights differ from that rounding. Layer 0's gate and
    up projections only: every later linear is calibrated on outputs the rounding already changed."""
    kw = dict(method=method, experts=2 if method == "se" else 1)
    fp32, _ = _expand("llama", tiny_tokenizer, calib, value_dtype="fp32", **kw)
    rtn, _ = _expand("llama", tiny_tokenizer, calib, value_dtype="int4", group_size=16, quant_method="rtn", **kw)
    joint, _ = _expand("llama", tiny_tokenizer, calib, value_dtype="int4", group_size=16, **kw)
    for name in ("model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"):
        ref = fp32.get_submodule(name)
        w = ref.packed().unpack(torch.float64)  # [K, out, in], zeros where pruned
        groups = w.reshape(*w.shape[:-1], -1, 16)
        peak = groups.gather(-1, groups.abs().argmax(-1, keepdim=True))  # the group's largest |w| is code -8
        scale = (peak / -8).to(torch.float16).double()
        scale = torch.where(scale != 0, scale, torch.ones_like(scale))
        expected = (torch.clamp(torch.round(groups / scale), -8, 7) * scale).reshape(w.shape)
        got = rtn.get_submodule(name).packed().unpack(torch.float64)
        assert torch.allclose(got, expected, atol=1e-6), name
        assert not torch.allclose(joint.get_submodule(name).packed().unpack(torch.float64), expected, atol=1e-6), name


@pytest.mark.parametrize(("family", "true_sequential", "method"),
                         [("llama", True, "se"), ("llama", False, "se"), ("llama", False, "sparsegpt"),
                          ("qwen2", True, "se"), ("mistral", True, "se"), ("gemma", True, "se")])
def test_next_layer_inputs_from_captures_equal_a_full_layer_pass(family, true_sequential, method, tiny_tokenizer,
                                                                 calib, monkeypatch):
    """Where the adapter names the residual, the next layer's inputs are residual + expanded MLP:
    every chunk must equal what running the expanded layer gives, for kept and recomputed captures."""
    checked = []
    original = expand_mod.next_layer_states

    def compare(layer, adapter, states, kwargs_list, capture):
        out, ok = original(layer, adapter, states, kwargs_list, capture)
        full = [layer_output(layer(h, **kw)) for h, kw in zip(states, kwargs_list, strict=True)]
        assert ok
        for a, b in zip(out, full, strict=True):
            assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5, rtol=1e-5)
        # a resumed layer recomputes the captures: same bits as the kept ones
        again, _ = original(layer, adapter, states, kwargs_list, None)
        assert all(torch.equal(a, b) for a, b in zip(out, again, strict=True))
        checked.append(capture is not None)
        return out, ok

    monkeypatch.setattr(expand_mod, "next_layer_states", compare)
    model, _ = _expand(family, tiny_tokenizer, calib, true_sequential=true_sequential, method=method,
                       experts=4 if method == "se" else 1)
    assert checked and all(checked)
    assert len(checked) == model.config.num_hidden_layers - 1


def test_wrong_residual_entry_falls_back_to_layer_passes(tiny_tokenizer, calib, monkeypatch):
    """GPT-NeoX adds attention and MLP to the layer input in parallel: claiming its MLP norm's input
    is the whole residual is wrong, must be detected on the first chunk, warned about, and the
    result must equal the expansion that always runs full layer passes."""
    reference, _ = _expand("gpt_neox", tiny_tokenizer, calib)
    wrong = dataclasses.replace(ADAPTERS["gpt_neox"], residual="post_attention_layernorm")
    monkeypatch.setitem(ADAPTERS, "gpt_neox", wrong)
    with pytest.warns(UserWarning, match="residual"):
        model, _ = _expand("gpt_neox", tiny_tokenizer, calib)
    sr, sm = reference.state_dict(), model.state_dict()
    assert all(torch.equal(sr[k], sm[k]) for k in sr)


def test_dense_output_calibration_reports_inference_routing_agreement(tiny_tokenizer, calib):
    """With dense-output calibration the down projection's router is fit on dense activations but
    sees the expanded gate/up's at inference: the reported agreement must equal the share of
    tokens routed alike on both, recomputed here from two independent forward passes (layer 0)."""
    dense_model = build_tiny_model("llama", tiny_tokenizer)
    model, result = _expand("llama", tiny_tokenizer, calib, true_sequential=False)
    _, seq_result = _expand("llama", tiny_tokenizer, calib)
    assert all("inference_routing_agreement" not in g for r in seq_result.layers for g in r["groups"])

    def down_input(m):
        grabbed = []
        handle = m.model.layers[0].mlp.down_proj.register_forward_pre_hook(
            lambda _mod, args: grabbed.append(args[0].reshape(-1, args[0].shape[-1])))
        with torch.no_grad():
            for chunk in calib.split(4):
                m(chunk)
        handle.remove()
        return torch.cat(grabbed)

    router = model.model.layers[0].mlp.down_proj

    def route(x):
        return torch.argmin(x @ router.router_weight + router.router_bias, 1)
    expected = float((route(down_input(dense_model)) == route(down_input(model))).float().mean())
    reported = result.layers[0]["groups"][1]["inference_routing_agreement"]
    assert abs(reported - expected) <= 2 / calib.numel()
    assert 0.0 < reported < 1.0  # pruned gate/up really move some tokens to another expert


@settings(max_examples=30, deadline=None)
@given(sizes=st.lists(st.integers(0, 9), min_size=1, max_size=6), width=st.integers(1, 5), seed=st.integers(0, 99))
def test_stack_rows_equals_concatenation_and_checks_the_row_count(sizes, width, seed):
    """The captured activations are copied block by block into one tensor (peak: result + one
    block); it must equal torch.cat of the same blocks, and a wrong total is an error."""
    gen = torch.Generator().manual_seed(seed)
    blocks = [torch.randn(n, width, generator=gen) for n in sizes]
    total = sum(sizes)
    assert torch.equal(stack_rows(iter(blocks), total), torch.cat(blocks))
    with pytest.raises(RuntimeError, match="rows of activations"):
        stack_rows(iter(blocks), total + 1)
