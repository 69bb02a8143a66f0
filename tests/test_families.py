"""Every dense decoder family: table entries and models without one, quantized, packed, loaded back."""

import json

import pytest
import torch
import torch.nn as nn
from helpers import shared_path, tiny_model
from safetensors import safe_open
from transformers import AutoTokenizer

import llmq
import llmq.job.methods as methods
from llmq.arch import ARCHITECTURES, discover_arch, get_layers, resolve_arch
from llmq.config import QuantConfig, Recipe
from llmq.errors import ConfigError, UnsupportedArchitectureError
from llmq.job.pipeline import _layer_forward, capture_layer_inputs, quantize_layers
from llmq.job.runner import quantize, quantize_to_disk, save

TABLE = ["gemma2", "gemma3_text", "gemma3", "phi3", "olmo2", "cohere", "cohere2", "granite", "glm4"]
# no table entry: GPT-NeoX (fused query_key_value, its lm_head saved as embed_out), Phi-1/2 (attention and MLP
# in parallel on one norm: q/k/v and fc1 read one tensor)
UNLISTED = ["gpt_neox", "phi"]
IDS = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(2))
CALIB = torch.randint(0, 128, (4, 24), generator=torch.Generator().manual_seed(1))


def _bf16_model_folder(root, model_type: str, dtype=torch.bfloat16):
    """A random tiny ``model_type`` saved as real checkpoints are (bf16 here), with stories260K's tokenizer."""
    folder = root / "fp"
    tiny_model(model_type, vocab_size=512).to(dtype).save_pretrained(folder)
    AutoTokenizer.from_pretrained(shared_path("assets", "stories260K")).save_pretrained(folder)
    return folder


def _recipe(folder, out, **kw) -> Recipe:
    text = shared_path("assets", "tinystories-text", "TinyStories-valid.Ahmedessaa-30k.txt")
    return Recipe.from_dict(dict(model=str(folder), out=str(out), bits=4, group_size=32, calib=str(text), nsamples=4,
                                 seqlen=32, **kw))


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("model_type,method", [(t, m) for t in TABLE for m in ("gptq", "awq")]
                         + [(t, "gptq") for t in UNLISTED])
def test_family_round_trips_through_the_packed_checkpoint(tmp_path, model_type, method):
    """bf16 model -> quantize (in memory, and streaming: the same bytes) -> from_pretrained: every quantized weight
    decodes to the codes' dequantized values, and the logits are the in-memory quantized model's."""
    folder = _bf16_model_folder(tmp_path, model_type)
    r_mem, r_stream = _recipe(folder, tmp_path / "mem", method=method), _recipe(folder, tmp_path / "stream",
                                                                                 method=method)
    run = quantize(r_mem)
    save(run, r_mem)
    quantize_to_disk(r_stream)
    mem, stream = _files(tmp_path / "mem"), _files(tmp_path / "stream")
    assert mem.keys() == stream.keys() and [n for n in mem if mem[n] != stream[n]] == []

    spec = run.spec
    linears = {f"{spec.layers}.{i}.{n}" for i, layer in enumerate(get_layers(run.model, spec))
               for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
    assert set(run.results) == linears, "every linear of every decoder layer is quantized"
    packed = llmq.from_pretrained(tmp_path / "stream", torch_dtype=torch.float32, kernel="pure")
    modules, in_memory = dict(packed.named_modules()), dict(run.model.named_modules())
    for name, qw in run.results.items():
        assert torch.equal(modules[name].dequantized_weight(torch.float32), qw.dequantize()), name
        assert torch.equal(in_memory[name].weight, qw.dequantize().to(torch.bfloat16)), name
    # the in-memory model in float32 with its quantized weights exact (bf16 cannot hold them) is what the
    # checkpoint decodes to; its other tensors are bf16 already, as stored
    model = run.model.float()
    for name, qw in run.results.items():
        in_memory[name].weight.data = qw.dequantize()
    with torch.no_grad():
        want, got = model(IDS).logits, packed(IDS).logits
    assert torch.allclose(got, want, atol=1e-3, rtol=1e-3), (got - want).abs().max()

    with safe_open(str(tmp_path / "stream" / "model.safetensors"), "pt") as f:
        floats = {f.get_slice(k).get_dtype() for k in f.keys() if not k.endswith(("qweight", "qzeros", "g_idx"))}
    assert floats == {"BF16", "F16"}  # bf16 tensors stay bf16; the scales are fp16, as the GPTQ layout has them
    cfg = json.loads((tmp_path / "stream" / "config.json").read_text())
    assert cfg["model_type"] == model_type and cfg["dtype"] == "bfloat16"


def test_the_packed_names_are_the_checkpoint_s_own(tmp_path):
    """transformers names GPT-NeoX's head lm_head but saves it as embed_out, and Gemma 3's decoder
    model.language_model but saves it as language_model.model: the packed checkpoint keeps the names on disk
    (which engines load), its vision tower and projector copied in full precision."""
    for model_type, want, unwanted in (("gpt_neox", "embed_out.weight", "lm_head."),
                                       ("gemma3", "language_model.model.layers.1.mlp.down_proj.qweight",
                                        "model.language_model.")):
        root = tmp_path / model_type
        folder = _bf16_model_folder(root, model_type)
        quantize_to_disk(_recipe(folder, root / "q", method="rtn"))
        with safe_open(str(root / "q" / "model.safetensors"), "pt") as f:
            keys = set(f.keys())
        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            source = {k for k in f.keys() if k.startswith(("vision_tower.", "multi_modal_projector."))}
        assert want in keys and not any(k.startswith(unwanted) for k in keys), sorted(keys)[:5]
        assert source <= keys and not any(k.startswith("vision_tower.") and k.endswith("qweight") for k in keys)


@pytest.mark.parametrize("model_type", sorted(t for t, s in ARCHITECTURES.items() if s.moe is None))
def test_discovery_gives_the_table_s_groups(model_type):
    """Groups inferred from one forward of layer 0 are exactly the hand-written ones, for every dense entry."""
    spec, found = ARCHITECTURES[model_type], discover_arch(tiny_model(model_type))
    assert (found.layers, found.sequential) == (spec.layers, spec.sequential)
    assert found.scale_groups == ()  # AWQ needs what the model does not show


@pytest.mark.parametrize("model_type", sorted(t for t, s in ARCHITECTURES.items() if s.moe is not None))
def test_discovery_refuses_fused_experts(model_type):
    with pytest.raises(UnsupportedArchitectureError, match="mixture-of-experts weights, which need a table entry"):
        discover_arch(tiny_model(model_type))


def test_an_unlisted_family_gets_true_sequential_gptq(monkeypatch):
    """GPT-NeoX has no entry. GPTQ quantizes each linear of each layer once, group by group in the inferred
    order, and each group's Hessian is built on inputs that went through the already quantized groups before it:
    recomputed here from the original model with exactly those groups quantized. (Sequential residual here:
    with GPT-NeoX's default parallel one, the MLP's input does not depend on the attention at all.)"""
    observed: dict[str, list[torch.Tensor]] = {}
    written: list[str] = []
    add, write_back = methods.SharedHessians.add, methods.write_back

    def record_add(self, name, x):
        observed.setdefault(name, []).append(x.detach().reshape(-1, x.shape[-1]).clone())
        add(self, name, x)

    def record_write(module, qw):
        written.append(next(n for n, m in model.named_modules() if m is module))
        write_back(module, qw)

    monkeypatch.setattr(methods.SharedHessians, "add", record_add)
    monkeypatch.setattr(methods, "write_back", record_write)
    model = tiny_model("gpt_neox", use_parallel_residual=False)
    spec = resolve_arch(model)
    results = quantize_layers(model, CALIB, QuantConfig(method="gptq", bits=3, group_size=32), batch_size=2)

    every = [f"{spec.layers}.{i}.{n}" for i, layer in enumerate(get_layers(model, spec))
             for n, m in layer.named_modules() if isinstance(m, nn.Linear)]
    assert sorted(written) == sorted(every) == sorted(results), "each linear quantized exactly once"
    flat = [n for g in spec.sequential for n in g]
    assert [n.split(".", 3)[-1] for n in written[:len(flat)]] == flat  # layer 0, group by group

    fresh = tiny_model("gpt_neox", use_parallel_residual=False)  # the same seed: the original weights
    hidden, kwargs = capture_layer_inputs(fresh, spec, CALIB, torch.device("cpu"))
    layer = get_layers(fresh, spec)[0]
    fp_inputs = {g[0]: _inputs_of(layer, g[0], hidden, kwargs[0]) for g in spec.sequential}
    for k, group in enumerate(spec.sequential):
        want = _inputs_of(layer, group[0], hidden, kwargs[0])
        got = torch.cat(observed[group[0]][: len(observed[group[0]]) // 2])  # layer 0's batches come first
        assert torch.allclose(got, want, atol=1e-5), f"group {k} {group}"
        if k > 0:  # the control: without the earlier groups quantized the inputs differ
            assert not torch.allclose(got, fp_inputs[group[0]], atol=1e-4), f"group {k} saw full-precision inputs"
        for name in group:  # quantize this group as the run did, before the next group's inputs
            layer.get_submodule(name).weight.data = results[f"{spec.layers}.0.{name}"].dequantize()


def _inputs_of(layer: nn.Module, name: str, hidden: torch.Tensor, kwargs) -> torch.Tensor:
    seen = []
    hook = layer.get_submodule(name).register_forward_pre_hook(
        lambda m, args: seen.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        _layer_forward(layer, hidden, kwargs)
    hook.remove()
    return torch.cat(seen)


def test_awq_without_a_table_entry_is_refused_before_calibration(tmp_path, monkeypatch):
    import llmq.job.runner as api

    monkeypatch.setattr(api, "get_calibration", lambda *a, **k: pytest.fail("calibration ran"))
    folder = _bf16_model_folder(tmp_path, "phi")
    with pytest.raises(ConfigError, match=r"AWQ needs to know where each scale folds.*--arch.*ScaleGroup"):
        quantize_to_disk(_recipe(folder, tmp_path / "q", method="awq"))
    assert not (tmp_path / "q").exists()


def test_arch_names_the_entry_of_a_model_type_with_the_same_layout(tmp_path):
    """StableLM has LLaMA's module names (with LayerNorm for RMSNorm): --arch llama gives it AWQ's scale groups,
    the checkpoint records the entry, and it loads back to the in-memory model's logits."""
    folder = _bf16_model_folder(tmp_path, "stablelm")
    with pytest.raises(ConfigError, match="arch='lama' is not a table entry: choose one of cohere"):
        _recipe(folder, tmp_path / "x", arch="lama")
    r = _recipe(folder, tmp_path / "q", method="awq", arch="llama")
    run = quantize(r)
    assert any(k.endswith("input_layernorm.awq_scale") for k in run.awq)  # the norm fold of LLaMA's entry ran
    save(run, r)
    meta = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["meta"]["llmq"]
    assert meta["recipe"]["arch"] == "llama"
    packed = llmq.from_pretrained(tmp_path / "q", torch_dtype=torch.float32, kernel="pure")
    model = run.model.float()
    for name, qw in run.results.items():
        model.get_submodule(name).weight.data = qw.dequantize()
    with torch.no_grad():
        assert torch.allclose(packed(IDS).logits, model(IDS).logits, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("model_type,stored", [("gemma2", "bfloat16"), ("llama", "float16")])
def test_families_that_overflow_fp16_are_stored_in_bf16(tmp_path, model_type, stored):
    """From a float32 checkpoint, unquantized tensors are stored in float16, except for families whose
    activations overflow it (Gemma), stored in bfloat16."""
    folder = _bf16_model_folder(tmp_path, model_type, dtype=torch.float32)
    quantize_to_disk(_recipe(folder, tmp_path / "q", method="rtn"))
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        assert f.get_slice("model.norm.weight").get_dtype() == {"bfloat16": "BF16", "float16": "F16"}[stored]
    assert json.loads((tmp_path / "q" / "config.json").read_text())["dtype"] == stored
