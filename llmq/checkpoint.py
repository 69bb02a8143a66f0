"""Packed checkpoints on disk: sharded safetensors, the index, the config; written atomically, read strictly.

Layout written (the GPTQ layout AutoGPTQ/GPTQModel write and transformers/vLLM read): for each
quantized linear ``<name>.qweight/.qzeros/.scales/.g_idx`` (+ ``.bias``), everything else in the
model's half dtype, ``config.json`` with ``quantization_config`` and a copy in ``quantize_config.json``.

Zero points: the classic "gptq" (v1) convention stores ``zero - 1`` and cannot hold a zero point
of 0 (an asymmetric group whose weights are all >= 0). ``format="auto"`` writes v1, which every
loader reads, when all zero points are >= 1, and "gptq_v2" (raw zeros) otherwise, so a checkpoint
always decodes to exactly the weights the quantizer produced.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: str | int) -> int:
    """``"5GB"`` -> 5_000_000_000 (decimal units as transformers; KiB/MiB/GiB binary)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)\s*", size.upper())
    if not m:
        raise ConfigError(f"cannot read size {size!r}: write it like 5GB, 500MB or 2GiB")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def half_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype unquantized tensors are stored in: bf16 stays bf16, anything else becomes fp16."""
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float16


class ShardWriter:
    """Appends tensors to safetensors shards of at most ``max_bytes``; ``close`` names them and writes the index."""

    def __init__(self, folder: Path, max_bytes: int):
        self.folder, self.max_bytes = folder, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[tuple[Path, list[str]]] = []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max_bytes:
            self.flush()
        self.pending[name] = tensor.detach().to("cpu").contiguous()
        self.pending_bytes += nbytes

    def flush(self) -> None:
        if not self.pending:
            return
        path = self.folder / f"shard-{len(self.shards):05d}.tmp"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.shards.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        self.flush()
        n = len(self.shards)
        if n == 1:
            self.shards[0][0].rename(self.folder / SINGLE_FILE)
            return
        weight_map, total = {}, 0
        for i, (path, names) in enumerate(self.shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            path.rename(self.folder / final)
            weight_map.update({name: final for name in names})
            total += (self.folder / final).stat().st_size
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


@contextmanager
def atomic_output_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a hidden staging folder beside ``out``; rename it to ``out`` only when the block succeeds."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise CheckpointError(f"{out} exists and is not empty: choose another output folder or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.incomplete-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("wrote %s", out)


def write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def shard_files(folder: str | Path) -> dict[str, Path]:
    """``tensor name -> shard path`` from the index (or the single file), each shard checked readable.

    Refuses a missing shard, a corrupt or truncated file, and an index that disagrees with the shards.
    """
    folder = Path(folder)
    if (folder / INDEX_FILE).is_file():
        try:
            weight_map = json.loads((folder / INDEX_FILE).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{folder / INDEX_FILE} is not a valid safetensors index: {e}") from e
        files = sorted(set(weight_map.values()))
    elif (folder / SINGLE_FILE).is_file():
        weight_map, files = None, [SINGLE_FILE]
    else:
        raise CheckpointError(f"{folder} has neither {SINGLE_FILE} nor {INDEX_FILE}: not a safetensors checkpoint")
    where: dict[str, Path] = {}
    for name in files:
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"shard {name} listed in the index is missing from {folder}")
        for key in _shard_keys(path):
            where[key] = path
    if weight_map is not None and set(weight_map) != set(where):
        diff = sorted(set(weight_map) ^ set(where))[:5]
        raise CheckpointError(f"{folder / INDEX_FILE} disagrees with its shards (e.g. {diff}): re-save the checkpoint")
    return where


def _shard_keys(path: Path) -> list[str]:
    """The tensor names in one shard. safetensors checks the header and that the data covers it."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as e:  # safetensors raises its own error types for a bad or cut-off file
        raise CheckpointError(f"{path} is corrupt or truncated ({e}); re-download or re-save it") from e
