"""A real packed checkpoint on the fast paths: logits, greedy generation, `llmq generate`, `llmq info --load`."""

import json
import shutil

import pytest
import torch
from helpers import c4_texts, cpu_int4, shared_path
from transformers import AutoTokenizer

import llmq
from llmq.cli import main
from llmq.config import Recipe
from llmq.job.runner import quantize_to_disk
from llmq.runtime.kernels import native

PROMPT = "Once upon a time, there was a little"


@pytest.fixture(scope="module")
def w4_act_order(tmp_path_factory):
    """llmq-tiny-llama, GPTQ W4 g128 asymmetric with act-order: permuted groups and folded zero points."""
    out = tmp_path_factory.mktemp("inference") / "w4"
    calib = out.parent / "calib.jsonl"
    calib.write_text("".join(json.dumps({"text": t}) + "\n" for t in c4_texts()[:200]))
    quantize_to_disk(Recipe.from_dict(dict(
        model=str(shared_path("assets", "llmq-tiny-llama")), out=str(out), method="gptq", bits=4, group_size=128,
        sym=False, act_order=True, calib=str(calib), nsamples=16, seqlen=128)))
    return out


def logits(folder, dtype, kernel, ids):
    model = llmq.from_pretrained(folder, torch_dtype=dtype, kernel=kernel)
    with torch.no_grad():
        return model(ids).logits.float(), model.llmq_kernels


@pytest.mark.parametrize("kernel", ["int4_cpu", "auto"])
def test_logits_on_every_cpu_path_equal_the_pure_paths(w4_act_order, kernel):
    """auto (int4_avx2 in float32 and bf16 on x86) and the forced int4_cpu (dequant under auto in float32)."""
    tok = AutoTokenizer.from_pretrained(w4_act_order)
    text = " ".join(c4_texts()[900:910])
    ids = tok(text, return_tensors="pt").input_ids[:, :200]  # 200 rows: the int4 paths' dequantize branch
    short = ids[:, :9]  # 9 rows: the int4 kernels themselves
    for x in (short, ids):
        want32, _ = logits(w4_act_order, torch.float32, "pure", x)
        got32, kernels32 = logits(w4_act_order, torch.float32, kernel, x)
        assert {c.kernel for c in kernels32.values()} == {cpu_int4() if kernel == "auto" else kernel}
        assert torch.allclose(got32, want32, atol=1e-4, rtol=1e-4), (got32 - want32).abs().max()
        pure16, _ = logits(w4_act_order, torch.bfloat16, "pure", x)
        got16, kernels16 = logits(w4_act_order, torch.bfloat16, kernel, x)
        assert {c.kernel for c in kernels16.values()} == {cpu_int4() if kernel == "auto" else kernel}
        assert len(kernels16) == 6 * 7
        # bf16 rounds activations everywhere: the int4 path may differ from float32 by no more than the
        # pure bf16 forward does (plus a margin), and picks the same next token almost everywhere
        err_pure = (pure16 - want32).abs().max().item()
        err_fast = (got16 - want32).abs().max().item()
        assert err_fast < 1.5 * err_pure + 1e-2, (err_fast, err_pure)
        assert (got16.argmax(-1) == want32.argmax(-1)).float().mean() >= 0.97


def greedy(folder, dtype, kernel, n=24):
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    model = llmq.from_pretrained(folder, torch_dtype=dtype, kernel=kernel)
    out = model.generate(ids, max_new_tokens=n, do_sample=False, attention_mask=torch.ones_like(ids))
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True) + "\n"


@pytest.mark.parametrize("kernel", ["int4_cpu", "auto"])
def test_llmq_generate_streams_the_pure_paths_greedy_output(w4_act_order, capsys, kernel):
    """In float32 every path rounds alike, so greedy decoding must pick the same tokens: torch's int4 kernel
    (forced: it is slow, not wrong, outside bf16) and auto's choice (int4_avx2 on x86) against the pure path."""
    argv = ["generate", str(w4_act_order), PROMPT, "--max-new-tokens", "24", "--dtype", "float32", "--kernel", kernel]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert out == greedy(w4_act_order, torch.float32, "pure")
    assert "24 new tokens" in err and "decode" in err and "tokens/s" in err


def test_llmq_generate_defaults_to_bf16_on_the_int4_kernel(w4_act_order, capsys):
    """The default load (bf16 on the CPU) runs the int4 kernel; its stream is exactly its own model.generate.
    (Against the pure bf16 forward, greedy tokens part after a few steps: bf16 rounds differently.)"""
    assert main(["generate", str(w4_act_order), PROMPT, "--max-new-tokens", "24"]) == 0
    assert capsys.readouterr().out == greedy(w4_act_order, torch.bfloat16, "auto")


def test_llmq_generate_applies_the_chat_template_with_chat(w4_act_order, tmp_path, capsys):
    assert main(["generate", str(w4_act_order), PROMPT, "--chat"]) == 2
    assert "--chat needs a tokenizer with a chat template" in capsys.readouterr().err
    tok = AutoTokenizer.from_pretrained(w4_act_order)
    tok.chat_template = "{% for m in messages %}User: {{ m['content'] }}\n{% endfor %}Story:"
    chat = tmp_path / "chat"
    shutil.copytree(w4_act_order, chat)
    tok.save_pretrained(chat)
    assert main(["generate", str(chat), PROMPT, "--chat", "--max-new-tokens", "12", "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    model = llmq.from_pretrained(chat, torch_dtype=torch.float32)
    ids = tok(f"User: {PROMPT}\nStory:", return_tensors="pt", add_special_tokens=False).input_ids
    want = model.generate(ids, max_new_tokens=12, do_sample=False, attention_mask=torch.ones_like(ids))
    assert out == tok.decode(want[0, ids.shape[1]:], skip_special_tokens=True) + "\n"


def test_info_load_reports_the_kernels_and_why(w4_act_order, capsys, monkeypatch):
    assert main(["info", str(w4_act_order), "--load", "--json"]) == 0
    load = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["load"]
    assert (load["device"], load["dtype"], load["kernels"]) == ("cpu", "bfloat16", {cpu_int4(): 42})
    # without the AVX2 kernel, float32 activations fall to dequant (torch's int4 kernel is fast in bf16 only)
    monkeypatch.setattr(native, "_load", lambda: (None, "this CPU has no AVX2"))
    assert main(["info", str(w4_act_order), "--load", "--dtype", "float32"]) == 0
    text = capsys.readouterr().out
    assert "loaded on         cpu in float32: 42 x dequant" in text
    assert "42 on dequant (e.g. model.layers.0." in text and "float32 activations" in text


@pytest.mark.parametrize("native_bf16", [False, True], ids=["avx2", "native-bf16"])
def test_bf16_models_attend_in_float32_on_the_cpu(w4_act_order, monkeypatch, native_bf16):
    """On the CPU, with or without native bf16 matmuls (torch's bf16 CPU attention is 6-7x slower per decode query
    on both), a bf16 model's attention is transformers' SDPA on float32 copies, its output rounded to bf16 once:
    exactly that, and logits as close to the float32 model's as bf16 attention leaves them (within 10%: the other
    bf16 roundings dominate, 0.0090 against 0.0089 mean absolute error measured)."""
    from llmq.runtime.kernels import attention
    from llmq.utils import device

    tok = AutoTokenizer.from_pretrained(w4_act_order)
    ids = tok(" ".join(c4_texts()[900:905]), return_tensors="pt").input_ids[:, :64]
    want32, _ = logits(w4_act_order, torch.float32, "pure", ids)
    monkeypatch.setattr(device, "_native_bf16_at", lambda d: native_bf16)
    model = llmq.from_pretrained(w4_act_order, torch_dtype=torch.bfloat16)
    assert model.config._attn_implementation == attention.NAME
    errors = {}
    for name in (attention.NAME, "sdpa"):
        model.set_attn_implementation(name)
        with torch.no_grad():
            errors[name] = (model(ids).logits.float() - want32).abs().mean().item()
    attn = model.model.layers[0].self_attn
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, n, 7, 64, generator=g).bfloat16() for n in (4, 2, 2))  # 4 heads, 2 kv
    got, _ = attention.sdpa_in_float32(attn, q, k, v, None, scaling=attn.scaling)
    want, _ = attention.sdpa_attention_forward(attn, q.float(), k.float(), v.float(), None, scaling=attn.scaling)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want.bfloat16())
    assert errors[attention.NAME] <= 1.1 * errors["sdpa"], errors
