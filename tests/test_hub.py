"""Models as users name them: dotted hub ids read offline from a hub cache, bf16 checkpoints."""

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import c4_texts, lay_out_in_hub_cache, tiny_llama_bf16

import llmq
from llmq.config import Recipe
from llmq.eval.ppl import perplexity
from llmq.io.data import eval_windows
from llmq.job.runner import quantize, quantize_to_disk, save
from llmq.runtime.qlinear import QuantLinear

MODEL_ID = "llmq-test/Tiny-Llama-0.5B-v1.2"  # dots, dashes: refused as "a local path" before
PACKED_ID = "llmq-test/Tiny-Llama-0.5B-v1.2-GPTQ-Int4"


@pytest.fixture(scope="module")
def bf16_tiny_llama(tmp_path_factory):
    return tiny_llama_bf16(tmp_path_factory)


# Run in a child process, as a user would: huggingface_hub reads HF_HUB_OFFLINE and HF_HUB_CACHE when imported.
USER_SESSION = r"""
import contextlib, io, json, sys
import llmq
from llmq.cli import main

def cli(*argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return {"code": code, "out": out.getvalue(), "err": err.getvalue()}

model_id, packed_id, calib, evals, out, commit = sys.argv[1:]
results = {
    "quantize": cli("quantize", model_id, "--method", "gptq", "--bits", "4", "--group-size", "128", "--calib", calib,
                    "--nsamples", "16", "--seqlen", "128", "--out", out),
    "info_folder": cli("info", out, "--json"),
    "ppl_fp": cli("ppl", model_id, "--revision", commit, "--dataset", evals, "--seqlen", "128", "--json"),
    "missing": cli("quantize", "llmq-test/Not-In-The-Cache-1.0", "--out", out + "-missing"),
    "missing_revision": cli("ppl", model_id, "--revision", "v9.9", "--dataset", evals),
}
if len(sys.argv) > 1 and results["quantize"]["code"] == 0:
    print(json.dumps(results))
"""

PACKED_SESSION = r"""
import contextlib, io, json, sys
import torch
import llmq
from llmq.cli import main

def cli(*argv):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(list(argv))
    return {"code": code, "out": out.getvalue()}

packed_id, evals = sys.argv[1:]
model = llmq.from_pretrained(packed_id, torch_dtype=torch.float32, kernel="pure")
weights = {name: m.dequantized_weight().sum().item() for name, m in model.named_modules()
           if isinstance(m, llmq.runtime.qlinear.QuantLinear)}
print(json.dumps({"info": cli("info", packed_id, "--json"), "weights": weights,
                  "ppl": cli("ppl", packed_id, "--dataset", evals, "--seqlen", "128", "--json")}))
"""


def offline_env(cache):
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(cache.parent / "home"),
            "HF_DATASETS_OFFLINE": "1"}


@pytest.mark.slow
def test_dotted_hub_ids_work_offline_from_the_hub_cache(bf16_tiny_llama, tmp_path):
    cache = tmp_path / "hub"
    commit = lay_out_in_hub_cache(cache, MODEL_ID, bf16_tiny_llama)
    calib = tmp_path / "calib.jsonl"
    calib.write_text("".join(json.dumps({"text": t}) + "\n" for t in c4_texts()[:900]))
    evals = tmp_path / "eval.jsonl"
    evals.write_text("".join(json.dumps({"text": t}) + "\n" for t in c4_texts()[900:930]))
    out = tmp_path / "q"
    proc = subprocess.run([sys.executable, "-c", USER_SESSION, MODEL_ID, PACKED_ID, str(calib), str(evals), str(out),
                           commit], capture_output=True, text=True, env=offline_env(cache))
    assert proc.returncode == 0 and proc.stdout, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    info = json.loads(r["info_folder"]["out"])
    assert (info["bits"], info["group_size"], info["method"]) == (4, 128, "gptq")
    assert json.loads((out / "config.json").read_text())["quantization_config"]["meta"]["llmq"]["recipe"][
        "model"] == MODEL_ID
    assert r["ppl_fp"]["code"] == 0
    fp_ppl = json.loads(r["ppl_fp"]["out"])["ppl"]
    assert r["missing"]["code"] == 2
    err = r["missing"]["err"]
    assert "llmq-test/Not-In-The-Cache-1.0 is not in the hub cache" in err and "HF_HUB_OFFLINE=1" in err, err
    assert str(cache) in err
    assert not (tmp_path / "q-missing").exists() and not (tmp_path / ".q-missing.partial").exists()
    assert r["missing_revision"]["code"] == 2 and "at revision v9.9 is not in the hub cache" in r["missing_revision"][
        "err"]

    # the packed checkpoint published under its own id: info, ppl and from_pretrained read it from the cache
    lay_out_in_hub_cache(cache, PACKED_ID, out)
    proc = subprocess.run([sys.executable, "-c", PACKED_SESSION, PACKED_ID, str(evals)], capture_output=True,
                          text=True, env=offline_env(cache))
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert json.loads(r["info"]["out"])["quantized_weights"] == info["quantized_weights"] > 0
    local = llmq.from_pretrained(out, torch_dtype=torch.float32, kernel="pure")
    want = {name: m.dequantized_weight().sum().item() for name, m in local.named_modules()
            if isinstance(m, QuantLinear)}
    assert r["weights"] == want and len(want) == 6 * 7
    packed_ppl = json.loads(r["ppl"]["out"])["ppl"]
    assert fp_ppl < packed_ppl < 1.05 * fp_ppl


def test_bf16_checkpoint_quantizes_and_decodes_exactly_in_bf16_and_fp32(bf16_tiny_llama, tmp_path, report):
    calib = tmp_path / "calib.jsonl"
    calib.write_text("".join(json.dumps({"text": t}) + "\n" for t in c4_texts()[:900]))
    base = dict(model=str(bf16_tiny_llama), method="gptq", bits=4, group_size=128, calib=str(calib), nsamples=16,
                seqlen=128)
    mem = Recipe.from_dict({**base, "out": str(tmp_path / "mem")})
    run = quantize(mem)
    assert {p.dtype for p in run.model.parameters()} == {torch.bfloat16}, "no float32 copy of a bf16 model"
    save(run, mem)
    quantize_to_disk(Recipe.from_dict({**base, "out": str(tmp_path / "stream")}))
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "mem" / name).read_bytes() == (tmp_path / "stream" / name).read_bytes(), name

    loads = {dtype: llmq.from_pretrained(tmp_path / "stream", torch_dtype=dtype, kernel="pure")
             for dtype in (torch.bfloat16, torch.float32)}
    modules = {dtype: dict(m.named_modules()) for dtype, m in loads.items()}
    assert len(run.results) == 6 * 7
    for name, qw in run.results.items():
        a, b = (modules[dtype][name] for dtype in (torch.bfloat16, torch.float32))
        assert a.scales.dtype == b.scales.dtype == torch.float16, "scales kept as stored"
        assert torch.equal(a.dequantized_weight(), b.dequantized_weight()), name
        assert torch.equal(a.dequantized_weight(), qw.dequantize()), name
    # a cast of the loaded model does not round the stored scales either
    cast = llmq.from_pretrained(tmp_path / "stream", torch_dtype=torch.float32, kernel="pure").to(torch.bfloat16)
    name = next(iter(run.results))
    assert torch.equal(dict(cast.named_modules())[name].dequantized_weight(), run.results[name].dequantize())

    tok = run.tokenizer
    windows = eval_windows(c4_texts()[900:], tok, 256)[:24]
    ppl = {dtype: perplexity(m, windows, batch_size=8, progress=False)["ppl"] for dtype, m in loads.items()}
    report(f"bf16 checkpoint, W4 g128 GPTQ reloaded: perplexity in bfloat16 {ppl[torch.bfloat16]:.3f}, in float32 "
           f"{ppl[torch.float32]:.3f}")
    assert ppl[torch.bfloat16] == pytest.approx(ppl[torch.float32], rel=0.005), ppl


def _hub_error(name: str) -> Exception:
    from huggingface_hub import errors

    cls = getattr(errors, name)
    e = cls.__new__(cls)  # as raised by the hub client (its constructor wants a live HTTP response)
    Exception.__init__(e, f"{name} from the hub")
    return e


@pytest.mark.parametrize("error, message", [
    ("GatedRepoError", "is a gated repository: accept its license on https://huggingface.co/org/Model-1.5B and log in"),
    ("RepositoryNotFoundError", "no repository org/Model-1.5B on the Hugging Face hub (or it is private"),
    ("RevisionNotFoundError", "org/Model-1.5B has no revision 'v2': give an existing branch, tag or commit"),
])
def test_hub_errors_name_the_cause_and_the_fix(monkeypatch, tmp_path, error, message):
    import huggingface_hub

    from llmq.errors import CheckpointError
    from llmq.io.source import resolve_model

    def refuse(*args, **kwargs):
        raise _hub_error(error)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    with pytest.raises(CheckpointError, match=message.replace("(", r"\(").replace(".", r"\.")):
        resolve_model("org/Model-1.5B", revision="v2")


def test_local_folders_without_a_model_are_refused_with_the_fix(tmp_path):
    from llmq.errors import CheckpointError
    from llmq.io.source import resolve_model

    with pytest.raises(CheckpointError, match="has no config.json"):
        resolve_model(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    torch.save({}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pickled weights \(\*\.bin\) only.*save_pretrained"):
        resolve_model(tmp_path)
    with pytest.raises(CheckpointError, match="not a Hugging Face hub id either"):
        resolve_model(str(tmp_path / "missing" / "deeper"))


def test_bf16_forwards_run_in_float32_only_where_the_device_lacks_bf16_matmuls(monkeypatch):
    from llmq.utils import device
    cpu = torch.device("cpu")
    for native, want in ((False, torch.float32), (True, torch.bfloat16)):
        monkeypatch.setattr(device, "native_bf16", lambda d, native=native: native)
        assert device.forward_dtype(torch.bfloat16, cpu) == want
        assert device.forward_dtype(torch.bfloat16, cpu, "bfloat16") == torch.bfloat16  # asked for: kept
        assert device.forward_dtype(torch.float32, cpu) == torch.float32


def test_a_bf16_model_computes_each_layer_in_float32_and_stays_bf16(bf16_tiny_llama, monkeypatch):
    """Layer forwards in float32 (a CPU without bf16 matmuls): the model stays bf16, and layer 0's q/k/v, whose input
    (the norm of the same bf16 embeddings) is computed alike, get the codes a float32 model holding the same values
    gets, bit for bit; with bf16 forwards (the check can fail) they differ. Past them the bf16 model's own rotary
    tables (rounded to bf16 by transformers) and its bf16 activations between layers make the runs part."""
    from transformers import AutoModelForCausalLM

    from llmq.config import QuantConfig
    from llmq.job.pipeline import quantize_layers
    ids = torch.randint(0, 512, (4, 64), generator=torch.Generator().manual_seed(0))
    cfg = QuantConfig(bits=3, group_size=64)
    runs = {}
    for work in (torch.float32, torch.bfloat16, "fp32 model"):
        model = AutoModelForCausalLM.from_pretrained(bf16_tiny_llama, dtype=torch.bfloat16)
        if work == "fp32 model":
            model, work = model.float(), None
        runs[work] = quantize_layers(model, ids, cfg, work_dtype=work)
        if work is not None:
            assert {p.dtype for p in model.parameters()} == {torch.bfloat16}, "the layer was cast back"
    layer0 = [f"model.layers.0.self_attn.{n}_proj" for n in "qkv"]
    assert layer0 and all(torch.equal(runs[torch.float32][n].codes, runs[None][n].codes) for n in layer0)
    assert not all(torch.equal(runs[torch.bfloat16][n].codes, runs[None][n].codes) for n in layer0)
