"""Mixed precision to a bits-per-weight budget (issue 14): allocation, dynamic rules, mixed checkpoints."""

import itertools
import json

import pytest
import torch
from helpers import shared_path
from transformers import AutoModelForCausalLM

import llmq
from llmq.cli import main as cli_main
from llmq.config import QuantConfig, Recipe, Width
from llmq.errors import ConfigError
from llmq.formats.dynamic import module_settings, override_rule, skip_rule
from llmq.formats.info import checkpoint_info
from llmq.formats.pack import gptq_storage_bits
from llmq.job.mixed import Unit, allocate, check_budget, floor_bits, make_units
from llmq.job.plan import plan
from llmq.job.runner import quantize, quantize_to_disk
from llmq.runtime.qlinear import QuantLinear

WIDTHS = (Width(2, 128), Width(3, 128), Width(4, 128), Width(8, 128))


def synthetic_units(seed: int, n: int = 6) -> list[Unit]:
    """Units of random shapes whose error falls with the bits, by a random sensitivity each."""
    g = torch.Generator().manual_seed(seed)
    shapes = [{f"l{i}": (int(128 * torch.randint(1, 4, (1,), generator=g)), 256)} for i in range(n)]
    units = make_units(shapes, WIDTHS)
    for unit in units:
        s = float(torch.rand(1, generator=g)) * 10
        unit.errors = {w: s * 4.0 ** -w.bits * (1 + 0.3 * float(torch.rand(1, generator=g))) for w in unit.costs}
    return units


@pytest.mark.parametrize("seed", range(5))
def test_the_allocation_stays_within_budget_and_is_near_the_exhaustive_optimum(seed):
    units = synthetic_units(seed)
    weights = sum(u.weights for u in units)
    for bpw in (2.5, 3.2, 3.9, 5.0):
        budget = bpw * weights
        choice = allocate(units, budget)
        cost = sum(u.costs[w] for u, w in zip(units, choice, strict=True))
        err = sum(u.errors[w] for u, w in zip(units, choice, strict=True))
        assert cost <= budget
        feasible = [sum(u.errors[w] for u, w in zip(units, c, strict=True))
                    for c in itertools.product(WIDTHS, repeat=len(units))
                    if sum(u.costs[w] for u, w in zip(units, c, strict=True)) <= budget]
        best = min(feasible)
        for w in WIDTHS:  # never worse than a uniform width that fits
            if sum(u.costs[w] for u in units) <= budget:
                assert err <= sum(u.errors[w] for u in units) + 1e-12
        assert err <= 1.25 * best, (err, best)  # the greedy hull walk is within a quarter of the optimum here
        assert choice == allocate(units, budget)  # deterministic


def test_the_floor_is_the_widest_bits_every_unit_can_take_at_once_within_the_budget(caplog):
    units = make_units([{"a": (128, 256)}, {"b": (256, 256)}, {"c": (128, 384)}], (*WIDTHS, Width(3, 64)))
    weights = sum(u.weights for u in units)

    def uniform(bits):  # each unit at its cheapest width of that many bits
        return sum(min(c for w, c in u.costs.items() if w.bits == bits) for u in units)

    assert uniform(3) == sum(u.costs[Width(3, 128)] for u in units)  # g128 is the cheaper 3-bit width
    assert floor_bits(units, uniform(3)) == 3 and floor_bits(units, uniform(4) - 1) == 3
    assert floor_bits(units, uniform(4)) == 4 and floor_bits(units, 16 * weights) == 8
    assert floor_bits(units, uniform(2) - 1) == 2  # nothing fits: the narrowest, for check_budget to refuse
    units[2].costs = {w: c for w, c in units[2].costs.items() if w.bits != 3}  # no 3-bit width for c
    assert floor_bits(units, uniform(4) - 1) == 2
    # a run measures and allocates from the floor up: at W3 g128's cost plus a little, no group goes to 2 bits
    from llmq.job.pipeline import noted_widths, quantize_layers

    model = AutoModelForCausalLM.from_pretrained(shared_path("assets", "llmq-tiny-llama"))
    notes: dict = {}
    with caplog.at_level("INFO", logger="llmq.job.pipeline"):
        quantize_layers(model, torch.randint(0, 512, (4, 32)), QuantConfig(bits=3, group_size=128, method="rtn",
                        bits_per_weight=3.3), device="cpu", notes=notes)
    assert "mixed precision candidates: 3g128, 4g128, 8g128 (none below 3 bits" in caplog.text
    widths = {f"{w.bits}g{w.group_size}" for w in noted_widths(notes).values()}
    assert "3g128" in widths and "4g128" in widths and "2g128" not in widths


def test_the_storage_count_is_the_one_llmq_info_reports():
    # qweight 3 bits, qzeros 3 bits and fp16 scales per group and output, int32 g_idx per input
    assert gptq_storage_bits(256, 128, 3, 64) == 256 * 128 * 3 + 4 * 128 * 19 + 32 * 256
    assert gptq_storage_bits(256, 128, 4, -1) == 256 * 128 * 4 + 128 * 20 + 32 * 256


def test_a_budget_no_width_can_meet_is_refused_with_the_least_it_allows():
    units = make_units([{"a": (128, 256)}], WIDTHS)
    with pytest.raises(ConfigError, match=r"below what the narrowest .* \(2\.391 bits"):
        check_budget(units, QuantConfig(bits_per_weight=2.1, mixed_widths=tuple(map(str, WIDTHS))))
    with pytest.raises(ConfigError, match="not a multiple of any candidate group size"):
        check_budget(make_units([{"b": (128, 96)}], WIDTHS), QuantConfig(bits_per_weight=3.0))


def test_widths_parse_and_bad_ones_name_the_form():
    assert QuantConfig(group_size=64, bits_per_weight=3.3).mixed_widths == ("2g64", "3g64", "4g64", "8g64")
    assert QuantConfig(bits_per_weight=3.3, mixed_widths="3g128, 4g-1").widths == (Width(3, 128), Width(4, -1))
    for bad in ("3x128", "5g128", "3g0"):
        with pytest.raises(ConfigError, match="width"):
            QuantConfig(bits_per_weight=3.3, mixed_widths=(bad,))
    with pytest.raises(ConfigError, match="must be in"):
        QuantConfig(bits_per_weight=0.5)


def test_dynamic_rules_follow_the_first_match_as_vllm_reads_them():
    qc = {"bits": 3, "group_size": 128, "sym": False, "desc_act": False,
          "dynamic": {skip_rule("model.layers.0.mlp.down_proj"): {},
                      override_rule("model.layers.0.mlp.up_proj"): {"bits": 4, "sym": True},
                      r"+:^model\.layers\.0\..*": {"bits": 8}}}
    assert module_settings(qc, "model.layers.0.mlp.down_proj") is None
    assert module_settings(qc, "model.layers.0.mlp.up_proj") == {"bits": 4, "group_size": 128, "sym": True,
                                                                 "desc_act": False}
    assert module_settings(qc, "model.layers.0.mlp.gate_proj")["bits"] == 8
    assert module_settings(qc, "model.layers.1.mlp.up_proj")["bits"] == 3
    assert module_settings(qc, "model.layers.0.mlp.up_proj_x")["bits"] == 8  # the exact rule is anchored


def tiny_llama_recipe(out, **kw) -> Recipe:
    return Recipe.from_dict({**dict(model=str(shared_path("assets", "llmq-tiny-llama")), out=str(out), method="gptq",
                                    calib=str(shared_path("assets", "tinystories-text",
                                                          "tinystories_sample.cs336.txt")),
                                    nsamples=4, seqlen=64, group_size=128), **kw})


def test_an_impossible_budget_is_refused_before_calibration(tmp_path):
    with pytest.raises(ConfigError, match="bits_per_weight=2.1 is below"):
        plan(tiny_llama_recipe(tmp_path / "q", bits_per_weight=2.1))
    with pytest.raises(ConfigError, match="AWQ GEMM layout holds one width"):
        plan(tiny_llama_recipe(tmp_path / "q", bits_per_weight=3.5, format="awq", method="awq"))


def test_a_mixed_checkpoint_reloads_with_equal_logits_and_info_lists_its_widths(tmp_path, capsys):
    r = tiny_llama_recipe(tmp_path / "q", bits_per_weight=3.5)
    run = quantize(r)  # in memory: the model the checkpoint must decode to
    quantize_to_disk(r)  # streamed, as users run it
    info = checkpoint_info(r.out)
    assert info["effective_bits_per_weight"] <= 3.5
    assert len(info["widths"]) > 1 and sum(w["linears"] for w in info["widths"]) == 6 * 7
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    base = (qc["bits"], qc["group_size"], qc["sym"])
    for name, w in info["allocation"].items():  # every linear's width, from its dynamic rule or the base
        settings = module_settings(qc, name)
        assert (settings["bits"], settings["group_size"], settings["sym"]) == (w["bits"], w["group_size"], w["sym"])
    assert all(key.startswith("+:^") for key in qc["dynamic"]) and base not in [
        (v["bits"], v["group_size"], v["sym"]) for v in qc["dynamic"].values()]
    pure = {name: m for name, m in llmq.from_pretrained(r.out, torch_dtype=torch.float32, kernel="pure")
            .named_modules() if isinstance(m, QuantLinear)}
    assert {name: m.bits for name, m in pure.items()} == {name: w["bits"] for name, w in info["allocation"].items()}
    for name, m in pure.items():
        assert torch.equal(m.dequantized_weight(torch.float32), run.results[name].dequantize()), name
    loaded = llmq.from_pretrained(r.out, torch_dtype=torch.float32)  # each linear on the kernel chosen for it
    x = torch.randint(0, 512, (2, 64))
    with torch.no_grad():
        want, got = run.model(x).logits, loaded(x).logits
    assert torch.allclose(got, want, atol=2e-2, rtol=1e-3), (got - want).abs().max()
    cli_main(["info", r.out])
    out = capsys.readouterr().out
    assert "widths" in out and all(f"{w['bits']}g{w['group_size']}" in out for w in info["widths"])


def test_the_fp_model_is_untouched_by_the_sensitivity_pass():
    """The probes quantize each group and restore it: the allocation pass leaves the FP weights bit for bit."""
    from llmq.job.pipeline import quantize_layers

    path = shared_path("assets", "llmq-tiny-llama")
    model = AutoModelForCausalLM.from_pretrained(path)
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    calib = torch.randint(0, 512, (4, 32))
    notes: dict = {}
    cfg = QuantConfig(bits=3, group_size=128, bits_per_weight=3.6, mixed_widths=("3g128", "4g128"))

    def stop_after_allocation(index, layer, results, activations):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        quantize_layers(model, calib, cfg, device="cpu", notes=notes, sink=stop_after_allocation)
    widths = {k: v for k, v in notes.items() if k.startswith("widths/")}
    assert len(widths) == 6 * 7
    state = model.state_dict()
    changed = [k for k in ref if not k.startswith("model.layers.0.") and not torch.equal(ref[k], state[k])]
    assert changed == []  # layer 0 was quantized by the main pass before the sink stopped it; no other layer


def test_each_layers_sensitivity_gain_is_how_much_of_its_error_reaches_the_final_hidden_state(caplog):
    """The sensitivity pass carries each layer's error (every linear at the run's width) through the FP layers after
    it and logs the ratio of what reaches the final hidden state (per token over its FP mean square) to what left
    the layer. The same figure measured directly, on a copy of the model with that layer alone rounded (RTN: no
    statistics, so the copy is exact), matches; on llmq-tiny-llama the early layers' errors grow the most."""
    import copy
    import re

    from llmq.algorithms.quant import rtn_quantize
    from llmq.job.pipeline import CARRIED_TOKENS, quantize_layers

    path = shared_path("assets", "llmq-tiny-llama")
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    calib = torch.randint(0, 512, (8, 32), generator=torch.Generator().manual_seed(0))  # all 8 carried
    assert CARRIED_TOKENS >= 8 * 32
    cfg = QuantConfig(bits=3, group_size=128, method="rtn", bits_per_weight=3.6, mixed_widths=("3g128", "4g128"))

    def stop(index, layer, results, activations):
        raise KeyboardInterrupt

    with caplog.at_level("INFO", logger="llmq.job.pipeline"), pytest.raises(KeyboardInterrupt):
        quantize_layers(copy.deepcopy(model), calib, cfg, device="cpu", sink=stop)
    line = next(r.getMessage() for r in caplog.records if "sensitivity gain per layer" in r.getMessage())
    logged = [float(v) for v in re.findall(r"[\d.e+-]+", line.split(":", 1)[1])]

    def outputs(m, j):
        got = {}
        hooks = [m.model.layers[i].register_forward_hook(lambda mod, a, out, i=i: got.__setitem__(i, (
            out[0] if isinstance(out, tuple) else out).detach())) for i in (j, len(m.model.layers) - 1)]
        with torch.no_grad():
            m(calib)
        for h in hooks:
            h.remove()
        return got[j], got[len(m.model.layers) - 1]

    direct = []
    for j in range(len(model.model.layers)):
        q = copy.deepcopy(model)
        for module in q.model.layers[j].modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.data = rtn_quantize(module.weight.data, cfg).dequantize()
        (fp_local, fp_final), (q_local, q_final) = outputs(model, j), outputs(q, j)
        scale = fp_final.pow(2).mean(-1, keepdim=True)
        direct.append(((q_final - fp_final).pow(2) / scale).sum().item() / (q_local - fp_local).pow(2).sum().item())
    assert logged == pytest.approx(direct, rel=1e-3)
    assert direct[0] > 1.5 * direct[-1]
