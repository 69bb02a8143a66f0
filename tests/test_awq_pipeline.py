"""AWQ as a method: search artifacts re-applied exactly, FP next-layer inputs, the AWQ GEMM checkpoint."""

import json

import pytest
import torch
from helpers import shared_path, tiny_model
from safetensors.torch import load_file, save_file

import llmq
from llmq.arch import ARCHITECTURES
from llmq.config import QuantConfig, Recipe
from llmq.errors import ConfigError
from llmq.formats.export import save_packed
from llmq.formats.info import checkpoint_info
from llmq.job.pipeline import quantize_layers
from llmq.job.plan import AWQ_SEARCH_FILE
from llmq.job.runner import quantize, save
from llmq.runtime.qlinear import AwqQuantLinear

CALIB = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("method", ["awq", "awq+gptq"])
def test_saved_search_reapplies_to_the_same_weights(method):
    cfg = QuantConfig(method=method, bits=3, group_size=32)
    record: dict[str, torch.Tensor] = {}
    searched = quantize_layers(tiny_model("llama", hidden_size=64, intermediate_size=128), CALIB, cfg,
                               awq_record=record)
    assert any(k.endswith(".awq_scale") for k in record)
    if method == "awq":
        assert any(k.endswith("mlp.down_proj.awq_clip") for k in record)
        assert not any(k.endswith(("q_proj.awq_clip", "k_proj.awq_clip")) for k in record)  # as the reference
    again = quantize_layers(tiny_model("llama", hidden_size=64, intermediate_size=128), CALIB, cfg,
                            awq_state=record)
    for name, qw in searched.items():
        assert torch.equal(qw.codes, again[name].codes) and torch.equal(qw.scales, again[name].scales), name


@pytest.mark.parametrize("method", ["awq", "awq+gptq"])
def test_a_scale_group_whose_linears_all_stay_fp_is_left_exact(method):
    """Kept linears keep their weights to the bit, and the norm before them its own: a scale folded there would
    change them (by rounding in bf16) for no quantized linear's sake; the groups around them are still scaled."""
    model = tiny_model("llama", hidden_size=64, intermediate_size=128)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    record: dict[str, torch.Tensor] = {}
    results = quantize_layers(model, CALIB, QuantConfig(method=method, bits=3, group_size=32), awq_record=record,
                              keep_fp=lambda name, m: ".mlp." in name)
    assert results and not any(".mlp." in name for name in results)
    after = model.state_dict()
    kept = [k for k in before if ".mlp." in k or "post_attention_layernorm" in k]
    assert kept and all(torch.equal(after[k], before[k]) for k in kept)
    assert not any("post_attention_layernorm" in k or ".mlp." in k for k in record)
    norm = "model.layers.0.input_layernorm"  # the attention's scales are searched and folded as before
    assert torch.allclose(after[f"{norm}.weight"], before[f"{norm}.weight"] / record[f"{norm}.awq_scale"])


def test_fp_next_inputs_feed_each_layer_the_full_precision_states():
    """With next_inputs="fp", layer 1 sees what it sees when layer 0 is not quantized at all."""
    cfg_fp = QuantConfig(method="gptq", bits=3, group_size=32, next_inputs="fp")
    fp_inputs = quantize_layers(tiny_model("llama"), CALIB, cfg_fp)
    layer0_kept = quantize_layers(tiny_model("llama"), CALIB, QuantConfig(method="gptq", bits=3, group_size=32),
                                  keep_fp=lambda name, m: name.startswith("model.layers.0."))
    quantized_inputs = quantize_layers(tiny_model("llama"), CALIB, QuantConfig(method="gptq", bits=3, group_size=32))
    name = "model.layers.1.mlp.down_proj"
    assert torch.equal(fp_inputs[name].codes, layer0_kept[name].codes)
    assert not torch.equal(fp_inputs[name].codes, quantized_inputs[name].codes)


def test_awq_gemm_checkpoint_reloads_with_equal_logits(tmp_path):
    model = tiny_model("llama", hidden_size=64, intermediate_size=128)
    cfg = QuantConfig(method="awq", bits=4, group_size=32)
    results = quantize_layers(model, CALIB, cfg)
    save_packed(model, None, results, tmp_path / "awq", cfg, fmt="awq")
    qc = json.loads((tmp_path / "awq" / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["version"], qc["bits"], qc["group_size"], qc["zero_point"]) == (
        "awq", "gemm", 4, 32, True)
    tensors = load_file(tmp_path / "awq" / "model.safetensors")
    assert tensors["model.layers.0.mlp.up_proj.qweight"].shape == (64, 128 // 8)  # [in, out/8]
    assert "model.layers.0.mlp.up_proj.g_idx" not in tensors
    loaded = llmq.from_pretrained(str(tmp_path / "awq"), torch_dtype=torch.float32, kernel="pure")
    modules = dict(loaded.named_modules())
    for name, qw in results.items():
        assert isinstance(modules[name], AwqQuantLinear)
        assert torch.equal(modules[name].dequantized_weight(torch.float32), qw.dequantize()), name
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-2)
    assert checkpoint_info(tmp_path / "awq")["method"] == "awq"


@pytest.mark.parametrize("kwargs, message", [
    (dict(bits=3, group_size=32), "4-bit weights only"),
    (dict(bits=4, group_size=32, act_order=True, method="gptq"), "act-order groups"),
])
def test_awq_layout_refuses_what_it_cannot_hold(tmp_path, kwargs, message):
    model = tiny_model("llama", hidden_size=64, intermediate_size=128)
    cfg = QuantConfig(**{"method": "rtn", **kwargs})
    results = quantize_layers(model, CALIB, cfg)
    with pytest.raises(ConfigError, match=message):
        save_packed(model, None, results, tmp_path / "awq", cfg, fmt="awq")
    assert not (tmp_path / "awq").exists(), "no half-written checkpoint"


def test_awq_recipe_writes_its_search_and_apply_awq_reproduces_the_bytes(tmp_path):
    base = dict(model=str(shared_path("assets", "stories260K")), method="awq", bits=4, group_size=32, nsamples=8,
                seqlen=64, calib=str(shared_path("assets", "tinystories-text", "tinystories_sample.cs336.txt")))
    first = Recipe.from_dict({**base, "out": str(tmp_path / "searched")})
    out = save(quantize(first), first)
    search = load_file(out / AWQ_SEARCH_FILE)
    assert search and all(torch.isfinite(t).all() for t in search.values())
    save_file(search, tmp_path / "search.safetensors")
    second = Recipe.from_dict({**base, "out": str(tmp_path / "applied"),
                               "apply_awq": str(tmp_path / "search.safetensors")})
    out2 = save(quantize(second), second)
    assert (out / "model.safetensors").read_bytes() == (out2 / "model.safetensors").read_bytes()


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_searched_scales_fold_exactly_in_every_architecture(model_type):
    """The scales the AWQ search picks, folded into a fresh copy without any rounding, leave the logits as they were
    (in a mixture of experts the router's columns are scaled with the experts' gate/up)."""
    from llmq.algorithms.awq import fold_scales
    from llmq.arch import get_arch, get_layers
    from llmq.arch.experts import split_experts

    record: dict[str, torch.Tensor] = {}
    quantize_layers(tiny_model(model_type), CALIB, QuantConfig(method="awq", bits=3, group_size=32),
                    awq_record=record)
    model = tiny_model(model_type)  # same seed: the original weights
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        before = model(ids).logits
    spec, folded = get_arch(model_type), 0
    split_experts(model, spec)
    for i, layer in enumerate(get_layers(model, spec)):
        for sg in spec.layer_scale_groups(model.config, i):
            key = f"{spec.layers}.{i}.{sg.prev}.awq_scale"
            if key in record:
                prev = layer.get_submodule(sg.prev)
                fold_scales(prev, [layer.get_submodule(n) for n in sg.linears], record[key],
                            [layer.get_submodule(n) for n in sg.also],
                            sg.prev_rows.span(prev.out_features) if sg.prev_rows else None, sg.norm_offset)
                folded += 1
    # both norms and up -> down in each of the 2 layers (OLMo-2 has no norm before its linears; Cohere one)
    assert folded >= {"olmo2": 1, "cohere": 2, "cohere2": 2}.get(model_type, 3) * 2
    assert any(not torch.allclose(s, torch.ones_like(s)) for k, s in record.items() if k.endswith(".awq_scale"))
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, before, atol=1e-4)
