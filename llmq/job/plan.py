"""The plan of a quantization job, checked on the model's skeleton before any calibration or write.

:func:`plan` resolves the model (hub id or folder), reads its config, picks its architecture entry, builds the
model on the meta device and checks everything the settings and the shapes already decide: the output layout,
linears that must stay in full precision, the mixed-precision budget, AWQ's folds, the end-to-end phase's
memory. A bad job fails here, with the fix in the message, not an hour into calibration.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn as nn

from llmq.arch import ArchSpec, arch_for, disk_namer, get_layers, layer_linears
from llmq.arch.experts import split_experts
from llmq.config import Recipe
from llmq.errors import ConfigError
from llmq.formats.export import check_format, check_layout
from llmq.formats.gguf import check_gguf_settings, gguf_spec
from llmq.formats.pack import can_pack
from llmq.io.source import resolve_model
from llmq.io.stream import ShardedCheckpoint, checkpoint_dtype, discover_streamed, empty_model
from llmq.job.e2e import e2e_bytes
from llmq.job.mixed import check_budget
from llmq.job.pipeline import skeleton_units
from llmq.runtime.loader import load_config
from llmq.utils.device import activation_budget, compute_dtype, forward_dtype, resolve_device

log = logging.getLogger(__name__)

# AWQ's searched scales and clips (safetensors bytes), for --apply-awq. Not named *.safetensors: a
# loader that takes every *.safetensors file of a folder without an index (vLLM does) would read it
# as weights.
AWQ_SEARCH_FILE = "awq_search.llmq"


def check_plan(recipe: Recipe, model: nn.Module, spec: ArchSpec, packable_only: bool = True) -> None:
    """What the writer would refuse given the model's shapes, checked on its skeleton before any calibration
    (the settings alone are checked by :func:`llmq.formats.export.check_format`, before the model is even fetched).
    ``packable_only``: linears the layout cannot hold will stay in full precision (said here; refused when that
    is all of them)."""
    linears = {f"{spec.layers}.{i}.{name}": m for i, layer in enumerate(get_layers(model, spec))
               for name, m in layer_linears(layer, spec, model.config, i).items()}
    shapes = {name: (m.out_features, m.in_features) for name, m in linears.items()}
    check_layout(recipe.format, recipe.quant, shapes)
    keep_fp = keep_fp_rule(recipe)
    # GGUF: llama.cpp's presets give every linear a type (falling back where a row length does not divide a block)
    packs = packable_only and recipe.format != "gguf"
    kept = [name for name, m in linears.items() if keep_fp(name, m)] if packs else []
    if kept:
        n, k = shapes[kept[0]]
        why = (f"the packed layouts need both dimensions of a linear to be multiples of 32 ({kept[0]} is {n} x {k}, "
               f"hidden_size {getattr(model.config, 'hidden_size', '?')})")
        if len(kept) == len(shapes):  # a checkpoint of the FP model under a quantization config: refuse it
            raise ConfigError(f"none of the {len(shapes)} linears of the decoder layers can be packed: {why}, so "
                              "nothing would be quantized. Quantize a model whose hidden and intermediate sizes are "
                              "multiples of 32; to measure what quantization would cost this one, "
                              "llmq.job.runner.quantize(recipe, packable_only=False) quantizes every linear in memory")
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


def keep_fp_rule(recipe: Recipe) -> Callable[[str, nn.Linear], bool]:
    """Linears whose shape the output layout cannot hold stay in full precision."""
    bits = recipe.quant.bits

    def keep_fp(name: str, m: nn.Linear) -> bool:
        return not can_pack(m.in_features, m.out_features, bits)
    return keep_fp


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
    if recipe.format == "gguf":
        check_gguf_settings(recipe.gguf_type, recipe.quant.method, recipe.quant.bits_per_weight, recipe.quant.e2e_steps)
    folder = resolve_model(recipe.model, recipe.revision, trust_remote_code=recipe.trust_remote_code)
    config = load_config(folder, recipe.trust_remote_code)
    if getattr(config, "quantization_config", None) is not None:
        raise ConfigError(f"{recipe.model} is already quantized: quantize its full-precision original")
    spec = arch_for(config.model_type, recipe.arch)
    if recipe.format == "gguf":
        gguf_spec(config)  # llama.cpp has this architecture, and the table says how to write it
    stored = checkpoint_dtype(config)
    dtype = compute_dtype(stored, recipe.compute_dtype)
    skeleton = empty_model(config, dtype, recipe.trust_remote_code)
    if spec is None:  # a dense decoder without an entry: its groups, from one forward of layer 0
        spec = discover_streamed(skeleton, ShardedCheckpoint(folder, disk_namer(skeleton)))
    split_experts(skeleton, spec)  # the streaming reader fills the experts' linears from the per-expert tensors
    check_plan(recipe, skeleton, spec, packable_only)
    work = forward_dtype(dtype, resolve_device(recipe.device), recipe.compute_dtype)
    return Plan(folder, config, spec, stored, dtype, work, skeleton)
