"""Must-show perplexity tables on the two real models in ../shared (protocol: ../shared/README.md)."""

import json

import pytest
from helpers import shared_path
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmq.config import QuantConfig
from llmq.data import calibration_windows, eval_windows
from llmq.eval import perplexity
from llmq.pipeline import quantize_layers


def quantized_ppl(path, calib, cfg, evals):
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    if cfg is not None:
        quantize_layers(model, calib, cfg, device="cpu")
    return {name: perplexity(model, windows, batch_size=8, progress=False)["ppl"] for name, windows in evals.items()}


def table(title, header, rows):
    lines = [title, " | ".join(header)]
    lines += [" | ".join([name] + [f"{v:.3f}" for v in values]) for name, values in rows]
    return "\n".join(lines)


@pytest.mark.slow
def test_stories260k_gptq_keeps_less_than_rtn_loses(report):
    path = shared_path("assets", "stories260K")
    text = shared_path("assets", "tinystories-text", "TinyStories-valid.Ahmedessaa-30k.txt").read_text()
    tok = AutoTokenizer.from_pretrained(path)
    third = len(text) // 3
    calib = calibration_windows(text[:third], tok, nsamples=64, seqlen=128, seed=0, per_document=False)
    evals = {"tinystories": eval_windows([text[third:]], tok, 128)}
    fp = quantized_ppl(path, calib, None, evals)["tinystories"]
    ppl = {}
    runs = (("RTN", dict(method="rtn")), ("GPTQ", {}), ("GPTQ act-order", dict(act_order=True)),
            ("GPTQ min-max", dict(mse=False)), ("GPTQ act-order min-max", dict(act_order=True, mse=False)))
    for bits in (4, 3):
        for name, kw in runs:
            cfg = QuantConfig(bits=bits, group_size=32, **kw)
            ppl[bits, name] = quantized_ppl(path, calib, cfg, evals)["tinystories"]
    names = [name for name, _ in runs]
    report(table(f"stories260K, asym g32, every linear; FP {fp:.3f}", ("", *names),
                 [(f"W{b}", [ppl[b, n] for n in names]) for b in (4, 3)]))

    def kept(name):  # GPTQ's perplexity increase over FP as a fraction of RTN's
        return (ppl[3, name] - fp) / (ppl[3, "RTN"] - fp)

    report("W3, GPTQ's perplexity increase as a fraction of RTN's: "
           + ", ".join(f"{name} {kept(name):.3f}" for name in names[1:]))
    assert fp < ppl[4, "GPTQ"] < ppl[4, "RTN"]
    assert kept("GPTQ") <= 0.58
    assert kept("GPTQ act-order") <= 0.48


@pytest.mark.slow
def test_tiny_llama_gptq_beats_rtn_on_held_out_c4(report):
    path = shared_path("assets", "llmq-tiny-llama")
    rows = shared_path("assets", "c4-sample", "c4_train_00000_first1000.jsonl").read_text().splitlines()
    c4 = [json.loads(row)["text"] for row in rows]
    tok = AutoTokenizer.from_pretrained(path)
    calib = calibration_windows(c4[:900], tok, nsamples=128, seqlen=256, seed=0, per_document=True)
    evals = {
        "wikitext2": eval_windows(str(shared_path("assets", "wikitext2-raw", "wikitext-2-raw-v1.test.rows.jsonl")),
                                  tok, 256),
        "c4": eval_windows(c4[900:], tok, 256),
    }
    rows_out, ppl = [("FP", list(quantized_ppl(path, calib, None, evals).values()))], {}
    for bits in (4, 3):
        for name, kw in (("RTN", dict(method="rtn")), ("GPTQ", {}), ("GPTQ act-order", dict(act_order=True))):
            if bits == 4 and name == "GPTQ act-order":
                continue
            ppl[bits, name] = quantized_ppl(path, calib, QuantConfig(bits=bits, group_size=128, **kw), evals)
            rows_out.append((f"W{bits} g128 {name}", list(ppl[bits, name].values())))
    report(table("llmq-tiny-llama, asym, seqlen 256", ("", "WikiText-2", "C4 900-999"), rows_out))
    assert rows_out[0][1][0] == pytest.approx(126.74, abs=0.2)  # FP WikiText-2: training-log.txt has 126.7438
    assert ppl[3, "GPTQ"]["c4"] < ppl[3, "RTN"]["c4"]
    assert ppl[3, "GPTQ act-order"]["c4"] < ppl[3, "RTN"]["c4"]
