"""The quantization job end to end: plan (:mod:`llmq.job.plan`), calibrate, quantize, write.

:func:`quantize` runs the job in memory (for evaluation) and :func:`save` writes its result;
:func:`quantize_to_disk` streams the model layer by layer from its shards into the output, resumably, and is
what ``llmq quantize`` and :func:`llmq.quantize` run (:func:`write_quantized` picks between the two). Where the
model comes from is :mod:`llmq.io.source`, the device and dtype policy :mod:`llmq.utils.device`, the work
folder and its resumable state :mod:`llmq.io.resume`; this module puts them together.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoTokenizer, PreTrainedModel

from llmq._version import __version__
from llmq.arch import ArchSpec, disk_namer, get_layers, layer_linears
from llmq.arch.experts import split_experts
from llmq.config import Recipe
from llmq.errors import ConfigError
from llmq.formats.export import PackedWriter, save_packed, write_metadata
from llmq.formats.gguf import check_gguf_settings, grid_encoder, linear_types, write_gguf
from llmq.io.checkpoint import SpoolWriter, check_output_free, half_dtype, parse_size, save_tensors
from llmq.io.data import get_calibration
from llmq.io.resume import WorkFolder
from llmq.io.stream import (
    ShardedCheckpoint,
    StreamingLayers,
    generation_config,
    materialize,
)
from llmq.job.distributed import SINGLE, Ranks, check_distributed, rank_device, ranks_from_env
from llmq.job.e2e import quantize_model
from llmq.job.methods import awq_search_bytes, needs_teacher
from llmq.job.pipeline import LayerResults, quantize_layers
from llmq.job.plan import AWQ_SEARCH_FILE, Plan, keep_fp_rule, plan
from llmq.runtime.loader import load_model
from llmq.utils.device import activation_budget, resolve_device
from llmq.utils.killpoints import kill_point
from llmq.utils.memory import fix_malloc_mmap_threshold
from llmq.utils.timing import StageTimes

log = logging.getLogger(__name__)



class Quantized(NamedTuple):
    model: PreTrainedModel  # weights replaced by their quantized values
    tokenizer: Any
    results: LayerResults  # full module name -> codes and quantization parameters
    awq: dict[str, torch.Tensor]  # AWQ search results (scales, clips) by name; empty for other methods
    dtype: torch.dtype = torch.float16  # unquantized tensors are saved in this dtype (the checkpoint's half dtype)
    notes: dict[str, Any] | None = None  # what the methods noted for the metadata (experts' tokens and policies)
    spec: ArchSpec | None = None  # the table entry the run used (None: the model_type's own)


def _calibration(recipe: Recipe, tokenizer: Any) -> torch.Tensor:
    c = recipe.calib
    if recipe.quant.method == "rtn" and not recipe.quant.e2e_steps:
        return torch.zeros(1, 2, dtype=torch.long)  # RTN reads no data; one dummy window fills the pipeline
    return get_calibration(c.calib, tokenizer, c.nsamples, c.seqlen, c.seed)


def gguf_choice(recipe: Recipe) -> str:
    """The llama-quantize preset, or single llama.cpp type, of a GGUF run."""
    return check_gguf_settings(recipe.gguf_type, recipe.quant.method, recipe.quant.bits_per_weight,
                               recipe.quant.e2e_steps)


def _recorded(recipe: Recipe) -> dict[str, Any]:
    """The recipe as written into the output: without where it ran, so the same job gives the same bytes."""
    return {k: v for k, v in recipe.to_dict().items() if k not in ("out", "device")}


def quantize(recipe: Recipe, packable_only: bool = True) -> Quantized:
    """Run ``recipe`` on the whole model in memory (for evaluation; :func:`quantize_to_disk` streams).

    With ``packable_only``, linears whose shape the output layout cannot hold stay in full
    precision, so the in-memory model is exactly the one the packed checkpoint decodes to.
    """
    p = plan(recipe, packable_only)
    model, tokenizer = load_model(p.folder, dtype=p.dtype, trust_remote_code=recipe.trust_remote_code)
    keep_fp, ggml_types = keep_fp_rule(recipe) if packable_only else None, None
    if recipe.format == "gguf":  # each linear rounded onto the llama.cpp type the preset gives it
        split_experts(model, p.spec)
        ggml_types = linear_types(model, gguf_choice(recipe))
        keep_fp = lambda name, m: name not in ggml_types  # noqa: E731 (the preset keeps these in float)
    calib = _calibration(recipe, tokenizer)
    awq_state = load_file(recipe.apply_awq) if recipe.apply_awq else None
    awq_record: dict[str, torch.Tensor] = {}
    notes: dict[str, Any] = {}
    results = quantize_model(model, calib, recipe.quant, device=resolve_device(recipe.device),
                             keep_fp=keep_fp, awq_state=awq_state, awq_record=awq_record, notes=notes, spec=p.spec,
                             work_dtype=p.work_dtype, ggml_types=ggml_types)
    return Quantized(model, tokenizer, results, awq_record, half_dtype(p.stored_dtype, p.spec.fp16_ok), notes, p.spec)


def save(run: Quantized, recipe: Recipe, overwrite: bool = False) -> Path:
    """Write the packed checkpoint of a ``quantize(recipe)`` run to ``recipe.out``.

    AWQ search results go beside it as ``awq_search.llmq`` (for ``--apply-awq``).
    """
    if not recipe.out:
        raise ConfigError("no output folder: pass --out DIR (or `out:` in the recipe)")
    if recipe.format == "gguf":  # one file, the linears in llmq's own rounding
        out = Path(recipe.out)
        check_output_free(out, overwrite)
        out.parent.mkdir(parents=True, exist_ok=True)
        encode = grid_encoder(run.model, run.results)
        return write_gguf(run.model, run.tokenizer, out, gguf_choice(recipe), encode=encode)
    extra = {AWQ_SEARCH_FILE: lambda path: save_tensors(path, run.awq)} if run.awq else {}
    return save_packed(run.model, run.tokenizer, run.results, recipe.out, recipe.quant, recipe=_recorded(recipe),
                       fmt=recipe.format, max_shard_size=recipe.max_shard_size, overwrite=overwrite, extra=extra,
                       dtype=run.dtype, notes=run.notes, spec=run.spec)


def write_quantized(recipe: Recipe, overwrite: bool = False, offload_activations: str | Path | None = None) -> Path:
    """Quantize ``recipe`` into ``recipe.out`` as ``llmq quantize`` does: streamed (:func:`quantize_to_disk`), or, when
    its end-to-end phase needs the whole model (``e2e_steps``) or it writes one GGUF file, in memory and then written
    (not resumable)."""
    if not recipe.quant.e2e_steps and recipe.format != "gguf":
        return quantize_to_disk(recipe, overwrite=overwrite, offload_activations=offload_activations)
    if not recipe.out:
        raise ConfigError("no output folder: pass --out DIR (or `out:` in the recipe)")
    check_output_free(Path(recipe.out), overwrite)  # before the run, not after it
    log.info("%s holds the whole model: quantizing in memory (not streamed, not resumable)",
             "a GGUF file" if recipe.format == "gguf" else "the end-to-end phase")
    return save(quantize(recipe), recipe, overwrite=overwrite)


def _settings(recipe: Recipe, calib: torch.Tensor, ckpt: ShardedCheckpoint) -> str:
    """What must match for a partial run to be resumed at all: settings, calibration tokens, input shards."""
    inputs = {p.name: p.stat().st_size for p in sorted(set(ckpt.where.values()))}
    blob = json.dumps({"recipe": _recorded(recipe), "inputs": inputs}, sort_keys=True)
    h = hashlib.sha256(blob.encode())
    h.update(calib.numpy().tobytes())
    return h.hexdigest()


def _environment(device: torch.device, dtype: torch.dtype, work_dtype: torch.dtype, batch_size: int, ranks: Ranks
                 ) -> dict[str, Any]:
    """What else changes the bytes: a partial run made elsewhere is not resumed but started afresh (the number of
    ranks too: it changes the order in which the Hessians are summed)."""
    return {"llmq": __version__, "torch": torch.__version__, "device": device.type, "dtype": str(dtype),
            "work_dtype": str(work_dtype), "batch_size": batch_size, "ranks": ranks.world}


def _state_files(state: dict[str, Any]) -> list[str]:
    """The files a committed state needs (the spools are gone once the final shards are being written)."""
    return ["spool.bin", state["hidden"]] + (["awq.spool"] if state.get("awq") else [])


def _scratch(path: Path) -> bool:
    """Files of the work folder that are not part of the output."""
    return path.name.startswith(("hidden-", "activations"))


def quantize_to_disk(recipe: Recipe, overwrite: bool = False, offload_activations: str | Path | None = None,
                     batch_size: int = 8, timer: StageTimes | None = None) -> Path:
    """Run ``recipe`` streaming: read each decoder layer from the input shards, append its packed tensors.

    Memory holds one decoder layer plus the calibration activations (those go to memory-mapped
    files in ``offload_activations``, or in the output's work folder when they exceed half the free
    memory). The work folder ``.<out>.partial`` beside the output holds the packed tensors so far
    and, after each layer, an atomically committed state; the same command run again after a kill
    at any moment continues from the first unfinished layer and writes the same bytes as an
    uninterrupted run.

    Under torchrun (``WORLD_SIZE`` > 1) every rank calls this; the calibration windows are split across them
    (:mod:`llmq.job.distributed`), rank 0 holds the work folder and writes, and the others read the layers and the
    resume state from the same paths (one machine, or a shared filesystem).
    """
    if not recipe.out:
        raise ConfigError("no output folder: pass --out DIR (or `out:` in the recipe)")
    if recipe.quant.e2e_steps:
        raise ConfigError("the end-to-end phase (e2e_steps) holds the whole model in memory and does not stream: "
                          "run it with llmq.job.runner.write_quantized(recipe) "
                          "(what `llmq quantize --e2e-steps N` does), "
                          "or set e2e_steps to 0")
    out = Path(recipe.out)
    check_output_free(out, overwrite)
    p = plan(recipe)
    device = resolve_device(recipe.device)
    ranks = ranks_from_env(device)
    check_distributed(recipe.quant, ranks)
    device = rank_device(device)
    fix_malloc_mmap_threshold()
    ckpt = ShardedCheckpoint(p.folder, disk_namer(p.skeleton, p.spec))
    tokenizer = AutoTokenizer.from_pretrained(p.folder, trust_remote_code=recipe.trust_remote_code)
    calib = _calibration(recipe, tokenizer)
    settings = _settings(recipe, calib, ckpt)
    if not ranks.writes:  # the writing rank's folder and state, read from the same paths
        shared = ranks.share_json(None)
        _stream_layers(recipe, p, ckpt, tokenizer, calib, device, Path(shared["folder"]), shared["state"], settings,
                       offload_activations, batch_size, timer or StageTimes(), ranks, None)
        ranks.barrier()
        return out
    with WorkFolder(out) as work:
        environment = _environment(device, p.dtype, p.work_dtype, batch_size, ranks)
        state = work.load(settings, environment, overwrite, _state_files)
        ranks.share_json({"folder": str(work.path), "state": state})
        _stream_layers(recipe, p, ckpt, tokenizer, calib, device, work.path, state, settings, offload_activations,
                       batch_size, timer or StageTimes(), ranks, work)
        work.finish(_scratch)
    ranks.barrier()
    log.info("wrote %s", out)
    return out


def _stream_layers(recipe: Recipe, p: Plan, ckpt: ShardedCheckpoint, tokenizer: Any, calib: torch.Tensor,
                   device: torch.device, folder: Path, state: dict[str, Any] | None, settings: str,
                   offload_activations: str | Path | None, batch_size: int, timer: StageTimes,
                   ranks: Ranks = SINGLE, work: WorkFolder | None = None) -> None:
    """The layers of a streaming run; ``work`` is the writing rank's folder (None: a rank that only computes)."""
    model, spec, config = p.skeleton, p.spec, p.config
    n_layers = len(get_layers(model, spec))
    keys = list(model.state_dict())
    layer_prefix = spec.layers + "."
    first = next(i for i, k in enumerate(keys) if k.startswith(layer_prefix))
    tied = "lm_head.weight" if getattr(config, "tie_word_embeddings", False) else None
    head = keys[:first]
    tail = [k for k in keys[first:] if not k.startswith(layer_prefix) and k != tied]

    out_dtype = half_dtype(p.stored_dtype, spec.fp16_ok)
    writes = work is not None
    writer = PackedWriter(folder, recipe.format, out_dtype, recipe.quant.bits,
                          state=state["writer"] if state else None) if writes else None
    awq_method = recipe.quant.method in ("awq", "awq+gptq") and not recipe.apply_awq
    awq_spool = (SpoolWriter(folder, "awq.spool", state=state["awq"] if state else None)
                 if awq_method and writes else None)
    unquantized: list[str] = list(state["unquantized"]) if state else []
    notes: dict[str, Any] = dict(state.get("notes", {})) if state else {}
    start = state["next_layer"] if state else 0
    with timer("load"):
        for name in spec.before:
            materialize(model.get_submodule(name), name + ".", ckpt)
        if state is None and writes:
            for key, tensor in ckpt.load(head).items():
                writer.add(ckpt.to_disk(key), tensor)

    hidden_size = config.get_text_config().hidden_size
    hidden_bytes = calib.numel() * hidden_size * p.dtype.itemsize * (
        1 + (recipe.quant.next_inputs == "fp") + needs_teacher(recipe.quant.method))
    if awq_method:  # the scale search's own buffers count against the same budget
        widest = max(m.in_features for i, layer in enumerate(get_layers(model, spec))
                     for m in layer_linears(layer, spec, config, i).values())
        hidden_bytes += awq_search_bytes(recipe.quant, calib.shape[0], calib.shape[1], widest, hidden_size,
                                         p.dtype.itemsize)
    offload_dir = None
    own = f"-rank{ranks.rank}" if ranks.active else ""  # each rank's windows in files of its own
    if offload_activations is not None:
        offload_dir = Path(offload_activations) / f"llmq-{settings[:16]}{own}"
    elif hidden_bytes > activation_budget(device):
        offload_dir = folder / f"activations{own}"
        log.warning("calibration activations (%.1f GB) exceed half the free memory: keeping them in %s",
                    hidden_bytes / 1e9, offload_dir)

    mine = ranks.windows(calib.shape[0])  # the saved activations hold every rank's windows, in order

    def resume_hidden(activations: dict[str, torch.Tensor]) -> None:
        with safe_open(str(folder / state["hidden"]), framework="pt") as f:
            for name, buffer in activations.items():
                saved = f.get_slice(name)
                for i in range(buffer.shape[0]):
                    buffer[i] = saved[mine.start + i : mine.start + i + 1][0].to(buffer.device)

    def sink(index: int, layer: nn.Module, results: LayerResults, activations: dict[str, torch.Tensor]) -> None:
        if ranks.active:
            activations = {name: ranks.gather_windows(t, calib.shape[0]) for name, t in activations.items()}
        if not writes:
            return
        prefix = f"{spec.layers}.{index}."
        for key, tensor in layer.state_dict().items():
            name = prefix + key.removesuffix(".weight")
            if key.endswith(".weight") and name in results:
                writer.add_quantized(ckpt.to_disk(name), results[name])
            else:
                writer.add(ckpt.to_disk(prefix + key), tensor)
        unquantized.extend(ckpt.to_disk(prefix + n) for n in layer_linears(layer, spec, config, index)
                           if prefix + n not in results)
        if awq_spool is not None:
            for key in sorted(k for k in awq_record if k.startswith(prefix)):
                awq_spool.add(key, awq_record.pop(key))
        hidden_file = f"hidden-{index + 1:05d}.safetensors"
        save_tensors(folder / hidden_file, activations, kill="activations.write")
        work.commit({"next_layer": index + 1, "hidden": hidden_file, "writer": writer.sync(),
                     "awq": awq_spool.sync() if awq_spool else None, "unquantized": unquantized, "notes": notes})
        for old in folder.glob("hidden-*.safetensors"):
            if old.name != hidden_file:
                old.unlink()
        kill_point("layer.committed")

    awq_record: dict[str, torch.Tensor] = {}
    awq_state = load_file(recipe.apply_awq) if recipe.apply_awq else None
    if start < n_layers:
        quantize_layers(model, calib, recipe.quant, device=device, source=StreamingLayers(model, spec, ckpt),
                        sink=sink, batch_size=batch_size, keep_fp=keep_fp_rule(recipe), awq_state=awq_state,
                        awq_record=awq_record, start=start, resume_hidden=resume_hidden, offload_dir=offload_dir,
                        timer=timer, notes=notes, spec=spec, ranks=ranks, work_dtype=p.work_dtype)
    if offload_dir is not None:
        shutil.rmtree(offload_dir, ignore_errors=True)
    if not writes:
        return
    with timer("write"):
        for key, tensor in ckpt.load(tail).items():
            writer.add(ckpt.to_disk(key), tensor)
        fmt = writer.close(parse_size(recipe.max_shard_size))
        kill_point("finish.shards_written")
        extra = {}
        if awq_spool is not None and awq_spool.entries:
            extra[AWQ_SEARCH_FILE] = lambda path: awq_spool.close(single_name=path.name)
        elif awq_spool is not None:
            awq_spool.close()  # nothing was searched (no foldable scale): no file, as in memory
        write_metadata(folder, config, out_dtype, recipe.quant, fmt, n_layers, sorted(unquantized),
                       _recorded(recipe), tokenizer, generation_config(ckpt.folder, config), extra, notes, spec)
        kill_point("finish.metadata_written")
