"""Block-wise reconstruction (llmq/algorithms/tune.py): the learnable grid, the tuning loop, and the method in the
pipeline."""

import dataclasses

import pytest
import torch
from helpers import shared_path, tiny_model

from llmq.algorithms.quant import QuantizedWeight, rtn_quantize
from llmq.algorithms.tune import TunableWeight, into_cells, round_ste, tune_block
from llmq.config import QuantConfig
from llmq.errors import ConfigError
from llmq.job.e2e import quantize_model
from llmq.job.pipeline import quantize_layers


def test_round_ste_rounds_forward_and_passes_the_gradient_through():
    x = torch.tensor([0.2, 0.7, -1.6], requires_grad=True)
    y = round_ste(x)
    y.sum().backward()
    assert torch.equal(y.detach(), torch.round(x.detach()))
    assert torch.equal(x.grad, torch.ones(3))


@pytest.mark.parametrize("bits,group_size,sym", [(3, 32, False), (4, 64, True), (2, -1, False)])
def test_a_tunable_weight_starts_at_its_start_and_rounds_to_its_own_forward(bits, group_size, sym):
    torch.manual_seed(0)
    w = torch.randn(48, 128)
    start = rtn_quantize(w, QuantConfig(method="rtn", bits=bits, group_size=group_size, sym=sym))
    t = TunableWeight(w, start)
    assert torch.equal(t().detach(), start.dequantize())  # FP weights round to the RTN codes exactly
    with torch.no_grad():  # anywhere on the grid, the exported codes decode to what the forward computed
        t.offset.normal_(0, 0.7)
        t.log_scale.normal_(0, 0.1)
        t.zero_shift.normal_(0, 0.8) if not sym else None
    qw = t.quantized()
    assert qw.scales.dtype == torch.float32 and torch.equal(qw.scales, qw.scales.half().float())
    assert torch.allclose(qw.dequantize(), t().detach(), atol=1e-6)
    assert int(qw.codes.max()) <= 2**bits - 1
    if sym:
        assert torch.equal(qw.zeros, start.zeros)  # a symmetric grid keeps its fixed zero point


@pytest.mark.parametrize("group_size", [32, -1])
def test_contiguous_groups_broadcast_to_the_weights_and_gradients_of_the_reference_gather(group_size):
    torch.manual_seed(0)
    w = torch.randn(48, 128)
    start = rtn_quantize(w, QuantConfig(method="rtn", bits=3, group_size=group_size, sym=False))
    fast, slow = TunableWeight(w, start), TunableWeight(w, start)
    assert fast.group_width == (group_size if group_size > 0 else 128)
    slow.group_width = None  # the reference: one gather per weight
    assert torch.equal(fast.step0, slow.per_weight(slow.scale0))
    for t in (fast, slow):
        torch.manual_seed(1)
        with torch.no_grad():
            t.offset.normal_(0, 0.7)
            t.log_scale.normal_(0, 0.1)
            t.zero_shift.normal_(0, 0.8)
    upstream = torch.randn(48, 128)
    outs = [t() for t in (fast, slow)]
    assert torch.equal(outs[0], outs[1])
    for y in outs:
        (y * upstream).sum().backward()
    for name in ("offset", "log_scale", "zero_shift"):  # a sum per group against a scatter-add: the order differs
        torch.testing.assert_close(getattr(fast, name).grad, getattr(slow, name).grad, rtol=1e-5, atol=1e-6)
    perm = torch.randperm(128)  # act-order groups are not contiguous: those gather
    shuffled = QuantizedWeight(start.codes[:, perm], start.scales, start.zeros, start.g_idx[perm], 3, group_size, False)
    if group_size > 0:
        assert TunableWeight(w[:, perm], shuffled).group_width is None


def _linear_block():
    """A block of one linear and a nonlinearity, as ``tune_block`` sees a decoder layer."""
    def forward(weights, x):
        return torch.nn.functional.gelu(x @ weights["lin"].T)
    return forward


def test_tuning_lowers_the_block_loss_deterministically_and_keeps_a_start_it_cannot_beat():
    torch.manual_seed(0)
    w = torch.randn(64, 64) / 8
    x = torch.randn(16, 8, 64)
    forward = _linear_block()
    targets = forward({"lin": w}, x)
    cfg = QuantConfig(method="tune", bits=3, group_size=32, sym=False, tune_iters=200, tune_lr=1e-3)
    start = {"lin": rtn_quantize(w, cfg)}
    runs = [tune_block(forward, x, targets, start, {"lin": w}, cfg, seed=1) for _ in range(2)]
    res = runs[0]
    assert not res.kept_start and res.loss_after < 0.9 * res.loss_before
    rtn_loss = (forward({"lin": start["lin"].dequantize()}, x) - targets).pow(2).mean().item()
    assert res.loss_before == pytest.approx(rtn_loss, rel=1e-5)
    tuned = res.weights["lin"]
    assert res.loss_after == pytest.approx((forward({"lin": tuned.dequantize()}, x) - targets).pow(2).mean().item(),
                                           rel=1e-5)  # the exported codes are the weights the loss was measured on
    assert all(torch.equal(getattr(tuned, k), getattr(runs[1].weights["lin"], k)) for k in ("codes", "scales", "zeros"))
    idle = tune_block(forward, x, targets, start, {"lin": w}, dataclasses.replace(cfg, tune_iters=0))
    assert idle.kept_start and idle.weights["lin"] is start["lin"]


def test_tune_settings_are_validated():
    with pytest.raises(ConfigError, match="tune_batch"):
        QuantConfig(method="tune", tune_batch=0)
    with pytest.raises(ConfigError, match="tune_seed=-1"):
        QuantConfig(method="tune", tune_seed=-1)


def test_tune_seed_offsets_each_layers_window_draws(monkeypatch):
    """Layer i draws with ``tune_seed + i``: the same seed gives the same codes, another seed other draws."""
    import llmq.job.methods

    seeds = []
    real = llmq.job.methods.tune_block

    def recording(*args, seed=0, **kwargs):
        seeds.append(seed)
        return real(*args, seed=seed, **kwargs)

    monkeypatch.setattr(llmq.job.methods, "tune_block", recording)
    torch.manual_seed(0)
    ids = torch.randint(0, tiny_model("llama").config.vocab_size, (8, 16))

    def codes(tune_seed: int) -> dict[str, torch.Tensor]:
        model = tiny_model("llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2).eval()
        cfg = QuantConfig(method="tune", bits=3, group_size=32, sym=False, tune_iters=20, tune_batch=2,
                          tune_seed=tune_seed)
        return {name: qw.codes for name, qw in quantize_layers(model, ids, cfg).items()}

    first, again, other = codes(0), codes(0), codes(7)
    assert seeds == [0, 1, 0, 1, 7, 8]
    assert all(torch.equal(first[n], again[n]) for n in first)
    assert any(not torch.equal(first[n], other[n]) for n in first)


def test_the_tuned_layers_lose_less_of_the_fp_output_than_their_rtn_start():
    torch.manual_seed(0)
    model = tiny_model("llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2).eval()
    ids = torch.randint(0, model.config.vocab_size, (8, 32))
    with torch.no_grad():
        fp = model(ids).logits
    errors = {}
    for method in ("rtn", "tune"):
        q = tiny_model("llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2).eval()
        notes = {}
        cfg = QuantConfig(method=method, bits=2, group_size=32, sym=False, mse=True, tune_iters=40)
        quantize_layers(q, ids, cfg, notes=notes)
        with torch.no_grad():
            errors[method] = (q(ids).logits - fp).pow(2).mean().item()
    # each layer's block loss before and after is recorded for the checkpoint's metadata
    losses = [notes[f"tune_loss/model.layers.{i}"] for i in range(2)]
    assert all(v["after"] < v["before"] for v in losses), losses
    assert errors["tune"] < 0.9 * errors["rtn"], errors


def test_a_layer_whose_linears_all_stay_fp_passes_through_and_the_others_are_tuned():
    """``keep_fp`` holding every linear of a layer left ``tune`` nothing to tune there (it raised StopIteration)."""
    torch.manual_seed(0)
    model = tiny_model("llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2).eval()
    fp = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, model.config.vocab_size, (4, 32))
    notes = {}
    cfg = QuantConfig(method="tune", bits=3, group_size=32, sym=False, tune_iters=5)
    results = quantize_layers(model, ids, cfg, notes=notes, keep_fp=lambda name, m: name.startswith("model.layers.0."))
    assert results and all(name.startswith("model.layers.1.") for name in results)
    assert all(torch.equal(v, fp[k]) for k, v in model.state_dict().items() if k.startswith("model.layers.0."))
    assert "tune_loss/model.layers.1" in notes and "tune_loss/model.layers.0" not in notes


def test_into_cells_leaves_an_rtn_start_alone_and_makes_any_start_decode_to_itself():
    """The end-to-end phase starts its continuous weights from the FP ones moved into the start's rounding cells."""
    torch.manual_seed(0)
    w = torch.randn(48, 128)
    cfg = QuantConfig(method="rtn", bits=3, group_size=32, sym=False, mse=True)
    rtn = rtn_quantize(w, cfg)
    assert torch.equal(into_cells(w, rtn), w)
    # another start (as GPTQ's or tune's codes): a fifth of the codes one step away, clamped to the grid
    codes = rtn.codes.long()
    moved = torch.rand(codes.shape) < 0.2
    codes = torch.where(moved, codes + torch.where(torch.rand(codes.shape) < 0.5, -1, 1), codes).clamp(0, 7)
    other = QuantizedWeight(codes.to(torch.uint8), rtn.scales, rtn.zeros, rtn.g_idx, 3, 32, False)
    inside = into_cells(w, other)
    assert torch.equal(TunableWeight(inside, other)().detach(), other.dequantize())
    same = codes == rtn.codes.long()
    assert torch.equal(inside[same], w[same]) and not torch.equal(inside[~same], w[~same])


def _kl_to(fp_logits: torch.Tensor, logits: torch.Tensor) -> float:
    return torch.nn.functional.kl_div(logits.log_softmax(-1).flatten(0, 1), fp_logits.log_softmax(-1).flatten(0, 1),
                                      log_target=True, reduction="batchmean").item()


def test_the_end_to_end_phase_lowers_the_models_kl_to_fp_deterministically():
    torch.manual_seed(0)
    ids = torch.randint(0, tiny_model("llama").config.vocab_size, (8, 32))
    with torch.no_grad():
        fp = tiny_model("llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2).eval()(ids).logits

    def run(steps: int):
        model = tiny_model("llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2).eval()
        notes = {}
        cfg = QuantConfig(method="tune", bits=2, group_size=32, sym=False, tune_iters=20, e2e_steps=steps,
                          e2e_batch=4)
        results = quantize_model(model, ids, cfg, notes=notes)
        with torch.no_grad():
            kl = _kl_to(fp, model(ids).logits)
        for name, qw in results.items():  # the model holds the returned codes' values
            assert torch.equal(model.get_submodule(name).weight, qw.dequantize()), name
        return results, notes, kl

    block, _, kl_block = run(0)
    tuned, notes, kl_tuned = run(40)
    again, _, _ = run(40)
    e2e = notes["e2e/kl"]
    assert e2e["before"] == pytest.approx(kl_block, rel=1e-4)  # it starts from the block-wise result
    assert e2e["after"] == pytest.approx(kl_tuned, rel=1e-4)  # and the exported codes are what it measured
    assert kl_tuned < 0.8 * kl_block, (kl_tuned, kl_block)
    assert any(not torch.equal(tuned[n].codes, block[n].codes) for n in tuned)
    assert all(torch.equal(getattr(tuned[n], k), getattr(again[n], k)) for n in tuned for k in ("codes", "scales",
                                                                                             "zeros"))


def test_end_to_end_settings_are_validated_and_refused_where_the_model_is_streamed(tmp_path, monkeypatch):
    from llmq.config import Recipe
    from llmq.job.distributed import Ranks, check_distributed
    from llmq.job.plan import plan
    from llmq.job.runner import quantize_to_disk

    with pytest.raises(ConfigError, match="e2e_batch=0"):
        QuantConfig(e2e_steps=10, e2e_batch=0)
    with pytest.raises(ConfigError, match="e2e_steps=-1"):
        QuantConfig(e2e_steps=-1)
    with pytest.raises(ConfigError, match="torch.distributed"):
        check_distributed(QuantConfig(method="gptq", e2e_steps=10), Ranks(0, 2))
    recipe = Recipe.from_dict(dict(model=str(shared_path("assets", "llmq-tiny-llama")), method="tune", e2e_steps=10,
                                   out=str(tmp_path / "q")))
    with pytest.raises(ConfigError, match="does not stream"):
        quantize_to_disk(recipe)
    assert not (tmp_path / "q").exists()
    import llmq.job.plan

    monkeypatch.setattr(llmq.job.plan, "activation_budget", lambda device: 2**20)  # 2 MiB free: the phase cannot fit
    with pytest.raises(ConfigError, match="holds the whole model at once"):
        plan(recipe)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral", "gemma2", "phi3"])
def test_the_end_to_end_phase_runs_on_experts_and_other_families(model_type):
    """The phase names no architecture: the experts' linears (split from fused tensors), Gemma 2's soft-capped head
    and Phi-3's fused projections are tuned like a LLaMA's linears."""
    torch.manual_seed(0)
    model = tiny_model(model_type)
    ids = torch.randint(0, model.config.vocab_size, (8, 32))
    notes = {}
    cfg = QuantConfig(method="rtn", bits=3, group_size=32, sym=False, e2e_steps=20, e2e_batch=4)
    results = quantize_model(model, ids, cfg, notes=notes)
    assert notes["e2e/kl"]["after"] < notes["e2e/kl"]["before"]
    assert all(torch.equal(model.get_submodule(n).weight, qw.dequantize()) for n, qw in results.items())
    if model_type in ("qwen3_moe", "mixtral"):
        assert any(".experts." in n for n in results)
