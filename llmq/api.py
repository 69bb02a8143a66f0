"""The quantization job end to end: load a model, draw calibration windows, quantize, save.

This is what ``llmq quantize`` and the Python API run; each step is also usable on its own.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from . import __version__
from .arch import get_arch, get_layers, layer_linears
from .checkpoint import SpoolWriter, check_output_free, half_dtype, parse_size, save_tensors
from .config import Recipe
from .data import get_calibration
from .errors import CheckpointError, ConfigError
from .export import PackedWriter, save_packed, write_metadata
from .loader import from_pretrained, resolve_folder
from .pack import can_pack
from .pipeline import LayerResults, quantize_layers
from .stream import (
    ShardedCheckpoint,
    StreamingLayers,
    checkpoint_dtype,
    empty_model,
    fix_malloc_mmap_threshold,
    generation_config,
    materialize,
)
from .timing import StageTimes

log = logging.getLogger(__name__)

AWQ_SEARCH_FILE = "awq_search.safetensors"


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` if given, else CUDA when present, else CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_model_source(name_or_path: str) -> None:
    """Fail early, with the fix, when a local model path does not exist.

    Hub ids (``org/name``) are left to transformers, which reads them from the hub or its cache.
    """
    path = Path(name_or_path)
    if path.exists():
        if path.is_dir() and not (path / "config.json").is_file():
            raise CheckpointError(f"{path} has no config.json: point at a transformers model folder")
        return
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1 or path.suffix
    if looks_local:
        raise CheckpointError(
            f"model path {name_or_path} does not exist: give a local transformers model folder "
            "or a Hugging Face hub id such as meta-llama/Llama-2-7b-hf"
        )


def load_config(name_or_path: str | Path, trust_remote_code: bool = False) -> Any:
    try:
        return AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise CheckpointError(f"cannot load a model config from {name_or_path}: {e}") from e


def load_model(
    name_or_path: str, dtype: torch.dtype | str | None = None, trust_remote_code: bool = False
) -> tuple[PreTrainedModel, object]:
    """A causal LM on the CPU and its tokenizer; the architecture is checked before any weight loads.

    A quantized checkpoint (``quantization_config`` in its config) loads packed through
    :func:`llmq.from_pretrained`; anything else through transformers.
    """
    check_model_source(name_or_path)
    config = load_config(name_or_path, trust_remote_code)
    get_arch(config.model_type)
    if getattr(config, "quantization_config", None) is not None:
        model = from_pretrained(name_or_path, torch_dtype=dtype if isinstance(dtype, torch.dtype) else torch.float32,
                                trust_remote_code=trust_remote_code)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path, dtype=dtype or "auto", trust_remote_code=trust_remote_code
        )
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    return model, tokenizer


class Quantized(NamedTuple):
    model: PreTrainedModel  # weights replaced by their quantized values
    tokenizer: Any
    results: LayerResults  # full module name -> codes and quantization parameters
    awq: dict[str, torch.Tensor]  # AWQ search results (scales, clips) by name; empty for other methods


def _calibration(recipe: Recipe, tokenizer: Any) -> torch.Tensor:
    c = recipe.calib
    if recipe.quant.method == "rtn":
        return torch.zeros(1, 2, dtype=torch.long)  # RTN reads no data; one dummy window fills the pipeline
    return get_calibration(c.calib, tokenizer, c.nsamples, c.seqlen, c.seed)


def _keep_fp(recipe: Recipe) -> Callable[[str, torch.nn.Linear], bool]:
    """Linears whose shape the output layout cannot hold stay in full precision."""
    bits, gs, awq_format = recipe.quant.bits, recipe.quant.group_size, recipe.format == "awq"

    def keep_fp(name: str, m: torch.nn.Linear) -> bool:
        return not can_pack(m.in_features, m.out_features, bits) or (awq_format and m.in_features % gs != 0)
    return keep_fp


def _recorded(recipe: Recipe) -> dict[str, Any]:
    """The recipe as written into the output: without where it ran, so the same job gives the same bytes."""
    return {k: v for k, v in recipe.to_dict().items() if k not in ("out", "device")}


def quantize(recipe: Recipe, packable_only: bool = True) -> Quantized:
    """Run ``recipe`` on the whole model in memory (for evaluation; :func:`quantize_to_disk` streams).

    With ``packable_only``, linears whose shape the output layout cannot hold stay in full
    precision, so the in-memory model is exactly the one the packed checkpoint decodes to.
    """
    model, tokenizer = load_model(recipe.model, trust_remote_code=recipe.trust_remote_code)
    calib = _calibration(recipe, tokenizer)
    awq_state = load_file(recipe.apply_awq) if recipe.apply_awq else None
    awq_record: dict[str, torch.Tensor] = {}
    results = quantize_layers(model, calib, recipe.quant, device=resolve_device(recipe.device),
                              keep_fp=_keep_fp(recipe) if packable_only else None, awq_state=awq_state,
                              awq_record=awq_record)
    return Quantized(model, tokenizer, results, awq_record)


def save(run: Quantized, recipe: Recipe, overwrite: bool = False) -> Path:
    """Write the packed checkpoint of a ``quantize(recipe)`` run to ``recipe.out``.

    AWQ search results go beside it as ``awq_search.safetensors`` (for ``--apply-awq``).
    """
    model, tokenizer, results, awq = run
    if not recipe.out:
        raise ConfigError("no output folder: pass --out DIR (or `out:` in the recipe)")
    extra = {AWQ_SEARCH_FILE: lambda path: save_tensors(path, awq)} if awq else {}
    return save_packed(model, tokenizer, results, recipe.out, recipe.quant, recipe=_recorded(recipe),
                       fmt=recipe.format, max_shard_size=recipe.max_shard_size, overwrite=overwrite, extra=extra)


PROGRESS_FILE = "progress.json"


def _fingerprint(recipe: Recipe, calib: torch.Tensor, ckpt: ShardedCheckpoint) -> str:
    """What must match for a partial run to be resumed: settings, calibration tokens, input shards."""
    inputs = {p.name: p.stat().st_size for p in sorted(set(ckpt.where.values()))}
    blob = json.dumps({"recipe": _recorded(recipe), "llmq": __version__, "inputs": inputs}, sort_keys=True)
    h = hashlib.sha256(blob.encode())
    h.update(calib.numpy().tobytes())
    return h.hexdigest()


def _commit(work: Path, state: dict[str, Any]) -> None:
    """Replace the progress file atomically: a kill leaves either the old state or the new one."""
    tmp = work / (PROGRESS_FILE + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(state))
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(work / PROGRESS_FILE)


def _state_files(state: dict[str, Any]) -> list[str]:
    """The files a committed state needs (the spools are gone once the final shards are being written)."""
    return ["spool.bin", state["hidden"]] + (["awq.spool"] if state.get("awq") else [])


def _activation_budget(device: torch.device) -> int:
    """Bytes of activations kept in memory before they go to disk: half of what is free now."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] // 2
    for line in Path("/proc/meminfo").read_text().splitlines() if Path("/proc/meminfo").exists() else []:
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024 // 2
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2


def quantize_to_disk(recipe: Recipe, overwrite: bool = False, offload_activations: str | Path | None = None,
                     batch_size: int = 8, timer: StageTimes | None = None) -> Path:
    """Run ``recipe`` streaming: read each decoder layer from the input shards, append its packed tensors.

    Memory holds one decoder layer plus the calibration activations (those go to memory-mapped
    files in ``offload_activations``, or in the output's work folder when they exceed half the free
    memory). The work folder ``.<out>.partial`` beside the output holds the packed tensors so far
    and, after each layer, an atomically committed state; the same command run again after a kill
    continues from the first unfinished layer and writes the same bytes as an uninterrupted run.
    """
    if not recipe.out:
        raise ConfigError("no output folder: pass --out DIR (or `out:` in the recipe)")
    out = Path(recipe.out)
    check_output_free(out, overwrite)
    check_model_source(recipe.model)
    fix_malloc_mmap_threshold()
    folder = resolve_folder(recipe.model)
    config = load_config(folder, recipe.trust_remote_code)
    if getattr(config, "quantization_config", None) is not None:
        raise ConfigError(f"{recipe.model} is already quantized: quantize its full-precision original")
    spec = get_arch(config.model_type)
    ckpt = ShardedCheckpoint(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=recipe.trust_remote_code)
    calib = _calibration(recipe, tokenizer)
    fingerprint = _fingerprint(recipe, calib, ckpt)
    device = resolve_device(recipe.device)

    work = out.parent / f".{out.name}.partial"
    work.mkdir(parents=True, exist_ok=True)
    lock = open(work / ".lock", "w")  # noqa: SIM115 (held until the run ends)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise CheckpointError(f"another llmq run is writing {out} (it holds {work}/.lock)") from None
    try:
        state = json.loads((work / PROGRESS_FILE).read_text()) if (work / PROGRESS_FILE).is_file() else None
        if state is not None and state["fingerprint"] != fingerprint:
            if not overwrite:
                raise CheckpointError(f"{work} holds an unfinished run with other settings or inputs: run the same "
                                      "command again to resume it, or pass --overwrite to discard it")
            state = None
        if state is not None and not all((work / f).is_file() for f in _state_files(state)):
            log.warning("%s was interrupted while writing its final files: starting it again", work)
            state = None
        if state is None:
            for p in work.iterdir():
                if p.name != ".lock":
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
        else:
            log.info("resuming %s at layer %d", out, state["next_layer"])
        _stream_layers(recipe, config, spec, ckpt, tokenizer, calib, fingerprint, device, work, state,
                       offload_activations, batch_size, timer or StageTimes())
        # progress goes first: a run killed from here on starts again from scratch
        (work / PROGRESS_FILE).unlink(missing_ok=True)
        for p in work.iterdir():
            if p.name == ".lock" or p.name.startswith("hidden-") or p.name == "activations":
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        work.rename(out)
    finally:
        lock.close()
    log.info("wrote %s", out)
    return out


def _stream_layers(recipe: Recipe, config: Any, spec: Any, ckpt: ShardedCheckpoint, tokenizer: Any,
                   calib: torch.Tensor, fingerprint: str, device: torch.device, work: Path,
                   state: dict[str, Any] | None, offload_activations: str | Path | None, batch_size: int,
                   timer: StageTimes) -> None:
    dtype = checkpoint_dtype(config)
    model = empty_model(config, dtype, recipe.trust_remote_code)
    n_layers = len(get_layers(model, spec))
    keys = list(model.state_dict())
    layer_prefix = spec.layers + "."
    first = next(i for i, k in enumerate(keys) if k.startswith(layer_prefix))
    tied = "lm_head.weight" if getattr(config, "tie_word_embeddings", False) else None
    head = keys[:first]
    tail = [k for k in keys[first:] if not k.startswith(layer_prefix) and k != tied]

    writer = PackedWriter(work, recipe.format, half_dtype(dtype), recipe.quant.bits,
                          state=state["writer"] if state else None)
    awq_method = recipe.quant.method in ("awq", "awq+gptq") and not recipe.apply_awq
    awq_spool = SpoolWriter(work, "awq.spool", state=state["awq"] if state else None) if awq_method else None
    unquantized: list[str] = list(state["unquantized"]) if state else []
    start = state["next_layer"] if state else 0
    with timer("load"):
        for name in spec.before:
            materialize(model.get_submodule(name), name + ".", ckpt)
        if state is None:
            for key, tensor in ckpt.load(head).items():
                writer.add(key, tensor)

    hidden_bytes = calib.numel() * config.hidden_size * dtype.itemsize * (2 if recipe.quant.next_inputs == "fp" else 1)
    offload_dir = None
    if offload_activations is not None:
        offload_dir = Path(offload_activations) / f"llmq-{fingerprint[:16]}"
    elif hidden_bytes > _activation_budget(device):
        offload_dir = work / "activations"
        log.warning("calibration activations (%.1f GB) exceed half the free memory: keeping them in %s",
                    hidden_bytes / 1e9, offload_dir)

    def resume_hidden(buffer: torch.Tensor) -> None:
        with safe_open(str(work / state["hidden"]), framework="pt") as f:
            saved = f.get_slice("hidden")
            for i in range(buffer.shape[0]):
                buffer[i] = saved[i : i + 1][0].to(buffer.device)

    def sink(index: int, layer: torch.nn.Module, results: LayerResults, hidden: torch.Tensor) -> None:
        prefix = f"{spec.layers}.{index}."
        for key, tensor in layer.state_dict().items():
            name = prefix + key.removesuffix(".weight")
            if key.endswith(".weight") and name in results:
                writer.add_quantized(name, results[name])
            else:
                writer.add(prefix + key, tensor)
        unquantized.extend(prefix + n for n in layer_linears(layer, spec) if prefix + n not in results)
        if awq_spool is not None:
            for key in sorted(k for k in awq_record if k.startswith(prefix)):
                awq_spool.add(key, awq_record.pop(key))
        hidden_file = f"hidden-{index + 1:05d}.safetensors"
        save_tensors(work / hidden_file, {"hidden": hidden})
        _commit(work, {"fingerprint": fingerprint, "next_layer": index + 1, "hidden": hidden_file,
                       "writer": writer.sync(), "awq": awq_spool.sync() if awq_spool else None,
                       "unquantized": unquantized})
        for old in work.glob("hidden-*.safetensors"):
            if old.name != hidden_file:
                old.unlink()

    awq_record: dict[str, torch.Tensor] = {}
    awq_state = load_file(recipe.apply_awq) if recipe.apply_awq else None
    if start < n_layers:
        quantize_layers(model, calib, recipe.quant, device=device, source=StreamingLayers(model, spec, ckpt),
                        sink=sink, batch_size=batch_size, keep_fp=_keep_fp(recipe), awq_state=awq_state,
                        awq_record=awq_record, start=start, resume_hidden=resume_hidden, offload_dir=offload_dir,
                        timer=timer)
    if offload_dir is not None:
        shutil.rmtree(offload_dir, ignore_errors=True)
    with timer("write"):
        for key, tensor in ckpt.load(tail).items():
            writer.add(key, tensor)
        fmt = writer.close(parse_size(recipe.max_shard_size))
        extra = {}
        if awq_spool is not None and awq_spool.entries:
            extra[AWQ_SEARCH_FILE] = lambda path: awq_spool.close(single_name=path.name)
        elif awq_spool is not None:
            awq_spool.close()  # nothing was searched (no foldable scale): no file, as in memory
        write_metadata(work, config, half_dtype(dtype), recipe.quant, fmt, n_layers, sorted(unquantized),
                       _recorded(recipe), tokenizer, generation_config(ckpt.folder, config), extra)
