"""Layer-by-layer quantization: calibration activations stream through one decoder layer at a time.

1. Capture the first decoder layer's inputs (hidden states and keyword arguments such as the
   attention mask and rotary position embeddings) by running the model up to that layer only.
2. For each layer: load it onto the compute device, let the method quantize it (observing its
   linears' inputs as often as it needs), recompute the layer's outputs with the quantized
   weights as the next layer's inputs, and hand the results to the sink.
Only one decoder layer and the calibration activations are on the compute device at a time.
The pipeline knows no method by name and no checkpoint format.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, Protocol

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .arch import ArchSpec, get_arch, get_layers, layer_linears
from .config import QuantConfig
from .methods import METHOD_FNS, LayerJob, check_finite
from .quant import QuantizedWeight

log = logging.getLogger(__name__)

LayerResults = dict[str, QuantizedWeight]  # full module name -> quantized weight
Sink = Callable[[int, nn.Module, LayerResults], None]


class LayerSource(Protocol):
    """Where each decoder layer's weights come from (the loaded model, or shards read lazily)."""

    def load_layer(self, index: int) -> nn.Module: ...

    def release_layer(self, index: int, layer: nn.Module) -> None: ...


class InMemoryLayers:
    """Layers of a model already in (CPU) memory: moved to the device and back."""

    def __init__(self, model: nn.Module, spec: ArchSpec):
        self.layers = get_layers(model, spec)

    def load_layer(self, index: int) -> nn.Module:
        return self.layers[index]

    def release_layer(self, index: int, layer: nn.Module) -> None:
        layer.to("cpu")


class _StopForward(Exception):
    pass


class _Catcher(nn.Module):
    """Stands in for the first decoder layer: records its inputs and stops the forward pass."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer  # kept so attributes such as attention_type stay reachable
        self.hidden: list[torch.Tensor] = []
        self.kwargs: dict[str, Any] | None = None

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.layer, name)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        if args:
            raise RuntimeError("decoder layer called with positional arguments beyond hidden_states")
        self.hidden.append(hidden_states)
        if self.kwargs is None:
            self.kwargs = kwargs
        raise _StopForward


def capture_layer_inputs(
    model: nn.Module, spec: ArchSpec, input_ids: torch.Tensor, device: torch.device
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Hidden states ``[n, seqlen, hidden]`` entering layer 0 and the layer's keyword arguments.

    Runs only the modules before the first layer (embedding, rotary) on ``device``: windows go one
    at a time, so the captured kwargs (mask, positions) have batch 1 and broadcast over any batch.
    """
    layers = get_layers(model, spec)
    before = [model.get_submodule(name) for name in spec.before]
    for module in before:
        module.to(device)
    catcher = _Catcher(layers[0])
    layers[0] = catcher
    try:
        with torch.no_grad():
            for row in input_ids:
                try:
                    model(input_ids=row[None].to(device), use_cache=False)
                except _StopForward:
                    pass
    finally:
        layers[0] = catcher.layer
        for module in before:
            module.to("cpu")
    kwargs = {k: v for k, v in (catcher.kwargs or {}).items() if k not in ("past_key_values", "past_key_value")}
    return torch.cat(catcher.hidden), kwargs


def _layer_forward(layer: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _observe(
    layer: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any], batch_size: int,
    modules: dict[str, nn.Linear], fn: Callable[[str, torch.Tensor], None],
) -> None:
    """Run ``layer`` over ``hidden`` in batches, calling ``fn(name, x)`` with each listed module's input.

    Each batch stops as soon as every listed module has seen it: the rest of the layer is not needed.
    """
    pending: set[str] = set()

    def hook(name: str):
        def _hook(module: nn.Module, args: tuple, output: Any) -> None:
            fn(name, args[0].detach())
            pending.discard(name)
            if not pending:
                raise _StopForward
        return _hook

    handles = [m.register_forward_hook(hook(name)) for name, m in modules.items()]
    try:
        with torch.no_grad():
            for i in range(0, hidden.shape[0], batch_size):
                pending.update(modules)
                try:
                    _layer_forward(layer, hidden[i : i + batch_size], kwargs)
                except _StopForward:
                    pass
    finally:
        for h in handles:
            h.remove()


def _propagate(layer: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any], batch_size: int) -> torch.Tensor:
    """Replace ``hidden`` by the layer's outputs, batch by batch, in place."""
    with torch.no_grad():
        for i in range(0, hidden.shape[0], batch_size):
            hidden[i : i + batch_size] = _layer_forward(layer, hidden[i : i + batch_size], kwargs)
    return hidden


def quantize_layers(
    model: nn.Module,
    input_ids: torch.Tensor,
    cfg: QuantConfig,
    device: str | torch.device | None = None,
    source: LayerSource | None = None,
    sink: Sink | None = None,
    batch_size: int = 8,
    keep_fp: Callable[[str, nn.Linear], bool] | None = None,
    awq_state: dict[str, torch.Tensor] | None = None,
    awq_record: dict[str, torch.Tensor] | None = None,
) -> LayerResults:
    """Quantize every decoder layer's linears with ``cfg.method``; returns all quantized weights.

    ``input_ids`` ``[n, seqlen]`` are the calibration windows. ``source`` yields the layers
    (default: the model's own, in memory); ``sink`` receives each finished layer, and when one is
    given the results are not also kept (so memory stays at one layer's). Linears for which
    ``keep_fp(full_name, module)`` is true stay in full precision (e.g. shapes a format cannot hold).
    AWQ methods fill ``awq_record`` with their search results, or re-apply ``awq_state`` without searching.
    """
    spec = get_arch(model.config.model_type)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    source = source or InMemoryLayers(model, spec)
    method = METHOD_FNS[cfg.method]
    n_layers = len(get_layers(model, spec))

    hidden, kwargs = capture_layer_inputs(model, spec, input_ids, device)
    log.info("captured %d calibration windows of %d tokens for %d layers", *hidden.shape[:2], n_layers)

    all_results: LayerResults = {}
    for index in tqdm(range(n_layers), desc=f"{cfg.method} W{cfg.bits}", unit="layer"):
        layer = source.load_layer(index).to(device)
        prefix = f"{spec.layers}.{index}."
        linears = layer_linears(layer, spec)
        for name, module in linears.items():
            check_finite(prefix + name, module.weight)
        if keep_fp is not None:
            linears = {name: m for name, m in linears.items() if not keep_fp(prefix + name, m)}
        groups = tuple(g for g in ({n: linears[n] for n in group if n in linears} for group in spec.sequential) if g)

        observe = functools.partial(_observe, layer, hidden, kwargs, batch_size)
        fp_outputs = _propagate(layer, hidden.clone(), kwargs, batch_size) if cfg.next_inputs == "fp" else None
        record = awq_record.__setitem__ if awq_record is not None else (lambda name, tensor: None)
        job = LayerJob(index, prefix, groups, cfg, observe, layer=layer, kwargs=kwargs,
                       scale_groups=spec.scale_groups, batch_size=batch_size, record=record, awq_state=awq_state)
        results = method(job)
        if fp_outputs is not None:
            hidden.copy_(fp_outputs)  # the AWQ reference feeds the next layer full-precision outputs
        else:  # the quantized layer's outputs are the next layer's inputs
            _propagate(layer, hidden, kwargs, batch_size)
        layer_results = {prefix + name: qw for name, qw in results.items()}
        if sink is not None:
            sink(index, layer, layer_results)
        else:
            all_results.update(layer_results)
        source.release_layer(index, layer)
    return all_results
