"""Quantization methods, one function per decoder layer with the same signature.

A method receives a ``LayerJob`` (the layer, its true-sequential groups, and a way to observe the
inputs of chosen linears on the calibration data) and returns the quantized weight of every
linear it handled. It writes the dequantized weights back into the layer, so the pipeline can
compute the quantized layer's outputs as the next layer's inputs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

from .config import QuantConfig
from .errors import WeightError
from .gptq import HessianAccumulator, gptq_quantize
from .quant import QuantizedWeight, rtn_quantize

log = logging.getLogger(__name__)


@dataclass
class LayerJob:
    index: int
    prefix: str  # "model.layers.3." : prefix of this layer's module names in the model
    groups: tuple[dict[str, nn.Linear], ...]  # true-sequential groups of linears, by name in the layer
    cfg: QuantConfig
    # observe(modules, fn): run the layer over all calibration inputs, calling fn(name, x) with
    # each listed module's input batch; stops each batch early once all of them have run.
    observe: Callable[[dict[str, nn.Linear], Callable[[str, torch.Tensor], None]], None]


def check_finite(name: str, tensor: torch.Tensor, what: str = "weight") -> None:
    bad = (~torch.isfinite(tensor)).sum().item()
    if bad:
        raise WeightError(
            f"{what} of {name} has {bad} NaN/Inf value(s): the checkpoint is corrupt or comes from a "
            "diverged run; re-export it (or load it in float32 if fp16 overflowed) before quantizing"
        )


def write_back(module: nn.Linear, qw: QuantizedWeight) -> None:
    module.weight.data = qw.dequantize().to(module.weight.dtype).to(module.weight.device)


def rtn_layer(job: LayerJob) -> dict[str, QuantizedWeight]:
    """Round to nearest: needs no calibration data."""
    results = {}
    for group in job.groups:
        for name, module in group.items():
            check_finite(job.prefix + name, module.weight)
            results[name] = rtn_quantize(module.weight.data, job.cfg)
            write_back(module, results[name])
    return results


def gptq_layer(job: LayerJob) -> dict[str, QuantizedWeight]:
    """GPTQ, group by group: each group's Hessians come from inputs through the quantized groups before it."""
    groups = job.groups if job.cfg.true_sequential else ({k: v for g in job.groups for k, v in g.items()},)
    results = {}
    for group in groups:
        for name, module in group.items():
            check_finite(job.prefix + name, module.weight)
        accs = {name: HessianAccumulator(m.in_features, m.weight.device) for name, m in group.items()}
        job.observe(group, lambda name, x, accs=accs: accs[name].add(x))
        for name, module in group.items():
            H = accs[name].hessian()
            check_finite(job.prefix + name, H, "calibration Hessian (inputs overflowed?)")
            res = gptq_quantize(module.weight.data, H, job.cfg)
            log.info("layer %d %-22s loss %.5g damp %.3g", job.index, name, res.loss, res.damp)
            results[name] = res.weight
            write_back(module, res.weight)
    return results


METHOD_FNS: dict[str, Callable[[LayerJob], dict[str, QuantizedWeight]]] = {
    "rtn": rtn_layer,
    "gptq": gptq_layer,
}
