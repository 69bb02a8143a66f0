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
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from llmq.errors import CheckpointError, ConfigError
from llmq.utils.killpoints import kill_point

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


def half_dtype(dtype: torch.dtype, fp16_ok: bool = True) -> torch.dtype:
    """The dtype unquantized tensors are stored in: bf16 stays bf16, anything else becomes fp16, or bf16
    for a family whose activations overflow fp16 (``ArchSpec.fp16_ok``: engines compute in the stored dtype)."""
    return torch.bfloat16 if dtype == torch.bfloat16 or not fp16_ok else torch.float16


# safetensors dtype names; ``save_file`` lays tensors out by this rank (descending), then by name
_ST_DTYPES = {torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.float8_e5m2: "F8_E5M2",
              torch.float8_e4m3fn: "F8_E4M3", torch.int16: "I16", torch.uint16: "U16", torch.float16: "F16",
              torch.bfloat16: "BF16", torch.int32: "I32", torch.uint32: "U32", torch.float32: "F32",
              torch.float64: "F64", torch.int64: "I64", torch.uint64: "U64"}
_ST_RANK = {name: rank for rank, name in enumerate(_ST_DTYPES.values())}
_ST_TORCH = {name: dtype for dtype, name in _ST_DTYPES.items()}
_CHUNK = 64 << 20  # bytes copied at a time, so a tensor (or activations) larger than RAM can be written


def tensor_bytes(tensor: torch.Tensor) -> Iterator[memoryview]:
    """A contiguous CPU tensor's raw bytes, in chunks (a memory-mapped tensor is read piece by piece)."""
    flat = tensor.reshape(-1).view(torch.uint8)
    for i in range(0, flat.numel(), _CHUNK):
        yield memoryview(flat[i : i + _CHUNK].numpy())


def write_tensor_bytes(f: Any, tensor: torch.Tensor, kill: str) -> None:
    """Append a contiguous CPU tensor's bytes to ``f``; the kill point ``kill`` (see :mod:`llmq.utils.killpoints`)
    sits inside them, half of each chunk on disk, as a kill mid-write leaves a file."""
    for chunk in tensor_bytes(tensor):
        half = len(chunk) // 2
        f.write(chunk[:half])
        kill_point(kill, f.flush)
        f.write(chunk[half:])


def write_safetensors(path: Path, specs: list[tuple[str, str, list[int], int]],
                      read: Callable[[str], torch.Tensor], metadata: dict[str, str] | None = None,
                      kill: str = "safetensors.write") -> None:
    """Write a safetensors file one tensor at a time: ``specs`` are ``(name, dtype, shape, nbytes)``.

    ``read(name)`` is called once per tensor, in file order, so memory holds one tensor at a time.
    The bytes are exactly those of ``safetensors.torch.save_file`` (same order, header and padding).
    ``kill`` names the kill point reached inside each tensor's bytes (see :mod:`llmq.utils.killpoints`).
    """
    order = sorted(specs, key=lambda s: (-_ST_RANK[s[1]], s[0]))
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, dtype, shape, nbytes in order:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, dtype, shape, _ in order:
            tensor = read(name).detach().to("cpu").contiguous()
            if _ST_DTYPES[tensor.dtype] != dtype or list(tensor.shape) != shape:
                raise RuntimeError(f"{name}: got {tensor.dtype} {list(tensor.shape)}, planned {dtype} {shape}")
            write_tensor_bytes(f, tensor, kill)
        f.flush()
        os.fsync(f.fileno())


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], kill: str = "safetensors.write") -> None:
    """``save_file`` that streams each tensor's bytes (works for memory-mapped tensors larger than RAM)."""
    specs = [(k, _ST_DTYPES[t.dtype], list(t.shape), t.numel() * t.element_size()) for k, t in tensors.items()]
    write_safetensors(path, specs, tensors.__getitem__, {"format": "pt"}, kill)


class SpoolWriter:
    """Appends tensors' bytes to one spool file as they come; ``close`` lays them out as safetensors shards.

    Memory holds one tensor at a time, however large the model. ``sync()`` returns the state to
    commit after each unit of work; a writer built with that ``state`` cuts the spool back to it,
    so a killed run continues exactly where its last commit left off.
    """

    def __init__(self, folder: Path, name: str = "spool.bin", state: dict[str, Any] | None = None):
        self.folder, self.path = folder, folder / name
        self.entries: list[dict[str, Any]] = list(state["entries"]) if state else []
        self.file = open(self.path, "r+b" if state else "wb")
        if state:
            self.file.truncate(state["bytes"])
        self.file.seek(0, os.SEEK_END)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        tensor = tensor.detach().to("cpu").contiguous()
        offset = self.file.tell()
        write_tensor_bytes(self.file, tensor, "spool.write")
        self.entries.append({"name": name, "dtype": _ST_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                             "offset": offset, "nbytes": self.file.tell() - offset})

    def sync(self) -> dict[str, Any]:
        """Flush to disk; the returned state (JSON-serialisable) is what a resumed writer restarts from."""
        self.file.flush()
        os.fsync(self.file.fileno())
        return {"bytes": self.file.tell(), "entries": list(self.entries)}

    def read(self, entry: dict[str, Any]) -> torch.Tensor:
        """One spooled tensor, read back from disk (call after the spool is flushed)."""
        buf = torch.empty(entry["nbytes"], dtype=torch.uint8)
        with open(self.path, "rb") as f:
            f.seek(entry["offset"])
            f.readinto(memoryview(buf.numpy()))
        return buf.view(_ST_TORCH[entry["dtype"]]).reshape(entry["shape"])

    def close(self, max_bytes: int | None = None,
              transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
              single_name: str = SINGLE_FILE) -> None:
        """Write the spooled tensors as shards (see :func:`write_shards`), then drop the spool.

        ``transform(name, tensor)`` may rewrite a tensor's values (never its dtype or shape) on the way out.
        """
        self.file.flush()
        by_name = {e["name"]: e for e in self.entries}

        def read(name: str) -> torch.Tensor:
            t = self.read(by_name[name])
            return transform(name, t) if transform is not None else t
        write_shards(self.folder, [(e["name"], e["dtype"], e["shape"], e["nbytes"]) for e in self.entries], read,
                     max_bytes, single_name)
        self.file.close()
        self.path.unlink()


def write_shards(folder: Path, specs: list[tuple[str, str, list[int], int]], read: Callable[[str], torch.Tensor],
                 max_bytes: int | None = None, single_name: str = SINGLE_FILE) -> None:
    """Safetensors shards of at most ``max_bytes``, cut in ``specs`` order, each written tensor by tensor.

    One shard is ``single_name``; more are ``model-0000i-of-0000n.safetensors`` plus the index.
    Each shard is written under a temporary name and renamed when complete.
    """
    shards: list[list[tuple[str, str, list[int], int]]] = []
    size = 0
    for spec in specs:
        if not shards or (max_bytes is not None and shards[-1] and size + spec[3] > max_bytes):
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec[3]
    n = len(shards)
    names = [single_name] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for file_name, shard in zip(names, shards, strict=True):
        tmp = folder / (file_name + ".tmp")
        write_safetensors(tmp, shard, read, {"format": "pt"}, kill="shard.write")
        tmp.rename(folder / file_name)
        kill_point("shard.renamed")
    if n > 1:
        weight_map = {spec[0]: file_name for file_name, shard in zip(names, shards, strict=True) for spec in shard}
        total = sum((folder / name).stat().st_size for name in names)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def check_output_free(out: Path, overwrite: bool) -> None:
    """Refuse to replace a non-empty output unless ``overwrite``: a finished checkpoint is never touched."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise CheckpointError(f"{out} exists and is not empty: choose another output folder or pass --overwrite")


@contextmanager
def atomic_output_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a hidden staging folder beside ``out``; rename it to ``out`` only when the block succeeds."""
    out = Path(out)
    check_output_free(out, overwrite)
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


def read_tensor(path: Path, key: str) -> torch.Tensor:
    """Tensor ``key`` of shard ``path``, copied out of the file: one open per tensor, so the shard's map, and
    the pages this read brought in, go at once. Views would keep every tensor read so far resident while
    anything of the shard stays mapped (a streamed run's memory would grow with depth, a load peak at
    twice the packed size)."""
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(key).clone()


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
