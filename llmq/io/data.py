"""Calibration and evaluation text, following the GPTQ paper's protocol (Frantar et al., 2023).

Calibration (GPTQ ``datautils.get_c4``): ``nsamples`` random windows of ``seqlen`` tokens; on C4
each window comes from one random document with more than ``seqlen`` tokens. Perplexity
(GPTQ ``datautils.get_wikitext2`` / ``get_c4``): WikiText-2 test rows joined with ``"\\n\\n"``,
tokenized once, cut into non-overlapping ``seqlen`` windows (remainder dropped); C4: 256 random
windows from the first validation shard, drawn with ``random.seed(0)``.
Texts are tokenized with the tokenizer's defaults (BOS added where the tokenizer adds it), as the
reference code does.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Sequence
from pathlib import Path

import torch

from llmq.errors import CalibrationError

log = logging.getLogger(__name__)

KNOWN_DATASETS = ("wikitext2", "c4", "pileval")
LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")
# The GPTQ paper's C4 shards (allenai/c4, English).
C4_SHARDS = {
    "train": "en/c4-train.00000-of-01024.json.gz",
    "validation": "en/c4-validation.00000-of-00008.json.gz",
}


def _looks_like_path(source: str) -> bool:
    return bool(Path(source).suffix) or "/" in source or "\\" in source


def _load_local(path: Path) -> list[str]:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return [path.read_text(encoding="utf-8")]
    if suffix == ".jsonl":
        texts = []
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise CalibrationError(f"{path} line {lineno}: not valid JSON ({e})") from e
                if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                    raise CalibrationError(f"{path} line {lineno}: row has no string 'text' field")
                texts.append(row["text"])
        return texts
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if "text" not in table.column_names:
            raise CalibrationError(f"{path} has no 'text' column (columns: {table.column_names})")
        return [str(t) for t in table.column("text").to_pylist()]
    raise CalibrationError(
        f"{path}: unsupported file type {suffix!r}; use one of {', '.join(LOCAL_SUFFIXES)}"
    )


def _load_hub(name: str, split: str) -> list[str]:
    from datasets import load_dataset

    if name == "wikitext2":
        return list(load_dataset("Salesforce/wikitext", "wikitext-2-raw-v1", split=split)["text"])
    if name == "c4":
        shard = "train" if split == "train" else "validation"  # C4 has no test split
        ds = load_dataset("allenai/c4", data_files={shard: C4_SHARDS[shard]}, split=shard)
        return list(ds["text"])
    # pileval: only a validation split exists; AWQ calibrates on it.
    return list(load_dataset("mit-han-lab/pile-val-backup", split="validation")["text"])


def load_texts(source: str, split: str = "train") -> list[str]:
    """Texts of a local ``.txt`` (one text), ``.jsonl``/``.parquet`` (the ``text`` of each row) file,
    or of a known dataset name: ``wikitext2``, ``c4`` (the GPTQ paper's shards), ``pileval``."""
    path = Path(source).expanduser()
    if source in KNOWN_DATASETS:
        texts = _load_hub(source, split)
    elif path.is_file():
        texts = _load_local(path)
    elif _looks_like_path(source):
        raise CalibrationError(f"file {source} does not exist")
    else:
        raise CalibrationError(
            f"unknown dataset {source!r}: known names are {', '.join(KNOWN_DATASETS)}; "
            f"a local {'/'.join(LOCAL_SUFFIXES)} file path is also accepted"
        )
    log.info("loaded %d text(s) from %s (%s)", len(texts), source, split)
    return texts


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text)["input_ids"])


def _stream_windows(ids: list[int], nsamples: int, seqlen: int, rng: random.Random) -> list[list[int]]:
    """Random windows of one token stream (GPTQ ``get_wikitext2``: start in [0, ntok-seqlen-1])."""
    ntok = len(ids)
    if ntok < seqlen + 1:
        raise CalibrationError(
            f"calibration text has {ntok} tokens; one window needs seqlen={seqlen} (+1); "
            f"{nsamples} windows of {seqlen} want about {nsamples * seqlen} distinct tokens "
            "— give more text or lower --seqlen"
        )
    if ntok < nsamples * seqlen:
        log.warning(
            "calibration text has %d tokens < %d windows x %d: windows will overlap", ntok, nsamples, seqlen
        )
    out = []
    for _ in range(nsamples):
        start = rng.randint(0, ntok - seqlen - 1)
        out.append(ids[start : start + seqlen])
    return out


def _document_windows(
    texts: Sequence[str], tokenizer, nsamples: int, seqlen: int, rng: random.Random
) -> list[list[int]]:
    """GPTQ ``get_c4``: pick a random document with more than ``seqlen`` tokens, take a random window.

    Documents are tokenized lazily (and cached), so a 356k-document shard is not tokenized whole.
    """
    if not texts:
        raise CalibrationError("no documents to draw calibration windows from")
    cache: dict[int, list[int]] = {}
    short: set[int] = set()
    longest, tries, max_tries = 0, 0, 1000 + 100 * nsamples
    out = []
    while len(out) < nsamples:
        if tries >= max_tries or len(short) == len(texts):
            raise CalibrationError(
                f"no document with more than seqlen={seqlen} tokens found among {len(texts)} documents "
                f"after {tries} draws (longest seen: {longest} tokens) — give longer documents or "
                "lower --seqlen"
            )
        tries += 1
        i = rng.randint(0, len(texts) - 1)
        if i not in cache:
            cache[i] = _ids(tokenizer, texts[i])
        ids = cache[i]
        longest = max(longest, len(ids))
        if len(ids) <= seqlen:
            short.add(i)
            continue
        start = rng.randint(0, len(ids) - seqlen - 1)
        out.append(ids[start : start + seqlen])
    log.info("drew %d windows from %d distinct documents in %d draws", nsamples, len(cache), tries)
    return out


def calibration_windows(
    texts: str | Sequence[str], tokenizer, nsamples: int, seqlen: int, seed: int, per_document: bool
) -> torch.LongTensor:
    """``nsamples`` random windows of ``seqlen`` tokens, shape ``[nsamples, seqlen]``.

    ``per_document=True``: each window lies inside one document (GPTQ's C4 protocol).
    ``per_document=False``: texts are joined with ``"\\n\\n"`` and tokenized once (GPTQ's WikiText-2).
    Deterministic for a ``seed`` (a private ``random.Random``; global state is untouched).
    """
    if nsamples < 1 or seqlen < 1:
        raise CalibrationError(f"nsamples and seqlen must be positive, got {nsamples} and {seqlen}")
    if isinstance(texts, str):
        texts = [texts]
    rng = random.Random(seed)
    if per_document:
        windows = _document_windows(texts, tokenizer, nsamples, seqlen, rng)
    else:
        windows = _stream_windows(_ids(tokenizer, "\n\n".join(texts)), nsamples, seqlen, rng)
    return torch.tensor(windows, dtype=torch.long)


def is_per_document(source: str) -> bool:
    """Whether ``source`` is a set of documents (C4, Pile, .jsonl, .parquet) rather than one text."""
    return source in ("c4", "pileval") or Path(source).suffix.lower() in (".jsonl", ".parquet")


def get_calibration(source: str, tokenizer, nsamples: int, seqlen: int, seed: int) -> torch.LongTensor:
    """Calibration windows ``[nsamples, seqlen]`` from the train split of ``source``."""
    texts = load_texts(source, "train")
    return calibration_windows(texts, tokenizer, nsamples, seqlen, seed, per_document=is_per_document(source))


def c4_eval_windows(
    texts: Sequence[str], tokenizer, seqlen: int, n: int = 256, seed: int = 0
) -> torch.LongTensor:
    """GPTQ's C4 perplexity windows: ``n`` random windows of the validation shard, ``random.seed(0)``."""
    return torch.tensor(_document_windows(texts, tokenizer, n, seqlen, random.Random(seed)), dtype=torch.long)


def stream_eval_windows(text: str, tokenizer, seqlen: int) -> torch.LongTensor:
    """Tokenize ``text`` once and cut it into non-overlapping ``seqlen`` windows, remainder dropped."""
    ids = torch.tensor(_ids(tokenizer, text), dtype=torch.long)
    n = ids.numel() // seqlen
    if n == 0:
        raise CalibrationError(
            f"evaluation text has {ids.numel()} tokens; one window needs seqlen={seqlen} tokens"
        )
    log.info("evaluation: %d windows of %d tokens (%d tokens dropped)", n, seqlen, ids.numel() - n * seqlen)
    return ids[: n * seqlen].view(n, seqlen)


def eval_windows(source: str | Sequence[str], tokenizer, seqlen: int) -> torch.LongTensor:
    """Perplexity windows ``[n_windows, seqlen]`` by the GPTQ protocol.

    ``"wikitext2"``: test rows joined with ``"\\n\\n"``, non-overlapping windows. ``"c4"``: 256 random
    windows of the validation shard (:func:`c4_eval_windows`). A local ``.txt`` is one text;
    ``.jsonl``/``.parquet`` rows and a sequence of strings are joined with ``"\\n\\n"`` as WikiText-2.
    """
    if not isinstance(source, str):
        return stream_eval_windows("\n\n".join(source), tokenizer, seqlen)
    if source == "c4":
        return c4_eval_windows(load_texts("c4", "validation"), tokenizer, seqlen)
    if source == "pileval":
        raise CalibrationError("pileval is a calibration set; evaluate on wikitext2, c4 or a local file")
    return stream_eval_windows("\n\n".join(load_texts(source, "test")), tokenizer, seqlen)
