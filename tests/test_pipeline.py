import pytest
import torch
import yaml
from helpers import tiny_config, tiny_model
from transformers import AutoModelForCausalLM

from llmq.arch import ARCHITECTURES, get_arch, get_layers, layer_linears
from llmq.arch.experts import split_experts
from llmq.config import QuantConfig, Recipe
from llmq.errors import (
    CalibrationError,
    CheckpointError,
    ConfigError,
    UnsupportedArchitectureError,
    WeightError,
)
from llmq.job.pipeline import _layer_forward, capture_layer_inputs, quantize_layers
from llmq.job.plan import plan
from llmq.job.runner import quantize
from llmq.runtime.loader import load_model

CALIB = torch.randint(0, 128, (6, 32), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_table_names_real_modules_of_every_architecture(model_type):
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(tiny_config(model_type))
    spec = get_arch(model_type)
    for name in spec.before + spec.after:
        model.get_submodule(name)
    split_experts(model, spec)
    kinds = set()
    for i, layer in enumerate(get_layers(model, spec)):
        named = [n for g in spec.groups(model.config, i) for n in g]
        assert len(named) == len(set(named)) and set(layer_linears(layer, spec, model.config, i)) == set(named)
        # routers and the shared expert's gate read the hidden states but are never quantized
        kept = {f"{spec.moe.block}.{x}" for x in (spec.moe.router, spec.moe.shared_gate) if x} if spec.moe else set()
        all_linears = {n for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)} - kept
        assert set(named) == all_linears, "every linear of a decoder layer is in exactly one sequential group"
        kinds.add(spec.is_sparse(model.config, i))
    if spec.moe is not None:  # the tiny configs mix dense and sparse layers where the family can
        assert True in kinds and (model_type in ("mixtral", "olmoe", "qwen2_moe") or False in kinds)


def _replay(model, spec, ids, kwargs_of):
    """Layer 0's captured inputs pushed through every layer with ``kwargs_of(index)``: each layer's output."""
    hidden, kwargs = capture_layer_inputs(model, spec, ids, torch.device("cpu"))
    outs = []
    with torch.no_grad():
        for i, layer in enumerate(get_layers(model, spec)):
            hidden = _layer_forward(layer, hidden, kwargs_of(kwargs, i))  # a batch of n, kwargs captured at batch 1
            outs.append(hidden)
    return outs


def test_captured_inputs_replay_the_full_model():
    """Layer 0's captured inputs, pushed through the layers with the captured kwargs, give the model's states."""
    model = tiny_model("qwen3")
    spec = get_arch("qwen3")
    hidden, _ = capture_layer_inputs(model, spec, CALIB, torch.device("cpu"))
    with torch.no_grad():
        expected = model(CALIB, output_hidden_states=True).hidden_states
    assert torch.allclose(hidden, expected[0])
    # the last hidden state is taken after the final norm, so compare the layers before it
    for got, want in zip(_replay(model, spec, CALIB, lambda kw, i: kw[i]), expected[1:-1], strict=False):
        assert torch.allclose(got, want, atol=1e-5)


def test_each_layer_replays_with_its_own_attention_mask():
    """Sliding-window and full-attention layers mixed (Qwen2 ``layer_types``): every layer gets its own mask."""
    types = ["full_attention", "sliding_attention", "sliding_attention", "full_attention"]
    model = tiny_model("qwen2", num_hidden_layers=4, layer_types=types, use_sliding_window=True, sliding_window=6,
                       max_window_layers=0)
    assert [layer.self_attn.sliding_window for layer in model.model.layers] == [None, 6, 6, None]
    spec = get_arch("qwen2")
    with torch.no_grad():
        out = model(CALIB, output_hidden_states=True)
    # the model's states after each layer: hidden_states[i + 1] for i < 3; the last one is after the final norm
    want = [*out.hidden_states[1:-1], None]
    got = _replay(model, spec, CALIB, lambda kw, i: kw[i])
    for i in range(3):
        assert torch.allclose(got[i], want[i], atol=1e-5), f"layer {i}"
    with torch.no_grad():
        logits = model.lm_head(model.model.norm(got[3]))
    assert torch.allclose(logits, out.logits, atol=1e-4), "layer 3"
    # and the check can fail: layer 0's arguments for every layer give other states from the first sliding layer on
    wrong = _replay(model, spec, CALIB, lambda kw, i: kw[0])
    assert torch.allclose(wrong[0], want[0], atol=1e-5) and not torch.allclose(wrong[1], want[1], atol=1e-3)


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_every_architecture_quantizes_end_to_end(model_type, method):
    model = tiny_model(model_type)
    spec = get_arch(model_type)
    split_experts(model, spec)
    before = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    cfg = QuantConfig(method=method, bits=4, group_size=32, act_order=method == "gptq")
    results = quantize_layers(model, CALIB, cfg, batch_size=4)
    modules = dict(model.named_modules())
    expected = {f"{spec.layers}.{i}.{name}" for i in range(2) for g in spec.groups(model.config, i) for name in g}
    assert set(results) == expected
    for name, qw in results.items():
        assert torch.equal(modules[name].weight.data, qw.dequantize()), name
        assert int(qw.codes.max()) <= 15
        assert not torch.equal(modules[name].weight.data, before[name])
    assert torch.equal(model.lm_head.weight, before["lm_head"]), "lm_head is never quantized"


def test_unsupported_architecture_lists_supported_ones(tmp_path):
    """GPT-2's layers compute with Conv1D, not nn.Linear: nothing to infer groups from, and the error says so
    before calibration, with the entries one could name instead."""
    model = AutoModelForCausalLM.from_config(tiny_config("gpt2", n_embd=32, n_layer=1, n_head=2))
    model.save_pretrained(tmp_path)
    with pytest.raises(UnsupportedArchitectureError, match=r"hold no nn\.Linear \(they hold Conv1D.*entries: cohere"):
        plan(Recipe(model=str(tmp_path)))
    with pytest.raises(UnsupportedArchitectureError, match="'gpt2'"):
        quantize_layers(model, CALIB, QuantConfig())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_weight_is_named(bad):
    model = tiny_model("llama")
    model.model.layers[1].mlp.up_proj.weight.data[3, 5] = bad
    with pytest.raises(WeightError, match=r"model\.layers\.1\.mlp\.up_proj has 1 NaN/Inf"):
        quantize_layers(model, CALIB, QuantConfig(method="rtn"))


def test_missing_model_path_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(str(tmp_path / "no-such-model"))
    with pytest.raises(CheckpointError, match="has no config.json"):
        load_model(str(tmp_path))


def test_too_little_calibration_text_says_how_much(tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "m")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(128)} | {"[UNK]": 127}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(tmp_path / "m")
    (tmp_path / "short.txt").write_text("w1 w2 w3 " * 10)
    recipe = Recipe.from_dict(dict(model=str(tmp_path / "m"), calib=str(tmp_path / "short.txt"),
                                   nsamples=4, seqlen=64))
    with pytest.raises(CalibrationError, match="30 tokens.*64"):
        quantize(recipe)


def test_recipe_keys_are_checked(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"model": "m", "bits": 3, "group_size": 64, "act_order": True}))
    recipe = Recipe.from_yaml(path, seed=7)
    assert (recipe.quant.bits, recipe.quant.group_size, recipe.quant.act_order, recipe.calib.seed) == (3, 64, True, 7)
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    path.write_text(yaml.safe_dump({"model": "m", "bitz": 3}))
    with pytest.raises(ConfigError, match="unknown recipe key\\(s\\) bitz"):
        Recipe.from_yaml(path)
    with pytest.raises(ConfigError, match="group_size=0"):
        Recipe.from_dict({"model": "m", "group_size": 0})
