"""The offline demo model: synthetic corpus, BPE tokenizer, a short training run, save and reload."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from llmq.errors import ConfigError
from llmq.eval.demo_model import (
    DEMO_TEXTS_FILE,
    demo_config,
    demo_texts,
    make_demo_model,
    synthetic_corpus,
    train_demo_model,
    train_tokenizer,
)

# Small enough for a test (~10 s per training on 2 cores), long enough to learn visibly.
TRAIN = dict(seed=0, max_steps=30, corpus_chars=200_000, batch_size=8)


def _ppl(model: torch.nn.Module, tokenizer, text: str, seq_len: int = 128) -> float:
    """Held-out perplexity over non-overlapping windows, computed independently of the module's helper."""
    ids = torch.tensor(tokenizer(text).input_ids)
    n = ids.numel() // seq_len
    windows = ids[: n * seq_len].view(n, seq_len)
    model.eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the training does: tiny matrices, and busy cores make more threads slower
    try:
        with torch.inference_mode():
            logits = torch.cat([model(w).logits[:, :-1] for w in windows.split(32)])
    finally:
        torch.set_num_threads(threads)
    return math.exp(F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten()).item())


@pytest.fixture(scope="module")
def trained():
    return train_demo_model(**TRAIN)


def test_corpus_is_deterministic_per_seed_and_differs_across_seeds():
    a = synthetic_corpus(20_000, seed=0)
    assert a == synthetic_corpus(20_000, seed=0)
    assert a != synthetic_corpus(20_000, seed=1)
    assert len(a) >= 20_000 and a.isascii()
    stories = a.split("\n\n")
    assert len(stories) > 20 and all(s.strip() == s and s for s in stories)
    # Long-range structure: the hero named in a story's first sentence recurs through it.
    for story in stories:
        first = story.split(". ")[0]
        match = re.search(r"(?:named|called) (\w+)$", first) or re.match(r"(\w+) was a", first)
        assert match, first
        assert story.count(match.group(1)) >= 3, story


def test_demo_texts_are_held_out_and_deterministic():
    calib, evaluation = demo_texts(0)
    assert (calib, evaluation) == demo_texts(0)
    assert demo_texts(1) != (calib, evaluation)
    training = synthetic_corpus(300_000, 0)
    first_story = lambda text: text.split("\n\n")[0]  # noqa: E731
    assert len({first_story(calib), first_story(evaluation), first_story(training)}) == 3
    assert len(calib) >= 100_000 and len(evaluation) >= 30_000


def test_tokenizer_round_trips_prepends_bos_and_reloads(tmp_path):
    tok = train_tokenizer(synthetic_corpus(100_000, seed=0), vocab_size=512)
    assert len(tok) == 512
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    samples = [
        synthetic_corpus(3_000, seed=7),
        "hi",
        'Tom said, "Hello!"  Two  spaces,\ttabs\nand new lines.',
        "Unseen text: café, naïve, 日本語, emoji 🙂, 3.14159 & <tags>",
    ]
    for text in samples:
        ids = tok(text).input_ids
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
        assert tok.unk_token_id not in ids  # byte-level: any text is representable
        assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok("hi").input_ids[0] == tok.bos_token_id
    # BPE learned merges: the synthetic text costs far fewer tokens than bytes.
    assert len(tok(samples[0]).input_ids) < len(samples[0]) / 2

    tok.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded.bos_token_id == tok.bos_token_id and len(reloaded) == len(tok)
    for text in samples:
        assert reloaded(text).input_ids == tok(text).input_ids
        assert reloaded.decode(reloaded(text).input_ids, skip_special_tokens=True) == text


def test_config_has_g128_friendly_linears():
    model = LlamaForCausalLM(demo_config(512))
    linears = [m for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 4 * 7
    assert all(m.in_features % 128 == 0 for m in linears)
    cfg = model.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.tie_word_embeddings) == (4, 2, True)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_short_training_lowers_heldout_perplexity(trained):
    model, tok, demo = trained
    info = demo["info"]
    assert info["steps"] == TRAIN["max_steps"]
    torch.manual_seed(TRAIN["seed"])
    untrained = LlamaForCausalLM(demo_config(len(tok)))
    initial = _ppl(untrained, tok, demo["evaluation"])
    final = _ppl(model, tok, demo["evaluation"])
    assert initial > 0.5 * len(tok)  # an untrained model is close to uniform over the vocabulary
    assert final < 0.5 * initial, (initial, final)
    assert math.isclose(final, info["heldout_ppl"], rel_tol=1e-4)
    assert math.isclose(initial, info["heldout_ppl_initial"], rel_tol=1e-4)
    assert math.isfinite(info["final_train_loss"]) and info["final_train_loss"] < math.log(len(tok))


def test_saved_folder_reloads_identically_and_training_is_deterministic(trained, tmp_path):
    model, tok, demo = trained
    threads = torch.get_num_threads()
    out = make_demo_model(tmp_path / "demo", **TRAIN)  # a second, independent run with the same seed
    assert torch.get_num_threads() == threads  # the training's thread setting was restored
    assert (out / "model.safetensors").exists() and (out / "config.json").exists()
    saved = load_file(out / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in saved.values())

    reloaded = AutoModelForCausalLM.from_pretrained(out)
    reloaded_tok = AutoTokenizer.from_pretrained(out)
    # Same seed and max_steps -> bit-identical weights (and the save/reload loses nothing).
    ref, got = model.state_dict(), reloaded.state_dict()
    assert ref.keys() == got.keys()
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    ids = torch.tensor([reloaded_tok(demo["evaluation"][:2_000]).input_ids[:128]])
    assert ids.tolist()[0] == tok(demo["evaluation"][:2_000]).input_ids[:128]
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, reloaded.eval()(ids).logits)

    saved_demo = json.loads((out / DEMO_TEXTS_FILE).read_text(encoding="utf-8"))
    assert saved_demo["calibration"] == demo["calibration"]
    assert saved_demo["evaluation"] == demo["evaluation"]
    assert saved_demo["info"]["steps"] == TRAIN["max_steps"]


def test_rejects_no_training_budget(tmp_path):
    with pytest.raises(ConfigError):
        make_demo_model(tmp_path, max_steps=0)
    with pytest.raises(ConfigError):
        make_demo_model(tmp_path, train_seconds=0)
