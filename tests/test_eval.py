"""Perplexity (GPTQ protocol) and the lm-eval wrapper (llmq.eval.ppl)."""

from __future__ import annotations

import json
import math
import re
from types import SimpleNamespace

import pytest
import torch
from helpers import shared_path
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmq.errors import LlmqError
from llmq.eval.ppl import perplexity, run_lm_eval
from llmq.io.data import eval_windows
from llmq.runtime.qlinear import QuantLinear


@pytest.fixture(scope="module")
def tiny_random_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(cfg).eval()


def reference_nll(model, windows: torch.Tensor) -> tuple[float, int]:
    """Independent loop: sum over windows of -log_softmax(logits)[t, x_{t+1}] in float64."""
    total, count = 0.0, 0
    with torch.no_grad():
        for w in windows:
            logp = torch.log_softmax(model(input_ids=w[None]).logits[0].double(), dim=-1)
            for t in range(w.numel() - 1):
                total -= logp[t, w[t + 1]].item()
                count += 1
    return total, count


def test_perplexity_matches_independent_loop(tiny_random_llama):
    windows = torch.randint(0, 64, (5, 16), generator=torch.Generator().manual_seed(1))
    got = perplexity(tiny_random_llama, windows, progress=False)
    total, count = reference_nll(tiny_random_llama, windows)
    assert got["tokens"] == count == 5 * 15
    assert got["windows"] == 5 and got["seqlen"] == 16
    assert got["nll"] == pytest.approx(total / count, rel=1e-6)
    assert got["ppl"] == pytest.approx(math.exp(total / count), rel=1e-6)
    assert 1 < got["ppl"] < 200  # near-uniform over 64 tokens for a random init


def test_perplexity_batch_sizes_agree(tiny_random_llama):
    windows = torch.randint(0, 64, (7, 24), generator=torch.Generator().manual_seed(2))
    one = perplexity(tiny_random_llama, windows, batch_size=1, progress=False)
    for bs in (3, 7, 16):
        other = perplexity(tiny_random_llama, windows, batch_size=bs, progress=False)
        assert other["nll"] == pytest.approx(one["nll"], rel=1e-6)
        assert other["tokens"] == one["tokens"] == 7 * 23


class UniformLM(torch.nn.Module):
    """Not a transformers model: equal logits everywhere, so perplexity is exactly the vocab size."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.scale = torch.nn.Parameter(torch.zeros(()))

    def forward(self, input_ids):
        return SimpleNamespace(
            logits=self.scale * torch.ones(*input_ids.shape, self.vocab, dtype=torch.bfloat16)
        )


def test_perplexity_any_logits_model_and_training_mode_restored():
    model = UniformLM(37).train()
    got = perplexity(model, torch.zeros(4, 10, dtype=torch.long), batch_size=3, progress=False)
    assert got["ppl"] == pytest.approx(37.0, rel=1e-6)
    assert got["nll"] == pytest.approx(math.log(37), rel=1e-6)
    assert model.training


def test_perplexity_rejects_bad_windows(tiny_random_llama):
    with pytest.raises(LlmqError, match="windows must be"):
        perplexity(tiny_random_llama, torch.zeros(8, dtype=torch.long), progress=False)
    with pytest.raises(LlmqError, match="windows must be"):
        perplexity(tiny_random_llama, torch.zeros(3, 1, dtype=torch.long), progress=False)


@pytest.fixture(scope="module")
def tiny_llama_and_wikitext():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = shared_path("assets", "llmq-tiny-llama")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    windows = eval_windows(str(shared_path("assets", "wikitext2-raw", "wikitext-2-raw-v1.test.rows.jsonl")), tok, 256)
    return model, windows


def test_tiny_llama_wikitext2_first_50_windows(tiny_llama_and_wikitext):
    """The first 50 of the 1514 windows (the full protocol runs in test_perplexity_tables.py)."""
    model, windows = tiny_llama_and_wikitext
    got = perplexity(model, windows[:50], batch_size=5, progress=False)
    assert got["tokens"] == 50 * 255
    assert 80 < got["ppl"] < 200
    assert got["ppl"] == pytest.approx(128.07, abs=0.5)  # measured here, fp32


TASK_YAML = """\
task: llmq_offline_rolling
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
metadata:
  version: 1.0
"""

DOCS = [
    "Once upon a time there was a little dog named Max. Max liked to run in the park.",
    "The sun was hot.   Lily and Tom went to the sea to swim!\nThey were happy.\n",
    'Mom said: "Do not touch the cake." But Ben was hungry, so he took a bite.',
]


def _packed_stories260k(path, tmp_path):
    """stories260K at RTN W4 g32, packed (the 172-wide MLP stays in full precision) and reloaded."""
    import llmq
    from llmq.config import QuantConfig
    from llmq.formats.export import save_packed
    from llmq.formats.pack import can_pack
    from llmq.job.pipeline import quantize_layers

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    cfg = QuantConfig(method="rtn", bits=4, group_size=32)
    results = quantize_layers(model, torch.zeros(1, 2, dtype=torch.long), cfg,
                              keep_fp=lambda name, m: not can_pack(m.in_features, m.out_features, 4))
    save_packed(model, AutoTokenizer.from_pretrained(path), results, tmp_path / "packed", cfg)
    return llmq.from_pretrained(str(tmp_path / "packed"), torch_dtype=torch.float32, kernel="pure")


@pytest.mark.parametrize("packed", [False, True], ids=["fp32", "packed-w4"])
def test_run_lm_eval_offline_rolling_perplexity_matches_model(tmp_path, monkeypatch, packed):
    """A local-jsonl loglikelihood_rolling task; lm-eval's figures must equal our own computation.

    lm-eval 0.4.x (HFLM.loglikelihood_rolling + ConfigurableTask.process_results): each document is
    encoded with the tokenizer's defaults (so with BOS here), the prefix token (BOS) is prepended,
    every encoded token is scored; word_perplexity = exp(-sum ll / sum words) with
    words = len(re.split(r"\\s+", doc)), byte_perplexity = exp(-sum ll / sum utf-8 bytes),
    bits_per_byte = -sum ll / sum bytes / ln 2.
    """
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    path = shared_path("assets", "stories260K")
    tok = AutoTokenizer.from_pretrained(path)
    if packed:
        model = _packed_stories260k(path, tmp_path)
        assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 5 * 4  # q, k, v, o in 5 layers
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "llmq_offline_rolling.yaml").write_text(TASK_YAML.format(data=data))

    out = run_lm_eval(model, tok, ["llmq_offline_rolling"], include_path=str(tmp_path / "tasks"))
    res = out["results"]["llmq_offline_rolling"]

    total_ll, words, nbytes = 0.0, 0, 0
    with torch.no_grad():
        for doc in DOCS:
            ids = tok(doc)["input_ids"]
            assert len(ids) < model.config.max_position_embeddings  # one rolling window per doc
            inp = torch.tensor([[tok.bos_token_id] + ids[:-1]])
            logp = torch.log_softmax(model(input_ids=inp).logits[0].float(), dim=-1)
            total_ll += logp[torch.arange(len(ids)), torch.tensor(ids)].sum().item()
            words += len(re.split(r"\s+", doc))
            nbytes += len(doc.encode("utf-8"))
    assert res["word_perplexity,none"] == pytest.approx(math.exp(-total_ll / words), rel=1e-4)
    assert res["byte_perplexity,none"] == pytest.approx(math.exp(-total_ll / nbytes), rel=1e-4)
    assert res["bits_per_byte,none"] == pytest.approx(-total_ll / nbytes / math.log(2), rel=1e-4)
    assert 1.0 < res["byte_perplexity,none"] < 10.0  # a trained model on in-domain text
