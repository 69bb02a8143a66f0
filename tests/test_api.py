"""The one-call Python API (issue 42): ``llmq.quantize`` writes what ``llmq quantize`` writes, byte for byte;
``llmq.perplexity`` is ``llmq ppl``; bad settings fail before calibration."""

import json

import pytest
import yaml
from helpers import shared_path

import llmq
from llmq.cli import main


def folder_bytes(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_quantize_in_python_writes_the_same_bytes_as_the_command_line(tmp_path):
    model = str(shared_path("assets", "llmq-tiny-llama"))
    calib = str(shared_path("assets", "c4-sample", "c4_train_00000_first1000.jsonl"))
    settings = dict(method="gptq", bits=4, group_size=128, calib=calib, nsamples=8, seqlen=64, act_order=True)
    out = llmq.quantize(model, tmp_path / "python", **settings)
    assert out == tmp_path / "python"
    assert main(["quantize", model, "--method", "gptq", "--bits", "4", "--group-size", "128", "--calib", calib,
                 "--nsamples", "8", "--seqlen", "64", "--act-order", "--out", str(tmp_path / "cli")]) == 0
    python, cli = folder_bytes(tmp_path / "python"), folder_bytes(tmp_path / "cli")
    assert any(name.endswith(".safetensors") for name in python)
    assert python.keys() == cli.keys()
    assert all(python[name] == cli[name] for name in python), [n for n in python if python[n] != cli[n]]

    # a recipe file, with keywords laid over it, is the same job again
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(dict(model=model, method="rtn", bits=3, calib=calib, nsamples=8, seqlen=64)))
    llmq.quantize(recipe=recipe, out=tmp_path / "from-recipe", method="gptq", bits=4, act_order=True)
    assert folder_bytes(tmp_path / "from-recipe") == python


def test_perplexity_in_python_is_llmq_ppl(tmp_path, capsys):
    model = str(shared_path("assets", "stories260K"))
    text = str(shared_path("assets", "tinystories-text", "tinystories_sample.cs336.txt"))
    result = llmq.perplexity(model, text, seqlen=64, progress=False)
    assert main(["ppl", model, "--dataset", text, "--seqlen", "64", "--json"]) == 0
    cli = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result == cli and result["windows"] > 1 and 1 < result["ppl"] < 100

    # an in-memory model with its tokenizer gives the same figure
    from llmq.runtime.loader import load_model

    m, tok = load_model(model)
    assert llmq.perplexity(m, text, seqlen=64, tokenizer=tok, progress=False)["ppl"] == pytest.approx(result["ppl"])
    with pytest.raises(llmq.ConfigError, match="needs its tokenizer"):
        llmq.perplexity(m, text, seqlen=64)


@pytest.mark.parametrize("kwargs, message", [
    (dict(bits=5), "bits=5 is not supported"),
    (dict(no_such_option=1), "unknown recipe key"),
    (dict(format="awq", bits=3), "AWQ"),
])
def test_bad_settings_fail_before_anything_is_read_or_written(kwargs, message, tmp_path, monkeypatch):
    import llmq.job.runner

    monkeypatch.setattr(llmq.job.runner, "get_calibration", lambda *a, **k: pytest.fail("calibrated"))
    with pytest.raises(llmq.ConfigError, match=message):
        llmq.quantize(str(shared_path("assets", "llmq-tiny-llama")), tmp_path / "out", **kwargs)
    assert not any(tmp_path.iterdir())
