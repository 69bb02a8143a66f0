"""Calibration and evaluation windows (llmq.io.data) on the real shared text and tokenizers."""

from __future__ import annotations

import json
import logging
import random

import pytest
import torch
from helpers import shared_path

from llmq.errors import CalibrationError
from llmq.io.data import (
    c4_eval_windows,
    calibration_windows,
    eval_windows,
    get_calibration,
    load_texts,
)


@pytest.fixture(scope="module")
def tiny_tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(shared_path("assets", "llmq-tiny-llama"))


@pytest.fixture(scope="module")
def stories_tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(shared_path("assets", "stories260K"))


@pytest.fixture(scope="module")
def c4_docs() -> list[str]:
    return load_texts(str(shared_path("assets", "c4-sample", "c4_train_00000_first1000.jsonl")))


def ids_of(tok, text: str) -> torch.Tensor:
    return torch.tensor(tok(text)["input_ids"], dtype=torch.long)


def slice_starts(stream: torch.Tensor, window: torch.Tensor) -> list[int]:
    """Every start i with stream[i:i+len(window)] == window."""
    n = window.numel()
    candidates = (stream[: max(stream.numel() - n + 1, 0)] == window[0]).nonzero().flatten().tolist()
    return [i for i in candidates if torch.equal(stream[i : i + n], window)]


# ---------------------------------------------------------------- calibration, one token stream


def test_stream_windows_deterministic_shaped_and_contiguous(stories_tok):
    text = shared_path("assets", "tinystories-text", "TinyStories-valid.Ahmedessaa-30k.txt").read_text()
    a = calibration_windows(text, stories_tok, nsamples=16, seqlen=64, seed=0, per_document=False)
    b = calibration_windows(text, stories_tok, nsamples=16, seqlen=64, seed=0, per_document=False)
    c = calibration_windows(text, stories_tok, nsamples=16, seqlen=64, seed=1, per_document=False)
    assert a.shape == (16, 64) and a.dtype == torch.long
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    stream = ids_of(stories_tok, text)
    for w in torch.cat([a, c]):
        starts = slice_starts(stream, w)
        assert starts, "window is not a contiguous slice of the tokenized text"
        assert min(starts) <= stream.numel() - 64 - 1  # GPTQ: start in [0, ntok - seqlen - 1]


def test_stream_windows_join_texts_with_blank_line(stories_tok):
    sample = shared_path("assets", "tinystories-text", "tinystories_sample.cs336.txt").read_text()
    texts = [t for t in sample.split("\n") if t]
    assert len(texts) > 3
    w = calibration_windows(texts, stories_tok, nsamples=8, seqlen=32, seed=3, per_document=False)
    stream = ids_of(stories_tok, "\n\n".join(texts))
    assert all(slice_starts(stream, row) for row in w)


def test_seed_does_not_touch_global_random_state(stories_tok):
    random.seed(1234)
    expected = random.random()
    random.seed(1234)
    calibration_windows(
        "one two three " * 100, stories_tok, nsamples=4, seqlen=16, seed=0, per_document=False
    )
    assert random.random() == expected


def test_too_little_text_reports_token_counts(stories_tok):
    text = "Once upon a time there was a cat."
    ntok = len(stories_tok(text)["input_ids"])
    with pytest.raises(CalibrationError) as err:
        calibration_windows(text, stories_tok, nsamples=64, seqlen=128, seed=0, per_document=False)
    msg = str(err.value)
    assert f"has {ntok} tokens" in msg and "seqlen=128" in msg and "8192" in msg


def test_overlapping_windows_warn_not_fail(stories_tok, caplog):
    text = shared_path("assets", "tinystories-text", "tinystories_sample.cs336.txt").read_text()
    ntok = len(stories_tok(text)["input_ids"])
    assert 64 < ntok < 64 * 64
    with caplog.at_level(logging.WARNING, logger="llmq.io.data"):
        w = calibration_windows(text, stories_tok, nsamples=64, seqlen=64, seed=0, per_document=False)
    assert w.shape == (64, 64)
    assert any("overlap" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------- calibration, per document (C4)


def test_per_document_windows_lie_inside_single_documents(tiny_tok, c4_docs):
    docs = c4_docs[:60]
    w = calibration_windows(docs, tiny_tok, nsamples=24, seqlen=128, seed=0, per_document=True)
    assert w.shape == (24, 128)
    assert torch.equal(
        w, calibration_windows(docs, tiny_tok, nsamples=24, seqlen=128, seed=0, per_document=True)
    )
    assert not torch.equal(w, calibration_windows(docs, tiny_tok, 24, 128, seed=1, per_document=True))
    doc_ids = [ids_of(tiny_tok, d) for d in docs]
    for row in w:
        owners = [k for k, ids in enumerate(doc_ids) if slice_starts(ids, row)]
        assert owners, "window does not lie inside one document"
        assert all(doc_ids[k].numel() > 128 for k in owners)
    # Windows drawn from the joined stream would straddle documents; the two protocols differ.
    joined = calibration_windows(docs, tiny_tok, nsamples=24, seqlen=128, seed=0, per_document=False)
    assert not torch.equal(w, joined)


def test_per_document_skips_short_documents(stories_tok):
    long_doc = shared_path("assets", "tinystories-text", "tinystories_sample.cs336.txt").read_text()
    docs = ["Tom ran."] * 40 + [long_doc] + ["A dog."] * 40
    w = calibration_windows(docs, stories_tok, nsamples=6, seqlen=48, seed=5, per_document=True)
    stream = ids_of(stories_tok, long_doc)
    assert all(slice_starts(stream, row) for row in w)


def test_per_document_no_long_document_raises(stories_tok):
    with pytest.raises(CalibrationError, match=r"no document with more than seqlen=64 tokens.*3 documents"):
        calibration_windows(
            ["a b", "c d e", "f"], stories_tok, nsamples=4, seqlen=64, seed=0, per_document=True
        )


def test_get_calibration_protocol_follows_source_type(tiny_tok, c4_docs, tmp_path):
    jsonl = shared_path("assets", "c4-sample", "c4_train_00000_first1000.jsonl")
    got = get_calibration(str(jsonl), tiny_tok, nsamples=8, seqlen=64, seed=2)
    assert torch.equal(got, calibration_windows(c4_docs, tiny_tok, 8, 64, seed=2, per_document=True))
    txt = tmp_path / "calib.txt"
    txt.write_text("\n\n".join(c4_docs[:20]))
    got = get_calibration(str(txt), tiny_tok, nsamples=8, seqlen=64, seed=2)
    assert torch.equal(got, calibration_windows(txt.read_text(), tiny_tok, 8, 64, seed=2, per_document=False))


# ---------------------------------------------------------------- loading


def test_load_texts_local_formats(tmp_path):
    rows = ["first row", "", "third\nrow with newline"]
    (tmp_path / "a.txt").write_text("whole\n\nfile")
    (tmp_path / "a.jsonl").write_text(
        "".join(json.dumps({"text": r, "id": i}) + "\n" for i, r in enumerate(rows))
    )
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": rows, "id": [0, 1, 2]}), tmp_path / "a.parquet")
    assert load_texts(str(tmp_path / "a.txt")) == ["whole\n\nfile"]
    assert load_texts(str(tmp_path / "a.jsonl")) == rows
    assert load_texts(str(tmp_path / "a.parquet")) == rows


def test_load_texts_errors(tmp_path):
    with pytest.raises(
        CalibrationError, match=r"unknown dataset 'wikitext3'.*wikitext2, c4, pileval.*\.jsonl"
    ):
        load_texts("wikitext3")
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(CalibrationError, match=f"file {missing} does not exist"):
        load_texts(str(missing))
    with pytest.raises(CalibrationError, match="does not exist"):
        load_texts("data/calib")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"content": "no text field"}\n')
    with pytest.raises(CalibrationError, match=r"bad\.jsonl line 2: row has no string 'text' field"):
        load_texts(str(bad))
    (tmp_path / "x.csv").write_text("text\nhello\n")
    with pytest.raises(CalibrationError, match="unsupported file type"):
        load_texts(str(tmp_path / "x.csv"))


def test_hub_names_call_the_papers_datasets(monkeypatch):
    """The hub cannot be reached here: check what each name asks ``datasets.load_dataset`` for."""
    import datasets

    calls = []

    def fake_load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return {"text": [f"doc {len(calls)}"]}

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_texts("wikitext2", "test") == ["doc 1"]
    load_texts("c4", "train")
    load_texts("c4", "validation")
    load_texts("pileval")
    assert calls[0] == (("Salesforce/wikitext", "wikitext-2-raw-v1"), {"split": "test"})
    assert calls[1] == (
        ("allenai/c4",),
        {"data_files": {"train": "en/c4-train.00000-of-01024.json.gz"}, "split": "train"},
    )
    assert calls[2] == (
        ("allenai/c4",),
        {"data_files": {"validation": "en/c4-validation.00000-of-00008.json.gz"}, "split": "validation"},
    )
    assert calls[3] == (("mit-han-lab/pile-val-backup",), {"split": "validation"})


# ---------------------------------------------------------------- evaluation windows


def test_wikitext2_rows_equal_joined_text_windows(tiny_tok):
    rows = shared_path("assets", "wikitext2-raw", "wikitext-2-raw-v1.test.rows.jsonl")
    joined = shared_path("assets", "wikitext2-raw", "wikitext-2-raw-v1.test.joined.txt")
    a = eval_windows(str(rows), tiny_tok, 256)
    b = eval_windows(str(joined), tiny_tok, 256)
    assert torch.equal(a, b)
    stream = ids_of(tiny_tok, joined.read_text())
    n = stream.numel() // 256
    assert a.shape == (n, 256) and n == 1514
    assert torch.equal(a.flatten(), stream[: n * 256])  # non-overlapping, in order, remainder dropped


def test_eval_windows_from_strings_and_too_short(stories_tok):
    texts = ["Lily had a red ball.", "She played with it every day in the park."]
    stream = ids_of(stories_tok, "\n\n".join(texts))
    w = eval_windows(texts, stories_tok, 8)
    assert torch.equal(w.flatten(), stream[: (stream.numel() // 8) * 8])
    with pytest.raises(CalibrationError, match=f"has {stream.numel()} tokens; one window needs seqlen=512"):
        eval_windows(texts, stories_tok, 512)


def test_c4_eval_windows_match_reference_gptq_code(tiny_tok, c4_docs):
    """Literal port of GPTQ ``datautils.get_c4`` (validation part, global ``random.seed(0)``)."""
    valdata, seqlen = c4_docs[900:], 128
    random.seed(0)
    ref = []
    for _ in range(32):
        while True:
            i = random.randint(0, len(valdata) - 1)
            tmp = tiny_tok(valdata[i], return_tensors="pt")
            if tmp.input_ids.shape[1] > seqlen:
                break
        i = random.randint(0, tmp.input_ids.shape[1] - seqlen - 1)
        ref.append(tmp.input_ids[:, i : i + seqlen])
    ref = torch.cat(ref)
    got = c4_eval_windows(valdata, tiny_tok, seqlen, n=32)
    assert torch.equal(got, ref)
