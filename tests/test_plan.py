"""What a run writes and what it refuses: only the model's shards under *.safetensors, bad settings before any work."""

import json
from pathlib import Path

import pytest
import yaml
from helpers import shared_path
from test_streaming import make_model

import llmq.job.runner
from llmq.cli import main
from llmq.config import Recipe
from llmq.job.runner import quantize, quantize_to_disk, save


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("fp") / "m", hidden_size=64, intermediate_size=128, num_hidden_layers=2)


def text() -> str:
    return str(shared_path("assets", "tinystories-text", "tinystories_sample.cs336.txt"))


def weight_files_are_the_index(folder: Path) -> None:
    """Every *.safetensors file (anywhere below) is a shard the index names, or the single model.safetensors."""
    found = {p.relative_to(folder).as_posix() for p in folder.rglob("*.safetensors")}
    index = folder / "model.safetensors.index.json"
    named = set(json.loads(index.read_text())["weight_map"].values()) if index.is_file() else {"model.safetensors"}
    assert found == named, f"{folder.name}: {sorted(found - named)} are not weights a loader may read"


CASES = [dict(method=m, format=f) for m in ("rtn", "gptq", "awq", "awq+gptq") for f in ("auto", "gptq_v2", "awq")]
CASES += [dict(method="gptq", format="gptq", sym=True), dict(method="awq", format="gptq", sym=True)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_only_the_models_shards_are_safetensors_files(model, tmp_path, case):
    for i, writer in enumerate(("memory", "stream")):
        r = Recipe.from_dict(dict(model=str(model), out=str(tmp_path / writer), bits=4, group_size=32, calib=text(),
                                  nsamples=4, seqlen=32, max_shard_size="40KB" if i else "5GB", **case))
        save(quantize(r), r) if writer == "memory" else quantize_to_disk(r)
        weight_files_are_the_index(tmp_path / writer)
        if case["method"].startswith("awq"):  # the search artifact is there, for --apply-awq, under another name
            assert (tmp_path / writer / llmq.job.plan.AWQ_SEARCH_FILE).is_file()


REFUSED = [
    (["--format", "awq", "--bits", "3"], "the AWQ GEMM layout holds 4-bit weights only, not bits=3: use --bits 4"),
    (["--format", "awq", "--act-order"], "act-order groups (a permuted g_idx) cannot be stored in the AWQ GEMM"),
    (["--format", "awq", "--group-size", "-1"], "needs whole groups of a fixed size, not group_size=-1"),
    (["--format", "awq", "--group-size", "48"], "group_size=48 does not divide the 64 input features of "
                                                 "model.layers.0.self_attn.q_proj"),
    (["--format", "gptq", "--no-sym"], 'format "gptq" (v1) stores zero - 1 and cannot hold the zero point 0'),
    (["--method", "awq", "--apply-awq", "no-such-search.llmq"], "apply_awq file no-such-search.llmq does not exist"),
    (["--method", "gptq", "--apply-awq", "x.llmq"], "apply_awq re-applies AWQ scales, but method is 'gptq'"),
    (["--recipe", "{recipe}"], "unknown recipe key(s) group; known keys:"),
    (["--recipe", "{dtype_recipe}"], "compute_dtype='float16' is unknown"),
]


@pytest.mark.parametrize("argv, message", REFUSED, ids=[m[:30] for _, m in REFUSED])
def test_bad_combinations_fail_before_any_work(model, tmp_path, monkeypatch, capsys, argv, message):
    def no_calibration(*args, **kwargs):
        raise AssertionError("calibration ran before the settings were checked")
    monkeypatch.setattr(llmq.job.runner, "get_calibration", no_calibration)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({"model": str(model), "group": 64}))
    (tmp_path / "d.yaml").write_text(yaml.safe_dump({"model": str(model), "compute_dtype": "float16"}))
    argv = [a.format(recipe=tmp_path / "r.yaml", dtype_recipe=tmp_path / "d.yaml") for a in argv]
    out = tmp_path / "q"
    positional = [] if "--recipe" in argv else [str(model)]
    # --group-size 32 fits the model; a later --group-size in argv overrides it
    assert main(["quantize", *positional, "--group-size", "32", *argv, "--calib", text(), "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.yaml", "r.yaml"], "no output and no work folder"


def test_symmetry_defaults_follow_the_width_and_the_layout():
    from llmq.config import QuantConfig

    assert [QuantConfig(bits=b).sym for b in (2, 3, 4, 8)] == [False, False, True, True]
    assert QuantConfig(bits=4, sym=False).sym is False and QuantConfig(bits=3, sym=True).sym is True
    assert Recipe.from_dict(dict(model="m", bits=4, format="awq")).quant.sym is False  # AWQ Marlin runs zero points
    assert Recipe.from_dict(dict(model="m", bits=4, format="awq", sym=True)).quant.sym is True
    assert Recipe.from_dict(dict(model="m", bits=4)).quant.sym is True


def test_a_model_with_no_linear_the_layout_can_hold_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    """Every dimension off the multiples of 32: the run would write the FP model under a quantization config."""
    odd = make_model(tmp_path / "odd", hidden_size=48, intermediate_size=80, num_hidden_layers=2)

    def no_calibration(*args, **kwargs):
        raise AssertionError("calibration ran before the shapes were checked")
    monkeypatch.setattr(llmq.job.runner, "get_calibration", no_calibration)
    out = tmp_path / "q"
    assert main(["quantize", str(odd), "--group-size", "32", "--calib", text(), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "none of the 14 linears of the decoder layers can be packed" in err
    assert "model.layers.0.self_attn.q_proj is 48 x 48" in err and "nothing would be quantized" in err
    assert not out.exists()


def test_linears_the_layout_cannot_hold_are_counted_in_the_plan_and_stay_fp(tmp_path, caplog):
    """gate/up/down of a 64 x 80 MLP cannot be packed, attention can: the plan says so, the run keeps them FP."""
    from llmq.job.plan import plan

    m = make_model(tmp_path / "m", hidden_size=64, intermediate_size=80, num_hidden_layers=2)
    r = Recipe.from_dict(dict(model=str(m), out=str(tmp_path / "q"), bits=4, group_size=32, calib=text(),
                              nsamples=4, seqlen=32))
    with caplog.at_level("WARNING", logger="llmq.job.plan"):
        plan(r)
    assert "6 of 14 linears stay in full precision" in caplog.text and "is 80 x 64" in caplog.text
    quantize_to_disk(r)
    unquantized = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["meta"]["llmq"][
        "unquantized"]
    assert len(unquantized) == 6 and all(".mlp." in name for name in unquantized)
