"""The quantization job end to end: resolve the model, check the plan, calibrate, quantize, save.

This is what ``llmq quantize`` and the Python API run. Where the model comes from is
``llmq.source``, the device and dtype policy ``llmq.device``, the work folder and its resumable
state ``llmq.resume``; this module puts them together.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from . import __version__
from .arch import ArchSpec, arch_for, disk_namer, get_layers, layer_linears
from .arch.experts import split_experts
from .checkpoint import SpoolWriter, check_output_free, half_dtype, parse_size, save_tensors
from .config import Recipe
from .data import get_calibration
from .device import activation_budget, compute_dtype, forward_dtype, resolve_device
from .distributed import SINGLE, Ranks, check_distributed, rank_device, ranks_from_env
from .e2e import e2e_bytes, quantize_model
from .errors import CheckpointError, ConfigError
from .export import PackedWriter, check_format, check_layout, save_packed, write_metadata
from .killpoints import kill_point
from .loader import from_pretrained
from .memory import fix_malloc_mmap_threshold
from .methods import awq_search_bytes, needs_teacher
from .mixed import check_budget
from .pack import can_pack
from .pipeline import LayerResults, quantize_layers, skeleton_units
from .resume import WorkFolder
from .source import resolve_model
from .stream import (
    ShardedCheckpoint,
    StreamingLayers,
    checkpoint_dtype,
    discover_streamed,
    empty_model,
    generation_config,
    materialize,
)
from .timing import StageTimes

log = logging.getLogger(__name__)

# AWQ's searched scales and clips (safetensors bytes), for --apply-awq. Not named *.safetensors: a
# loader that takes every *.safetensors file of a folder without an index (vLLM does) would read it
# as weights.
AWQ_SEARCH_FILE = "awq_search.llmq"


def load_config(folder: str | Path, trust_remote_code: bool = False) -> Any:
    try:
        return AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot load a model config from {folder}: {e}") from e


def load_model(
    name_or_path: str, dtype: torch.dtype | None = None, trust_remote_code: bool = False,
    revision: str | None = None, kernel: str = "auto", device: str | torch.device = "cpu",
) -> tuple[PreTrainedModel, object]:
    """A causal LM on ``device`` and its tokenizer (any architecture: evaluation needs no table entry).

    ``name_or_path`` is a local folder or a hub id (read through the hub cache). A quantized
    checkpoint (``quantization_config`` in its config) loads packed through
    :func:`llmq.from_pretrained` (with ``kernel``), anything else through transformers; both in
    ``dtype`` or else :func:`llmq.device.compute_dtype` of the stored dtype (bfloat16 for a bf16
    checkpoint and for one packed from it, float32 otherwise), so a packed model and its source are
    compared in the same precision.
    """
    folder = resolve_model(name_or_path, revision, trust_remote_code=trust_remote_code)
    config = load_config(folder, trust_remote_code)
    dtype = dtype or compute_dtype(checkpoint_dtype(config))
    if getattr(config, "quantization_config", None) is not None:
        model = from_pretrained(folder, device=device, torch_dtype=dtype, trust_remote_code=trust_remote_code,
                                kernel=kernel)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, trust_remote_code=trust_remote_code)
    model.eval().to(device)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    return model, tokenizer


def check_plan(recipe: Recipe, model: nn.Module, spec: ArchSpec, packable_only: bool = True) -> None:
    """What the writer would refuse given the model's shapes, checked on its skeleton before any calibration
    (the settings alone are checked by :func:`llmq.export.check_format`, before the model is even fetched).
    ``packable_only``: linears the layout cannot hold will stay in full precision (said here; refused when that
    is all of them)."""
    linears = {f"{spec.layers}.{i}.{name}": m for i, layer in enumerate(get_layers(model, spec))
               for name, m in layer_linears(layer, spec, model.config, i).items()}
    shapes = {name: (m.out_features, m.in_features) for name, m in linears.items()}
    check_layout(recipe.format, recipe.quant, shapes)
    keep_fp = _keep_fp(recipe)
    kept = [name for name, m in linears.items() if keep_fp(name, m)] if packable_only else []
    if kept:
        n, k = shapes[kept[0]]
        why = (f"the packed layouts need both dimensions of a linear to be multiples of 32 ({kept[0]} is {n} x {k}, "
               f"hidden_size {getattr(model.config, 'hidden_size', '?')})")
        if len(kept) == len(shapes):  # a checkpoint of the FP model under a quantization config: refuse it
            raise ConfigError(f"none of the {len(shapes)} linears of the decoder layers can be packed: {why}, so "
                              "nothing would be quantized. Quantize a model whose hidden and intermediate sizes are "
                              "multiples of 32; to measure what quantization would cost this one, "
                              "llmq.api.quantize(recipe, packable_only=False) quantizes every linear in memory")
        log.warning("%d of %d linears stay in full precision: %s", len(kept), len(shapes), why)
    if recipe.quant.bits_per_weight is not None:  # every group has a width, and the budget fits the narrowest
        check_budget(skeleton_units(model, spec, recipe.quant, keep_fp), recipe.quant)
    if recipe.quant.method in ("awq", "awq+gptq") and not spec.scale_groups:
        raise ConfigError(
            f"AWQ needs to know where each scale folds, which model_type {model.config.model_type!r} does not show: "
            "it has no table entry (its GPTQ groups were inferred). Use --method gptq or rtn, name an entry with "
            "the same layout (--arch), or add one in llmq/arch/table.py, e.g. ScaleGroup('input_layernorm', "
            "('self_attn.q_proj', 'self_attn.k_proj', 'self_attn.v_proj'), inspect='self_attn') for the norm "
            "in front of q/k/v, and one per norm or linear feeding the others")
    if recipe.quant.e2e_steps:  # the whole model, its FP copy and the grids' optimiser state, all at once
        device = resolve_device(recipe.device)
        need = e2e_bytes(model, spec) + sum(t.numel() * t.element_size() for t in model.parameters())
        free = 2 * activation_budget(device)
        if need > free:
            raise ConfigError(f"the end-to-end phase (--e2e-steps) holds the whole model at once: about "
                              f"{need / 2**30:.1f} GiB, and {device} has {free / 2**30:.1f} GiB free. Drop --e2e-steps "
                              "(block-wise --method tune streams one layer at a time) or run on a larger device")
    if recipe.apply_awq is not None:
        if recipe.quant.method not in ("awq", "awq+gptq"):
            raise ConfigError(f"apply_awq re-applies AWQ scales, but method is {recipe.quant.method!r}: "
                              "use --method awq or awq+gptq, or drop --apply-awq")
        if not Path(recipe.apply_awq).is_file():
            raise ConfigError(f"apply_awq file {recipe.apply_awq} does not exist: give the {AWQ_SEARCH_FILE} "
                              "an earlier AWQ run wrote beside its checkpoint")


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


def _keep_fp(recipe: Recipe) -> Callable[[str, nn.Linear], bool]:
    """Linears whose shape the output layout cannot hold stay in full precision."""
    bits = recipe.quant.bits

    def keep_fp(name: str, m: nn.Linear) -> bool:
        return not can_pack(m.in_features, m.out_features, bits)
    return keep_fp


def _recorded(recipe: Recipe) -> dict[str, Any]:
    """The recipe as written into the output: without where it ran, so the same job gives the same bytes."""
    return {k: v for k, v in recipe.to_dict().items() if k not in ("out", "device")}


class Plan(NamedTuple):
    folder: Path  # the local model folder (a hub snapshot for a hub id)
    config: Any
    spec: ArchSpec
    stored_dtype: torch.dtype  # the checkpoint's dtype
    dtype: torch.dtype  # the dtype the model and its activations are held in
    work_dtype: torch.dtype  # the dtype of the layer forwards (float32 for a bf16 model on a CPU without bf16 matmuls)
    skeleton: nn.Module  # the model on the meta device


def plan(recipe: Recipe, packable_only: bool = True) -> Plan:
    """Resolve the model and check the whole job on its skeleton: fails before calibration or any write
    (``packable_only``: as :func:`check_plan`'s)."""
    check_format(recipe.format, recipe.quant)  # before a download
    folder = resolve_model(recipe.model, recipe.revision, trust_remote_code=recipe.trust_remote_code)
    config = load_config(folder, recipe.trust_remote_code)
    if getattr(config, "quantization_config", None) is not None:
        raise ConfigError(f"{recipe.model} is already quantized: quantize its full-precision original")
    spec = arch_for(config.model_type, recipe.arch)
    stored = checkpoint_dtype(config)
    dtype = compute_dtype(stored, recipe.compute_dtype)
    skeleton = empty_model(config, dtype, recipe.trust_remote_code)
    if spec is None:  # a dense decoder without an entry: its groups, from one forward of layer 0
        spec = discover_streamed(skeleton, ShardedCheckpoint(folder, disk_namer(skeleton)))
    split_experts(skeleton, spec)  # the streaming reader fills the experts' linears from the per-expert tensors
    check_plan(recipe, skeleton, spec, packable_only)
    work = forward_dtype(dtype, resolve_device(recipe.device), recipe.compute_dtype)
    return Plan(folder, config, spec, stored, dtype, work, skeleton)


def quantize(recipe: Recipe, packable_only: bool = True) -> Quantized:
    """Run ``recipe`` on the whole model in memory (for evaluation; :func:`quantize_to_disk` streams).

    With ``packable_only``, linears whose shape the output layout cannot hold stay in full
    precision, so the in-memory model is exactly the one the packed checkpoint decodes to.
    """
    p = plan(recipe, packable_only)
    model, tokenizer = load_model(p.folder, dtype=p.dtype, trust_remote_code=recipe.trust_remote_code)
    calib = _calibration(recipe, tokenizer)
    awq_state = load_file(recipe.apply_awq) if recipe.apply_awq else None
    awq_record: dict[str, torch.Tensor] = {}
    notes: dict[str, Any] = {}
    results = quantize_model(model, calib, recipe.quant, device=resolve_device(recipe.device),
                             keep_fp=_keep_fp(recipe) if packable_only else None, awq_state=awq_state,
                             awq_record=awq_record, notes=notes, spec=p.spec, work_dtype=p.work_dtype)
    return Quantized(model, tokenizer, results, awq_record, half_dtype(p.stored_dtype, p.spec.fp16_ok), notes, p.spec)


def save(run: Quantized, recipe: Recipe, overwrite: bool = False) -> Path:
    """Write the packed checkpoint of a ``quantize(recipe)`` run to ``recipe.out``.

    AWQ search results go beside it as ``awq_search.llmq`` (for ``--apply-awq``).
    """
    if not recipe.out:
        raise ConfigError("no output folder: pass --out DIR (or `out:` in the recipe)")
    extra = {AWQ_SEARCH_FILE: lambda path: save_tensors(path, run.awq)} if run.awq else {}
    return save_packed(run.model, run.tokenizer, run.results, recipe.out, recipe.quant, recipe=_recorded(recipe),
                       fmt=recipe.format, max_shard_size=recipe.max_shard_size, overwrite=overwrite, extra=extra,
                       dtype=run.dtype, notes=run.notes, spec=run.spec)


def write_quantized(recipe: Recipe, overwrite: bool = False, offload_activations: str | Path | None = None) -> Path:
    """Quantize ``recipe`` into ``recipe.out`` as ``llmq quantize`` does: streamed (:func:`quantize_to_disk`), or, when
    its end-to-end phase needs the whole model (``e2e_steps``), in memory and then written (not resumable)."""
    if not recipe.quant.e2e_steps:
        return quantize_to_disk(recipe, overwrite=overwrite, offload_activations=offload_activations)
    if not recipe.out:
        raise ConfigError("no output folder: pass --out DIR (or `out:` in the recipe)")
    check_output_free(Path(recipe.out), overwrite)  # before the run, not after it
    log.info("the end-to-end phase holds the whole model: quantizing in memory (not streamed, not resumable)")
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
    (:mod:`llmq.distributed`), rank 0 holds the work folder and writes, and the others read the layers and the
    resume state from the same paths (one machine, or a shared filesystem).
    """
    if not recipe.out:
        raise ConfigError("no output folder: pass --out DIR (or `out:` in the recipe)")
    if recipe.quant.e2e_steps:
        raise ConfigError("the end-to-end phase (e2e_steps) holds the whole model in memory and does not stream: "
                          "run it with llmq.api.write_quantized(recipe) (what `llmq quantize --e2e-steps N` does), "
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
                        sink=sink, batch_size=batch_size, keep_fp=_keep_fp(recipe), awq_state=awq_state,
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
