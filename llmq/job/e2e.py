"""The end-to-end phase: after the layer-by-layer pass, every linear's grid tuned against the FP model's outputs.

The model's side of :func:`llmq.algorithms.tune.tune_end_to_end`: before the pass, :func:`capture_teacher` keeps the FP
weights of the linears and the FP model's inputs to its output embeddings (the final hidden states) on the
calibration windows; after it, :func:`fit_end_to_end` runs the whole quantized model, its linears' weights
replaced by the tunable grids, and compares both through the same output embeddings. Nothing here names an
architecture: the decoder layers' linears come from the table entry, the head from
``get_output_embeddings()``. The whole model is on the device at once and a backward runs through all of it:
this phase does not stream.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from llmq.algorithms.quant import QuantizedWeight
from llmq.algorithms.tune import tune_end_to_end
from llmq.arch import ArchSpec, resolve_arch
from llmq.arch.experts import split_experts
from llmq.config import QuantConfig
from llmq.job.methods import write_back
from llmq.job.pipeline import LayerResults, quantize_layers
from llmq.utils.device import resolve_device

log = logging.getLogger(__name__)


class _HeadReached(Exception):
    pass


@dataclass
class Teacher:
    weights: dict[str, torch.Tensor]  # the FP weights of every linear in the decoder layers, by full name
    hidden: torch.Tensor  # the FP model's output-embedding inputs ``[windows, seqlen, hidden]``


def _head_input(model: nn.Module, input_ids: torch.Tensor, params: dict[str, torch.Tensor] | None = None
                ) -> torch.Tensor:
    """The input of the model's output embeddings for ``input_ids`` (with ``params`` replacing its tensors): the
    forward stops there, so the logits are computed once, by the caller."""
    seen: list[torch.Tensor] = []

    def hook(module: nn.Module, args: tuple) -> None:
        seen.append(args[0])
        raise _HeadReached

    handle = model.get_output_embeddings().register_forward_pre_hook(hook)
    try:
        torch.func.functional_call(model, params or {}, (), {"input_ids": input_ids, "use_cache": False})
    except _HeadReached:
        pass
    finally:
        handle.remove()
    return seen[0]


def _decoder_linears(model: nn.Module, spec: ArchSpec) -> dict[str, nn.Linear]:
    """Every linear inside the decoder layers, by full name: the ones the pass may quantize."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name.startswith(spec.layers + ".")}


def e2e_bytes(model: nn.Module, spec: ArchSpec) -> int:
    """Memory the phase adds, roughly: per weight of the decoder layers' linears the FP copy, the offset, its
    gradient and Adam's two moments, float32 each (the per-weight step and the grid's forward come on top)."""
    return 20 * sum(m.weight.numel() for m in _decoder_linears(model, spec).values())


@torch.no_grad()
def capture_teacher(model: nn.Module, spec: ArchSpec, input_ids: torch.Tensor, device: torch.device,
                    batch_size: int = 8) -> Teacher:
    """The FP linears' weights and the FP model's final hidden states on ``input_ids``, before quantizing."""
    split_experts(model, spec)  # the linears the pass quantizes, named as its results are
    weights = {name: m.weight.detach().clone() for name, m in _decoder_linears(model, spec).items()}
    model.to(device)
    try:
        hidden = torch.cat([_head_input(model, ids.to(device)).cpu() for ids in input_ids.split(batch_size)])
    finally:
        model.to("cpu")
    return Teacher(weights, hidden)


def fit_end_to_end(model: nn.Module, input_ids: torch.Tensor, results: dict[str, QuantizedWeight], teacher: Teacher,
                   cfg: QuantConfig, device: torch.device, notes: dict[str, Any] | None = None
                   ) -> dict[str, QuantizedWeight]:
    """Tune every quantized linear's grid in ``results`` against the FP model's next-token distributions on the
    calibration windows ``input_ids`` (:func:`llmq.algorithms.tune.tune_end_to_end`); the model's weights become
    the tuned grid's, and the tuned results are returned (the start's if tuning did not lower the KL)."""
    head = model.get_output_embeddings()
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    model.to(device)
    try:
        def student(weights: dict[str, torch.Tensor], idx: torch.Tensor) -> torch.Tensor:
            h = _head_input(model, input_ids[idx].to(device), {n + ".weight": w for n, w in weights.items()})
            return torch.log_softmax(head(h).float(), -1)

        def target(idx: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return torch.log_softmax(head(teacher.hidden[idx].to(device)).float(), -1)

        fp = {name: teacher.weights[name].to(device) for name in results}
        res = tune_end_to_end(student, target, input_ids.shape[0], results, fp, cfg, seed=cfg.tune_seed)
    finally:
        model.to("cpu")
        for p in frozen:
            p.requires_grad_(True)
    log.info("end to end: KL to the FP model %.5g -> %.5g%s", res.loss_before, res.loss_after,
             " (kept the start: tuning did not lower it)" if res.kept_start else "")
    if notes is not None:
        notes["e2e/kl"] = {"before": res.loss_before, "after": res.loss_after}
    for name, qw in res.weights.items():
        write_back(model.get_submodule(name), qw)
    return {name: qw.to("cpu") for name, qw in res.weights.items()}


def quantize_model(model: nn.Module, input_ids: torch.Tensor, cfg: QuantConfig,
                   device: str | torch.device | None = None, spec: ArchSpec | None = None,
                   notes: dict[str, Any] | None = None, **layer_options: Any) -> LayerResults:
    """The in-memory model's whole job: :func:`llmq.job.pipeline.quantize_layers` (``layer_options`` are its), then,
    with ``cfg.e2e_steps``, the end-to-end phase. Returns every quantized weight; the model holds their values."""
    spec = spec or resolve_arch(model)
    device = resolve_device(device)
    teacher = capture_teacher(model, spec, input_ids, device) if cfg.e2e_steps else None
    results = quantize_layers(model, input_ids, cfg, device=device, spec=spec, notes=notes, **layer_options)
    if teacher is not None:
        results = fit_end_to_end(model, input_ids, results, teacher, cfg, device, notes)
    return results
