"""Mixtures of experts: experts as linears, each calibrated on its routed tokens, starved experts, packed experts."""

import json
import logging

import pytest
import torch
import torch.nn as nn
from helpers import MOE_CONFIGS, shared_path, tiny_model
from transformers import AutoModelForCausalLM

import llmq
from llmq.algorithms.quant import rtn_quantize
from llmq.arch import get_arch, get_layers
from llmq.arch.experts import ExpertLinears, split_experts
from llmq.config import QuantConfig, Recipe
from llmq.formats.export import save_packed
from llmq.formats.info import checkpoint_info
from llmq.job.methods import SharedHessians
from llmq.job.pipeline import quantize_layers
from llmq.job.runner import quantize, quantize_to_disk, save

FAMILIES = sorted(MOE_CONFIGS)
IDS = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(3))


def _randomise_experts(model: nn.Module) -> None:
    """transformers initialises fused 3-D expert weights to zero on from_config; give them values."""
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 3:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


def _moe_model(model_type: str, **overrides) -> nn.Module:
    model = tiny_model(model_type, **overrides)
    _randomise_experts(model)
    return model


def _blocks(model, spec):
    return [(i, layer.get_submodule(spec.moe.block)) for i, layer in enumerate(get_layers(model, spec))
            if spec.is_sparse(model.config, i)]


def _assert_split_matches(model: nn.Module, spec, atol: float) -> None:
    """Each MoE block and the whole model give what they gave with transformers' fused experts."""
    torch.manual_seed(0)
    hidden = torch.randn(2, 24, model.config.hidden_size)
    with torch.no_grad():
        block_ref = [block(hidden) for _, block in _blocks(model, spec)]
        logits_ref = model(IDS).logits
    assert split_experts(model, spec) == len(block_ref) > 0
    with torch.no_grad():
        for (i, block), ref in zip(_blocks(model, spec), block_ref, strict=True):
            assert isinstance(block.get_submodule(spec.moe.experts), ExpertLinears)
            assert torch.allclose(block(hidden), ref, atol=atol), f"layer {i}"
        assert torch.allclose(model(IDS).logits, logits_ref, atol=atol)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_expert_linears_give_the_model_s_own_moe_block(model_type):
    _assert_split_matches(_moe_model(model_type), get_arch(model_type), atol=1e-5)


def test_expert_linears_give_tiny_moe_s_own_blocks_and_logits():
    model = AutoModelForCausalLM.from_pretrained(shared_path("assets", "llmq-tiny-moe")).eval()
    _assert_split_matches(model, get_arch("qwen3_moe"), atol=1e-4)


def test_split_is_a_real_change_that_the_check_can_see():
    """The comparison above can fail: an expert's down swapped for another's changes the block output."""
    model = _moe_model("qwen3_moe")
    spec = get_arch("qwen3_moe")
    hidden = torch.randn(2, 24, 64)
    block = model.model.layers[0].mlp
    with torch.no_grad():
        ref = block(hidden)
        split_experts(model, spec)
        experts = block.experts
        experts[0].down_proj.weight.copy_(experts[1].down_proj.weight)
        assert not torch.allclose(block(hidden), ref, atol=1e-4)


class FixedRouter(nn.Module):
    """Token ``t`` (flattened over the batch) goes to experts ``t % (E-1)`` and ``(t+1) % (E-1)``; expert E-1 never."""

    def __init__(self, n_experts: int):
        super().__init__()
        self.n = n_experts - 1

    def forward(self, hidden: torch.Tensor):
        t = torch.arange(hidden.shape[0])
        index = torch.stack([t % self.n, (t + 1) % self.n], dim=1)
        return None, torch.full(index.shape, 0.5, dtype=hidden.dtype), index


def routed_tokens(n_tokens: int, n_experts: int, expert: int) -> torch.Tensor:
    t = torch.arange(n_tokens)
    return t[(t % (n_experts - 1) == expert) | ((t + 1) % (n_experts - 1) == expert)]


def _fixed_route_run(monkeypatch, cfg: QuantConfig, caplog=None, batch_size: int = 4, windows: int = 4):
    """GPTQ on a tiny Qwen3-MoE whose routers are FixedRouter; every Hessian handed to the solver and every
    MoE block input, recorded."""
    model = _moe_model("qwen3_moe", mlp_only_layers=[])
    for layer in model.model.layers:
        layer.mlp.gate = FixedRouter(4)
    hessians, block_inputs = {}, {}
    take = SharedHessians.hessian

    def recording(self, name, users=1):  # the Hessian of every linear sharing it (solved together)
        H = take(self, name, users)
        hessians.update({n: H.clone() for n, owner in self.owner.items() if owner == self.owner[name]})
        return H
    monkeypatch.setattr(SharedHessians, "hessian", recording)
    ids = torch.randint(0, 128, (windows, 16), generator=torch.Generator().manual_seed(2))

    def record(module, args, i):  # the first pass over all windows that reaches the block (batch by batch)
        seen = block_inputs.setdefault(i, [])
        if sum(x.shape[0] for x in seen) < ids.shape[0]:
            seen.append(args[0].detach().clone())
    for i, layer in enumerate(model.model.layers):
        layer.mlp.register_forward_pre_hook(lambda m, args, i=i: record(m, args, i))
    notes = {}
    results = quantize_layers(model, ids, cfg, batch_size=batch_size, notes=notes)
    return model, results, hessians, {i: torch.cat(xs) for i, xs in block_inputs.items()}, notes


def test_each_expert_hessian_is_built_from_exactly_its_routed_tokens(monkeypatch):
    cfg = QuantConfig(bits=4, group_size=32, expert_min_tokens=1)  # only an expert with no token is starved
    model, _, hessians, block_inputs, notes = _fixed_route_run(monkeypatch, cfg)
    x = block_inputs[1].reshape(-1, 64).double()  # layer 1's MoE input: after the quantized attention before it
    expert_layer = model.model.layers[1].mlp.experts
    for e in range(3):
        rows = routed_tokens(x.shape[0], 4, e)
        xe = x[rows]
        want = 2 / len(rows) * xe.T @ xe
        assert torch.allclose(hessians[f"mlp.experts.{e}.gate_proj"].double(), want, rtol=1e-4, atol=1e-5)
        assert torch.equal(hessians[f"mlp.experts.{e}.up_proj"], hessians[f"mlp.experts.{e}.gate_proj"])
        # down reads act(gate(x)) * up(x) of the quantized gate and up, on the same tokens
        expert = expert_layer[e]
        with torch.no_grad():
            z = (expert.act(expert.gate_proj(xe.float())) * expert.up_proj(xe.float())).double()
        assert torch.allclose(hessians[f"mlp.experts.{e}.down_proj"].double(), 2 / len(rows) * z.T @ z,
                              rtol=1e-3, atol=1e-5)
        assert notes[f"model.layers.1.mlp.experts.{e}"] == {"tokens": len(rows), "policy": "routed"}
    # the check can fail: another expert's tokens give another Hessian
    other = x[routed_tokens(x.shape[0], 4, 1)]
    assert not torch.allclose(hessians["mlp.experts.0.gate_proj"].double(), 2 / len(other) * other.T @ other,
                              rtol=1e-2, atol=1e-3)
    # the expert no token reaches had the whole layer's input pushed through it (the default policy)
    assert notes["model.layers.1.mlp.experts.3"] == {"tokens": 0, "policy": "all_tokens"}
    assert torch.allclose(hessians["mlp.experts.3.gate_proj"].double(), 2 / x.shape[0] * x.T @ x, rtol=1e-4, atol=1e-5)


def test_a_filled_expert_sees_every_token_of_the_first_windows_then_its_routed_ones_and_gives_the_same_output():
    """``every_token`` with ``fill_tokens``: over three calls (the stream at 0, 24, 48 tokens), a filled expert's
    linears see all 24 tokens of the first call, the first 6 and the routed rest of the second, and only routed
    tokens of the third; an expert not filled sees its routed tokens throughout; the block's output is the plain
    forward's in every call."""
    from llmq.arch.experts import LayerExperts
    model = _moe_model("qwen3_moe", mlp_only_layers=[])
    spec = get_arch("qwen3_moe")
    split_experts(model, spec)
    layer = model.model.layers[0]
    experts = LayerExperts(layer, spec, model.config, 0)
    module = experts.module
    gen = torch.Generator().manual_seed(5)
    calls = []
    for _ in range(3):
        hidden = torch.randn(24, module[0].gate_proj.in_features, generator=gen)
        index = torch.stack([torch.randperm(len(module), generator=gen)[:2] for _ in range(24)])
        calls.append((hidden, index, torch.rand(24, 2, generator=gen)))
    seen = {e: [] for e in (0, 1)}
    handles = [module[e].gate_proj.register_forward_pre_hook(lambda m, a, e=e: seen[e].append(a[0])) for e in seen]
    with torch.no_grad():
        plain = [module(*c) for c in calls]
        for e in seen:
            seen[e].clear()
        with experts.every_token({"mlp.experts.0"}, fill_tokens=30, position=0):
            filled = [module(*c) for c in calls]
    for h in handles:
        h.remove()
    for got, want in zip(filled, plain, strict=True):
        assert torch.allclose(got, want, atol=1e-6)

    def routed(e, c, start=0):
        hidden, index, _ = calls[c]
        rows = (index == e).any(dim=1).nonzero().flatten()
        return hidden[rows[rows >= start]]
    want0 = torch.cat([calls[0][0], calls[1][0][:6], routed(0, 1, start=6), routed(0, 2)])
    assert torch.equal(torch.cat(seen[0]), want0)
    assert torch.equal(torch.cat(seen[1]), torch.cat([routed(1, c) for c in range(3)]))
    assert module.every_token == frozenset() and module.fill_tokens == 0  # only within the context


def test_a_starved_expert_s_hessian_is_every_token_of_the_first_windows_then_its_routed_tokens(monkeypatch):
    """expert_fill_tokens=20 rounds up to 2 windows of 16 tokens: experts 0-2 (fewer routed tokens than
    expert_min_tokens=64) get every token of windows 0-1, then their routed tokens in windows 2-3, in that order.
    Batches of 2 windows: the first is all filled, so each expert must get an input of its own there (sharing a
    Hessian by input, as gate and up do, would give experts 1-3 expert 0's later tokens)."""
    cfg = QuantConfig(bits=4, group_size=32, expert_min_tokens=64, expert_fill_tokens=20)
    model, _, hessians, block_inputs, notes = _fixed_route_run(monkeypatch, cfg, batch_size=2)
    x = block_inputs[1].reshape(-1, 64).double()
    for e in range(3):
        rows = routed_tokens(32, 4, e)  # FixedRouter numbers each batch's tokens from 0
        xe = torch.cat([x[:32], x[32 + rows]])
        assert torch.allclose(hessians[f"mlp.experts.{e}.gate_proj"].double(), 2 / len(xe) * xe.T @ xe,
                              rtol=1e-4, atol=1e-5)
        assert notes[f"model.layers.1.mlp.experts.{e}"] == {"tokens": 2 * len(rows), "policy": "all_tokens"}
        everything = 2 / x.shape[0] * x.T @ x  # what an unbounded fill would give: the check can tell them apart
        assert not torch.allclose(hessians[f"mlp.experts.{e}.gate_proj"].double(), everything, rtol=1e-2, atol=1e-3)
    # expert 3 (no routed token) gets windows 0-1 only
    assert torch.allclose(hessians["mlp.experts.3.gate_proj"].double(), 2 / 32 * x[:32].T @ x[:32], rtol=1e-4,
                          atol=1e-5)


def test_a_starved_expert_s_default_fill_is_16_times_each_linear_s_own_input_width(monkeypatch, caplog):
    """With the default fill, a starved expert's gate/up (64-wide inputs) see every token of 16 x 64 = 1024, more than
    the 40 windows of 16 hold (every window), and its down (32-wide) those of the first 16 x 32 = 512 tokens, 32
    windows: its down Hessian is that of act(gate(x)) * up(x) of the quantized gate/up over exactly those tokens."""
    caplog.set_level(logging.INFO, logger="llmq")
    cfg = QuantConfig(bits=4, group_size=32)
    model, _, hessians, block_inputs, notes = _fixed_route_run(monkeypatch, cfg, batch_size=8, windows=40)
    assert notes["model.layers.1.mlp.experts.3"] == {"tokens": 0, "policy": "all_tokens"}
    x = block_inputs[1].reshape(-1, 64).double()
    assert x.shape[0] == 640
    assert torch.allclose(hessians["mlp.experts.3.gate_proj"].double(), 2 / 640 * x.T @ x, rtol=1e-4, atol=1e-5)
    expert = model.model.layers[1].mlp.experts[3]
    with torch.no_grad():
        z = (expert.act(expert.gate_proj(x[:512].float())) * expert.up_proj(x[:512].float())).double()
    assert expert.down_proj.in_features == 32
    assert torch.allclose(hessians["mlp.experts.3.down_proj"].double(), 2 / 512 * z.T @ z, rtol=1e-3, atol=1e-5)
    everything = (expert.act(expert.gate_proj(x.float())) * expert.up_proj(x.float())).double()
    assert not torch.allclose(hessians["mlp.experts.3.down_proj"].double(), 2 / 640 * everything.T @ everything,
                              rtol=1e-2, atol=1e-4)  # the check can tell the fills apart
    assert "every window (64-wide inputs)" in caplog.text and "the first 32 windows (32-wide inputs)" in caplog.text


@pytest.mark.parametrize("policy", ["all_tokens", "routed", "rtn"])
def test_an_expert_no_token_reaches_is_quantized_by_the_recorded_policy(monkeypatch, caplog, tmp_path, policy):
    caplog.set_level(logging.INFO, logger="llmq")
    cfg = QuantConfig(bits=4, group_size=32, expert_policy=policy)
    before = _moe_model("qwen3_moe", mlp_only_layers=[])
    split_experts(before, get_arch("qwen3_moe"))
    model, results, hessians, _, notes = _fixed_route_run(monkeypatch, cfg)
    got = "rtn" if policy == "routed" else policy  # "routed" with no token at all is RTN
    for i in range(2):
        name = f"model.layers.{i}.mlp.experts.3"
        assert notes[name] == {"tokens": 0, "policy": got}
        for linear in ("gate_proj", "up_proj", "down_proj"):
            qw = results[f"{name}.{linear}"]  # quantized, never skipped
            w = before.get_submodule(f"{name}.{linear}").weight
            if got == "rtn":
                assert torch.equal(qw.codes, rtn_quantize(w, cfg).codes)
            else:
                assert f"mlp.experts.3.{linear}" in hessians
    assert f"mlp.experts.3 (0: {got})" in caplog.text
    # ... and the checkpoint's metadata says so, under the checkpoint's names
    tok_free = save_packed(model, None, results, tmp_path / "out", cfg, notes=notes)
    meta = json.loads((tok_free / "config.json").read_text())["quantization_config"]["meta"]["llmq"]["experts"]
    assert meta["model.layers.0.mlp.experts.3"] == {"tokens": 0, "policy": got}
    # experts 0-2 get 43 tokens each, fewer than their 64 inputs: starved too, by the same policy
    assert meta["model.layers.0.mlp.experts.0"] == {"tokens": len(routed_tokens(64, 4, 0)), "policy": policy}


def _as_stored(model: nn.Module, results: dict) -> None:
    """The in-memory model with its unquantized tensors (router, norms, embeddings) rounded to the checkpoint's
    float16, as the checkpoint stores them: routing is discrete, and a token whose top-2 is a near-tie under
    float32 router weights may pick another expert under their float16 values."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.removesuffix(".weight") not in results:
                p.copy_(p.to(torch.float16).float())


def files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def moe_recipe(out, **kw) -> Recipe:
    c4 = shared_path("assets", "c4-sample", "c4_train_00000_first1000.jsonl")
    raw = dict(model=str(shared_path("assets", "llmq-tiny-moe")), out=str(out), group_size=128, calib=str(c4),
               nsamples=8, seqlen=128)
    return Recipe.from_dict({**raw, **kw})


TOKENS = torch.randint(0, 4096, (2, 48), generator=torch.Generator().manual_seed(4))


@pytest.mark.parametrize("method", ["gptq", "awq"])
@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
def test_tiny_moe_round_trips_through_the_packed_checkpoint(tmp_path, method, bits, sym):
    """In memory -> save -> from_pretrained gives the in-memory model's logits; streaming writes the same bytes."""
    r_mem, r_stream = (moe_recipe(tmp_path / name, method=method, bits=bits, sym=sym) for name in ("mem", "stream"))
    run = quantize(r_mem)
    save(run, r_mem)
    quantize_to_disk(r_stream)
    mem, stream = files(tmp_path / "mem"), files(tmp_path / "stream")
    assert mem.keys() == stream.keys() and [n for n in mem if mem[n] != stream[n]] == []

    packed = llmq.from_pretrained(tmp_path / "stream", torch_dtype=torch.float32)
    _as_stored(run.model, run.results)
    with torch.no_grad():
        want, got = run.model(TOKENS).logits, packed(TOKENS).logits
    assert torch.allclose(got, want, atol=2e-2, rtol=1e-3), (got - want).abs().max()
    cfg = json.loads((tmp_path / "stream" / "config.json").read_text())
    experts = cfg["quantization_config"]["meta"]["llmq"]["experts"]
    assert len(experts) == 4 * 8 and sum(e["tokens"] for e in experts.values()) == 4 * 2 * 8 * 128  # top-2 routing
    from safetensors import safe_open
    with safe_open(str(tmp_path / "stream" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    # per-expert tensors under the names GPTQModel writes and vLLM stacks; the router stays in fp16
    assert {"model.layers.3.mlp.experts.7.down_proj.qweight", "model.layers.0.mlp.experts.0.gate_proj.scales",
            "model.layers.2.mlp.gate.weight"} <= keys
    assert not any(k.startswith("model.layers.2.mlp.gate.q") for k in keys)
    # which of vLLM's fused-MoE paths would serve it (hidden 256, experts 256 wide)
    moe = checkpoint_info(tmp_path / "stream")["vllm_moe"]
    want = {(4, True): "gptq_marlin (fused MoE)", (4, False): "moe_wna16", (3, True): "none", (3, False): "none"}
    assert moe["kernel"] == want[(bits, sym)]
    assert any("--sym" in note for note in moe["notes"]) == (bits == 4 and not sym)


def test_tiny_moe_same_recipe_twice_gives_the_same_bytes(tmp_path):
    for name in ("a", "b"):
        quantize_to_disk(moe_recipe(tmp_path / name, method="gptq", bits=3, act_order=True))
    a, b = files(tmp_path / "a"), files(tmp_path / "b")
    assert a.keys() == b.keys() and [n for n in a if a[n] != b[n]] == []


def test_mixtral_reads_and_writes_the_checkpoint_s_own_names(tmp_path):
    """Mixtral's checkpoints say block_sparse_moe.experts.E.w1; transformers 5 says mlp.experts (fused). The streaming
    reader maps one to the other, the packed checkpoint keeps the on-disk names, and it loads back."""
    from safetensors import safe_open
    from transformers import AutoTokenizer

    model = _moe_model("mixtral", vocab_size=512)  # stories260K's tokenizer
    model.save_pretrained(tmp_path / "fp")
    AutoTokenizer.from_pretrained(shared_path("assets", "stories260K")).save_pretrained(tmp_path / "fp")
    with safe_open(str(tmp_path / "fp" / "model.safetensors"), "pt") as f:
        assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in set(f.keys())
    text = shared_path("assets", "tinystories-text", "TinyStories-valid.Ahmedessaa-30k.txt")
    r = Recipe.from_dict(dict(model=str(tmp_path / "fp"), out=str(tmp_path / "q"), bits=4, group_size=32,
                              calib=str(text), nsamples=4, seqlen=32))
    quantize_to_disk(r)
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert {"model.layers.1.block_sparse_moe.experts.3.w3.qweight",
            "model.layers.1.block_sparse_moe.gate.weight"} <= keys
    assert not any(".mlp." in k for k in keys)
    run = quantize(Recipe.from_dict({**r.to_dict(), "out": str(tmp_path / "mem")}))
    _as_stored(run.model, run.results)
    packed = llmq.from_pretrained(tmp_path / "q", torch_dtype=torch.float32)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(packed(ids).logits, run.model(ids).logits, atol=2e-2, rtol=1e-3)


def test_experts_observed_in_chunks_give_the_same_codes(monkeypatch):
    """The Hessian budget splits a MoE group into chunks of experts; the results are those of one pass."""
    import llmq.job.methods as methods

    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(2))
    cfg = QuantConfig(bits=4, group_size=32, act_order=True)
    whole = quantize_layers(_moe_model("qwen2_moe"), ids, cfg, batch_size=2)
    chunks = []
    split = methods._chunks
    monkeypatch.setattr(methods, "HESSIAN_BYTES", 1)  # one expert (or the shared expert) per chunk
    monkeypatch.setattr(methods, "_chunks", lambda job, group: chunks.append(len(split(job, group))) or
                        split(job, group))
    chunked = quantize_layers(_moe_model("qwen2_moe"), ids, cfg, batch_size=2)
    assert max(chunks) == 5  # 4 experts and the shared expert
    assert whole.keys() == chunked.keys()
    for name in whole:
        assert torch.equal(whole[name].codes, chunked[name].codes), name
        assert torch.equal(whole[name].scales, chunked[name].scales), name


def test_observing_forwards_run_only_the_observed_experts_and_give_the_same_codes(monkeypatch):
    """While a chunk's statistics are gathered only its experts run, and their down only when a down is observed
    (one expert per chunk here, starved ones filled for part of the stream); the codes equal those of the
    reference, forwards that run every expert whole."""
    import contextlib

    import llmq.job.methods as methods
    from llmq.arch.experts import Expert, LayerExperts

    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(2))
    cfg = QuantConfig(bits=4, group_size=32, expert_min_tokens=24, expert_fill_tokens=20)
    monkeypatch.setattr(methods, "HESSIAN_BYTES", 1)
    forward = Expert.forward
    rows = {}

    def counting(self, x, down=True):
        rows[key] = rows.get(key, 0) + x.shape[0] * (3 if down else 2)  # linears' rows computed
        return forward(self, x, down)
    monkeypatch.setattr(Expert, "forward", counting)
    results = {}
    for key in ("observing", "reference"):
        if key == "reference":
            monkeypatch.setattr(LayerExperts, "observing", lambda self, linears: contextlib.nullcontext())
        notes = {}
        results[key] = quantize_layers(_moe_model("qwen3_moe", mlp_only_layers=[]), ids, cfg, batch_size=2,
                                       notes=notes)
        assert {v["policy"] for k, v in notes.items() if "experts" in k} == {"routed", "all_tokens"}
    assert results["observing"].keys() == results["reference"].keys()
    for name, qw in results["reference"].items():
        assert torch.equal(results["observing"][name].codes, qw.codes), name
        assert torch.equal(results["observing"][name].scales, qw.scales), name
    assert rows["observing"] * 2 < rows["reference"], rows


def test_a_group_of_experts_is_observed_from_block_inputs_computed_once_with_the_same_codes(monkeypatch):
    """Within one group (chunked by the Hessian budget into one expert per chunk, each observed for its routed and
    its filled tokens) the attention before the experts runs once per layer for the gate/up group and once for
    the down group, plus the attention group's own passes; the codes equal those of a pass through the layer
    for every chunk, bit for bit."""
    import contextlib

    import llmq.job.methods as methods
    from llmq.job.methods import LayerJob

    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(2))
    cfg = QuantConfig(bits=4, group_size=32, expert_min_tokens=24, expert_fill_tokens=20)
    monkeypatch.setattr(methods, "HESSIAN_BYTES", 1)
    results, passes = {}, {}
    for key in ("kept", "every pass"):
        if key == "every pass":
            monkeypatch.setattr(LayerJob, "expert_inputs_kept", lambda self: contextlib.nullcontext())
        model = _moe_model("qwen3_moe", mlp_only_layers=[])
        calls = passes.setdefault(key, [])
        for layer in model.model.layers:  # batches of 2 windows, so a pass over the 4 windows is 2 calls
            layer.self_attn.register_forward_pre_hook(lambda m, a, calls=calls: calls.append(1))
        notes = {}
        results[key] = quantize_layers(model, ids, cfg, batch_size=2, notes=notes)
        assert {v["policy"] for k, v in notes.items() if "experts" in k} == {"routed", "all_tokens"}
    # per layer: q/k/v, o, the count and gate/up, down, and the final propagation
    assert len(passes["kept"]) == 2 * 2 * 5, {k: len(v) for k, v in passes.items()}
    assert len(passes["every pass"]) > 2 * len(passes["kept"]), {k: len(v) for k, v in passes.items()}
    assert results["kept"].keys() == results["every pass"].keys()
    for name, qw in results["every pass"].items():
        for field in ("codes", "scales", "zeros"):
            assert torch.equal(getattr(results["kept"][name], field), getattr(qw, field)), (name, field)


def test_starved_experts_sum_their_common_first_windows_once(monkeypatch):
    """The first windows' tokens, which every starved expert's gate/up reads, are summed into one Gram matrix and
    added to each one's routed tokens after them: the Hessians equal those of each expert summing all its own
    inputs, and the rows summed for the gate/up groups drop by the fill for every starved expert but one."""
    import contextlib

    from llmq.algorithms.gptq import HessianAccumulator
    from llmq.arch.experts import LayerExperts

    cfg = QuantConfig(bits=4, group_size=32, expert_min_tokens=64, expert_fill_tokens=20)
    add, runs = HessianAccumulator.add, {}
    for key in ("shared", "each its own"):
        rows = []
        monkeypatch.setattr(HessianAccumulator, "add", lambda self, x, rows=rows: rows.append(
            x.reshape(-1, x.shape[-1]).shape[0] if x.shape[-1] == 64 else 0) or add(self, x))
        if key == "each its own":
            monkeypatch.setattr(LayerExperts, "fill_shared", lambda self, sink: contextlib.nullcontext())
        _, _, hessians, _, notes = _fixed_route_run(monkeypatch, cfg, batch_size=2)
        runs[key] = hessians, sum(rows)
    starved = [k for k, v in notes.items() if v["policy"] == "all_tokens"]
    assert len(starved) == 2 * 4  # every expert of both layers
    (shared, shared_rows), (own, own_rows) = runs.values()
    assert shared.keys() == own.keys()
    for name, H in own.items():
        assert torch.allclose(shared[name], H, rtol=1e-5, atol=1e-6), name
    fill = 32  # 20 tokens round up to 2 windows of 16
    assert own_rows - shared_rows == 2 * (4 - 1) * fill, (own_rows, shared_rows)


def test_a_bf16_moe_computing_in_float32_casts_one_expert_at_a_time_with_the_same_gate_up_codes(monkeypatch):
    """A bf16 MoE whose layer forwards run in float32 (a CPU without bf16 matmuls): the attention, norms and router
    are cast for the layer, but the experts stay bf16, each cast for its own call only, so at most one expert's
    linears are float32 at any time. The gate/up codes equal those of casting the whole layer (same float32 values
    either way). The downs, and the next layer, read gate/up written back in bf16, as a device computing in bf16
    does: on held-out tokens the logits move from the whole layer's less than computing in bf16 moves them."""
    import llmq.job.pipeline as pipeline
    from llmq.arch.experts import Expert

    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(2))
    held_out = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(9))
    cfg = QuantConfig(bits=4, group_size=32, expert_min_tokens=24, expert_fill_tokens=20)
    widest, runs, logits = [], {}, {}  # float32 expert linears whenever an expert linear runs
    for key, work in (("one at a time", torch.float32), ("whole layer", torch.float32), ("bf16", torch.bfloat16)):
        if key == "whole layer":
            monkeypatch.setattr(pipeline, "experts_of", lambda layer: [])
        model = _moe_model("qwen3_moe", mlp_only_layers=[]).to(torch.bfloat16)
        split_experts(model, get_arch("qwen3_moe"))
        experts = [m for m in model.modules() if isinstance(m, Expert)]

        def count(module, args, experts=experts, key=key):
            if key == "one at a time":
                widest.append(sum(p.dtype == torch.float32 for e in experts for p in e.parameters()))
        for e in experts:
            for linear in e.children():
                linear.register_forward_pre_hook(count)
        runs[key] = quantize_layers(model, ids, cfg, batch_size=2, work_dtype=work)
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
        with torch.no_grad():
            logits[key] = model(held_out).logits.float()
    assert widest and max(widest) in (2, 3), max(widest)  # gate/up observed alone, or the whole expert
    reference = runs["whole layer"]
    gate_up = [n for n in reference if n.endswith(("gate_proj", "up_proj")) and n.startswith("model.layers.0.")]
    assert len(gate_up) == 8
    for name in gate_up:
        assert torch.equal(runs["one at a time"][name].codes, reference[name].codes), name
    moved = {k: (logits[k] - logits["whole layer"]).norm().item() for k in ("one at a time", "bf16")}
    assert 0 < moved["one at a time"] < 0.75 * moved["bf16"], moved


def test_starved_experts_sharing_every_token_are_solved_together_as_they_are_alone(monkeypatch):
    """Experts that all see every token share one Hessian: their gate/up rows are stacked into one GPTQ solve with
    each expert's own gate/up; the codes are those of one solve per linear, bit for bit."""
    import llmq.algorithms.gptq
    import llmq.job.methods as methods

    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(2))
    cfg = QuantConfig(bits=4, group_size=32, expert_min_tokens=40)  # most experts starved, the fill every window
    solves, solve = [], llmq.algorithms.gptq.gptq_quantize
    monkeypatch.setattr(methods, "gptq_quantize", lambda W, H, c: solves.append(W.shape[0]) or solve(W, H, c))
    runs, counts, default = {}, {}, methods.JOINT_BYTES
    for joint in (default, 0):
        monkeypatch.setattr(methods, "JOINT_BYTES", joint)
        solves.clear()
        runs[joint] = quantize_layers(_moe_model("qwen3_moe", mlp_only_layers=[]), ids, cfg, batch_size=2)
        counts[joint] = len(solves)
    assert counts[default] + 4 < counts[0], counts
    together, alone = runs.values()
    for name, qw in alone.items():
        for field in ("codes", "scales", "zeros"):
            assert torch.equal(getattr(together[name], field), getattr(qw, field)), (name, field)


def test_bad_expert_settings_are_refused_with_the_choices():
    from llmq.errors import ConfigError

    with pytest.raises(ConfigError, match="all_tokens, routed, rtn"):
        QuantConfig(expert_policy="skip")
    with pytest.raises(ConfigError, match="expert_min_tokens"):
        Recipe.from_dict(dict(model="m", expert_min_tokens=-1))
    with pytest.raises(ConfigError, match="expert_fill_tokens"):
        Recipe.from_dict(dict(model="m", expert_fill_tokens=-1))


def test_tiny_moe_killed_after_two_layers_resumes_to_the_same_bytes(tmp_path):
    """The experts' token counts of the layers finished before the kill reach the metadata from the saved state."""
    import os
    import signal
    import subprocess
    import sys

    ref = moe_recipe(tmp_path / "ref", method="gptq", bits=4, sym=True)
    quantize_to_disk(ref)
    r = moe_recipe(tmp_path / "q", method="gptq", bits=4, sym=True)
    argv = ["quantize", r.model, "--bits", "4", "--sym", "--group-size", "128", "--calib", r.calib.calib,
            "--nsamples", str(r.calib.nsamples), "--seqlen", str(r.calib.seqlen), "--out", r.out]
    proc = subprocess.run([sys.executable, "-m", "llmq.cli", *argv], capture_output=True, text=True,
                          env={**os.environ, "LLMQ_KILL_AT": "layer.committed@2"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert json.loads((tmp_path / ".q.partial" / "progress.json").read_text())["next_layer"] == 2
    quantize_to_disk(r)
    a, b = files(tmp_path / "ref"), files(tmp_path / "q")
    assert a.keys() == b.keys() and [n for n in a if a[n] != b[n]] == []
