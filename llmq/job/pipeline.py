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
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from llmq.algorithms.quant import QuantizedWeight
from llmq.arch import ArchSpec, get_layers, layer_linears, resolve_arch
from llmq.arch.experts import LayerExperts, experts_of, split_experts
from llmq.config import QuantConfig, Width
from llmq.job.distributed import SINGLE, Ranks, check_distributed
from llmq.job.methods import METHOD_FNS, LayerJob, check_finite, needs_teacher
from llmq.job.mixed import (
    Unit,
    allocate,
    check_budget,
    floor_bits,
    format_allocation,
    layer_sensitivity,
    linear_shapes,
    make_units,
    probed,
)
from llmq.utils.device import cast_tensors, compute_in, exact_float32, forward_dtype, resolve_device
from llmq.utils.killpoints import kill_point
from llmq.utils.timing import LayerProgress, StageTimes

log = logging.getLogger(__name__)

LayerResults = dict[str, QuantizedWeight]  # full module name -> quantized weight
Widths = dict[str, Width]  # full linear name -> its width, in a mixed-precision run
# the activation streams entering the next layer by name: "hidden" (the quantized model's), and "teacher" (the
# FP model's) for methods that tune against the FP layer
Activations = dict[str, torch.Tensor]
Sink = Callable[[int, nn.Module, LayerResults, Activations], None]


class LayerSource(Protocol):
    """Where each decoder layer's weights come from (the loaded model, or shards read lazily)."""

    def load_layer(self, index: int) -> nn.Module: ...

    def release_layer(self, index: int, layer: nn.Module) -> None: ...

    def after_capture(self, model: nn.Module) -> None:
        """The modules before the first layer (embedding) are not needed again."""


class InMemoryLayers:
    """Layers of a model already in (CPU) memory: moved to the device and back."""

    def __init__(self, model: nn.Module, spec: ArchSpec):
        self.layers = get_layers(model, spec)

    def load_layer(self, index: int) -> nn.Module:
        return self.layers[index]

    def release_layer(self, index: int, layer: nn.Module) -> None:
        layer.to("cpu")

    def after_capture(self, model: nn.Module) -> None:
        pass  # the model stays whole


def allocate_activations(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                         offload_dir: Path | None = None, name: str = "hidden") -> torch.Tensor:
    """An empty activation buffer on ``device``, or memory-mapped from a file in ``offload_dir``.

    A mapped buffer lives in the page cache: the OS writes it out and drops it under memory
    pressure, so calibration sets larger than RAM (or than GPU memory) still fit.
    """
    if offload_dir is None:
        return torch.empty(shape, dtype=dtype, device=device)
    offload_dir.mkdir(parents=True, exist_ok=True)
    path = offload_dir / f"{name}.bin"
    path.unlink(missing_ok=True)
    return torch.from_file(str(path), shared=True, size=math.prod(shape), dtype=dtype).view(shape)


class _StopForward(Exception):
    pass


class _Catcher(nn.Module):
    """Stands in for a decoder layer during capture: records its keyword arguments, passes its input on.

    Layer 0's stand-in also records the hidden states of every window; the first window runs on
    through every layer's stand-in, so each layer's own keyword arguments (a sliding-window or a
    full-attention mask, local or global rotary tables) are recorded. The forward stops after the
    last layer, so nothing after it (final norm, lm_head) runs.
    """

    def __init__(self, layer: nn.Module, index: int, last: bool, n: int,
                 alloc: Callable[[tuple[int, ...], torch.dtype], torch.Tensor] | None):
        super().__init__()
        self.layer = layer  # kept so attributes such as attention_type stay reachable
        self.index, self.last, self.n, self.alloc = index, last, n, alloc
        self.hidden: torch.Tensor | None = None
        self.shape: torch.Size | None = None
        self.count = 0
        self.kwargs: dict[str, Any] | None = None

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.layer, name)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args:
            raise RuntimeError("decoder layer called with positional arguments beyond hidden_states")
        if self.alloc is not None:  # layer 0
            if self.hidden is None:
                self.hidden = self.alloc((self.n, *hidden_states.shape[1:]), hidden_states.dtype)
            self.hidden[self.count : self.count + hidden_states.shape[0]] = hidden_states
            self.count += hidden_states.shape[0]
        if self.kwargs is not None:
            raise _StopForward  # every layer's arguments are known: later windows stop at layer 0
        self.kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value")}
        self.shape = hidden_states.shape
        if self.last:
            raise _StopForward
        return hidden_states


def capture_layer_inputs(
    model: nn.Module, spec: ArchSpec, input_ids: torch.Tensor, device: torch.device,
    offload_dir: Path | None = None,
) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """Hidden states ``[n, seqlen, hidden]`` entering layer 0, and each layer's keyword arguments.

    Runs only the modules before the first layer (embedding, rotary) on ``device``: windows go one
    at a time, so the captured kwargs (mask, positions) have batch 1 and broadcast over any batch.
    Layers whose attention differs (sliding and full attention in Gemma 2/3, Qwen2 ``layer_types``)
    each get their own; tensors shared by several layers are stored once. The hidden states are
    kept in the model's dtype, on ``device`` or mapped from ``offload_dir``.
    """
    layers = get_layers(model, spec)
    before = [model.get_submodule(name) for name in spec.before]
    for module in before:
        module.to(device)
    n = len(layers)
    catchers = [_Catcher(layers[i], i, i == n - 1, input_ids.shape[0],
                         (lambda shape, dtype: allocate_activations(shape, dtype, device, offload_dir)) if i == 0
                         else None) for i in range(n)]
    for i, catcher in enumerate(catchers):
        layers[i] = catcher
    try:
        with torch.no_grad():
            for row in input_ids:
                try:
                    model(input_ids=row[None].to(device), use_cache=False)
                except _StopForward:
                    pass
    finally:
        for i, catcher in enumerate(catchers):
            layers[i] = catcher.layer
        for module in before:
            module.to("cpu")
    missing = [c.index for c in catchers if c.kwargs is None]
    if missing:
        raise RuntimeError(f"decoder layers {missing} were never called: the model skips layers or calls them "
                           "outside its layer list, which llmq cannot capture")
    if any(c.shape != catchers[0].shape for c in catchers):
        raise RuntimeError("a decoder layer received another shape than layer 0 gave it: the model expects "
                           "layers to return something other than the hidden states tensor")
    return catchers[0].hidden, [c.kwargs for c in catchers]


def _layer_forward(layer: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _device_of(layer: nn.Module) -> torch.device:
    return next(layer.parameters()).device


def _observe(
    layer: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any], batch_size: int,
    modules: dict[str, nn.Linear], fn: Callable[[str, torch.Tensor], None], windows: int | None = None,
) -> None:
    """Run ``layer`` over ``hidden`` (its first ``windows`` rows, or all) in batches, calling ``fn(name, x)``
    with each listed module's input.

    Each batch stops as soon as every listed module has been reached (pre-hooks: the last one
    itself never runs); the rest of the layer is not needed.
    """
    stop = hidden.shape[0] if windows is None else min(windows, hidden.shape[0])
    pending: set[str] = set()
    device = _device_of(layer)

    def hook(name: str):
        def _hook(module: nn.Module, args: tuple) -> None:
            fn(name, args[0])  # the module's own input object (no_grad: nothing to detach), which the linears
            # sharing it receive too: SharedHessians tells them by it
            pending.discard(name)
            if not pending:
                raise _StopForward
        return _hook

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in modules.items()]
    try:
        with torch.no_grad():
            for i in range(0, stop, batch_size):
                pending.update(modules)
                try:
                    _layer_forward(layer, hidden[i : min(i + batch_size, stop)].to(device), kwargs)
                except _StopForward:
                    pass
    finally:
        for h in handles:
            h.remove()


def _propagate(layer: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any], batch_size: int,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """The layer's outputs for ``hidden``, batch by batch, into ``out`` (default: ``hidden``, in place)."""
    out = hidden if out is None else out
    device = _device_of(layer)
    with torch.no_grad():
        for i in range(0, hidden.shape[0], batch_size):
            y = _layer_forward(layer, hidden[i : i + batch_size].to(device), kwargs)
            out[i : i + batch_size] = y.to(out.device)
    return out


def _layer_groups(layer: nn.Module, spec: ArchSpec, config: Any, index: int,
                  keep_fp: Callable[[str, nn.Linear], bool] | None, check: bool = True
                  ) -> tuple[dict[str, nn.Linear], ...]:
    """Layer ``index``'s linears to quantize, by name in the layer, in true-sequential groups (weights checked
    unless ``check`` is false: a skeleton's shapes)."""
    prefix = f"{spec.layers}.{index}."
    linears = layer_linears(layer, spec, config, index)
    for name, module in linears.items():
        if check:
            check_finite(prefix + name, module.weight)
    if keep_fp is not None:
        linears = {name: m for name, m in linears.items() if not keep_fp(prefix + name, m)}
    return tuple(g for g in ({n: linears[n] for n in group if n in linears}
                             for group in spec.groups(config, index)) if g)


def skeleton_units(model: nn.Module, spec: ArchSpec, cfg: QuantConfig,
                   keep_fp: Callable[[str, nn.Linear], bool] | None) -> list[Unit]:
    """The mixed-precision units of every layer at ``cfg.widths``, from the model's shapes alone (its skeleton on
    the meta device will do): what the budget and the floor are checked against before any calibration."""
    return make_units([linear_shapes(g, f"{spec.layers}.{i}.") for i, layer in enumerate(get_layers(model, spec))
                       for g in _layer_groups(layer, spec, model.config, i, keep_fp, check=False)], cfg.widths)


def _output_error(layer: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any], batch_size: int,
                  reference: torch.Tensor) -> float:
    """The squared difference between the layer's outputs for ``hidden`` and ``reference``, summed."""
    err = 0.0
    with torch.no_grad():
        for i in range(0, hidden.shape[0], batch_size):
            y = _layer_forward(layer, hidden[i : i + batch_size].to(_device_of(layer)), kwargs)
            err += (y.float() - reference[i : i + batch_size].to(y.device).float()).pow(2).sum().item()
    return err


SENSITIVITY_WINDOWS = 32  # calibration windows the layer-output error of each candidate width is measured on
CARRIED_TOKENS = 2048  # tokens (whole windows, at least one) each layer's error is carried on to the model's output


def _final_error(carried: torch.Tensor, final: torch.Tensor) -> float:
    """The squared difference between two final hidden states, each token's divided by its FP mean square (what
    the final RMSNorm divides by), summed: the error the model's head sees."""
    f = final.float()
    scale = f.pow(2).mean(-1, keepdim=True).clamp_min(1e-12)
    return ((carried.float() - f).pow(2) / scale).sum().item()


def _allocate_widths(model: nn.Module, spec: ArchSpec, source: LayerSource, hidden: torch.Tensor,
                     layer_kwargs: list[dict[str, Any]], cfg: QuantConfig, device: torch.device, batch_size: int,
                     keep_fp: Callable[[str, nn.Linear], bool] | None, offload_dir: Path | None,
                     timer: StageTimes, work: torch.dtype) -> Widths:
    """Mixed precision (:mod:`llmq.job.mixed`): one pass of the FP model over the first calibration windows measuring
    each group's sensitivity at each of ``cfg.widths``, then the allocation within ``cfg.bits_per_weight``."""
    # the widths measured: those from the floor up (:func:`floor_bits`), found on the model's shapes
    skeleton = skeleton_units(model, spec, cfg, keep_fp)
    floor = floor_bits(skeleton, check_budget(skeleton, cfg))
    widths = tuple(w for w in cfg.widths if w.bits >= floor)
    log.info("mixed precision candidates: %s (none below %d bits, what every group could take within the budget)",
             ", ".join(map(str, widths)), floor)
    n = min(SENSITIVITY_WINDOWS, hidden.shape[0])  # only these windows are measured: only they are propagated
    stream = allocate_activations((n, *hidden.shape[1:]), hidden.dtype, hidden.device, offload_dir, "sensitivity")
    stream.copy_(hidden[:n])
    fp_outputs = torch.empty_like(stream)
    units, layer_of_unit = [], []
    m = min(max(1, CARRIED_TOKENS // hidden.shape[1]), n)  # a 7B model's 32 carried streams: 0.5 GB in bf16
    carried: list[torch.Tensor] = []  # per layer: the FP model's stream with that layer quantized, carried on
    local: list[float] = []  # the error each one had at its own layer's output
    for index in tqdm(range(len(get_layers(model, spec))), desc=f"sensitivity x {len(cfg.widths)} widths",
                      unit="layer"):
        with timer("load"):
            layer = source.load_layer(index).to(device)
            restore = compute_in(layer, hidden.dtype, work, leave=experts_of(layer))
        prefix = f"{spec.layers}.{index}."
        groups = _layer_groups(layer, spec, model.config, index, keep_fp)
        layer_units = make_units([linear_shapes(g, prefix) for g in groups], widths)
        kwargs = cast_tensors(layer_kwargs[index], hidden.dtype, work)
        with timer("propagate"):
            _propagate(layer, stream, kwargs, batch_size, out=fp_outputs)
        experts = LayerExperts(layer, spec, model.config, index) if spec.is_sparse(model.config, index) else None
        # the probes' statistics come from the same first windows as the error: a proxy, at a quarter of the cost
        job = LayerJob(index, prefix, groups, cfg, functools.partial(_observe, layer, stream, kwargs, batch_size),
                       layer=layer, kwargs=kwargs, batch_size=batch_size, timer=timer, windows=n,
                       seqlen=stream.shape[1], experts=experts, inputs=stream)
        with timer("sensitivity"):
            errors = layer_sensitivity(job, [tuple(u.costs) for u in layer_units],
                                       functools.partial(_output_error, layer, stream, kwargs, batch_size,
                                                         fp_outputs))
        for unit, err in zip(layer_units, errors, strict=True):
            unit.errors = err
        units += layer_units
        layer_of_unit += [len(carried)] * len(layer_units)
        with timer("sensitivity"):
            for c in carried:  # earlier layers' errors through this FP layer
                _propagate(layer, c, kwargs, batch_size)
            c = allocate_activations((m, *stream.shape[1:]), stream.dtype, stream.device, offload_dir,
                                     f"carried-{index}")
            probed(job, functools.partial(_propagate, layer, stream[:m], kwargs, batch_size, out=c))
            local.append((c.float() - fp_outputs[:m].float()).pow(2).sum().item())
            carried.append(c)
        with timer("propagate"):
            _propagate(layer, stream, kwargs, batch_size)
        restore()
        source.release_layer(index, layer)
        del job, experts, layer
    # the residual stream carries a layer's error to the output, but later layers amplify it or damp it: each layer's
    # sensitivities are scaled by how much of its own error (at the run's width) reached the final hidden state
    gains = [_final_error(c, stream[:m]) / e if e > 0 else 0.0 for c, e in zip(carried, local, strict=True)]
    log.info("sensitivity gain per layer (output error per unit of layer-output error): %s",
             ", ".join(f"{g:.4g}" for g in gains))
    for unit, i in zip(units, layer_of_unit, strict=True):
        unit.errors = {w: e * gains[i] for w, e in unit.errors.items()}
    del carried
    choice = allocate(units, check_budget(units, cfg))
    log.info("mixed precision within %.3f bits per weight:\n%s", cfg.bits_per_weight,
             format_allocation(units, choice))
    if offload_dir is not None:
        for name in ("sensitivity", *(f"carried-{i}" for i in range(len(local)))):
            (offload_dir / f"{name}.bin").unlink(missing_ok=True)
    return {name: width for unit, width in zip(units, choice, strict=True) for name in unit.linears}


def noted_widths(notes: dict[str, Any] | None) -> Widths:
    """The widths a mixed-precision run noted (``widths/<linear>``), e.g. in its resume state."""
    return {key.removeprefix("widths/"): Width(v["bits"], v["group_size"]) for key, v in (notes or {}).items()
            if key.startswith("widths/")}


@exact_float32()  # Hessians and solves in full float32 on CUDA too (TF32 off), as the reference GPTQ code
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
    start: int = 0,
    resume_hidden: Callable[[Activations], None] | None = None,
    offload_dir: Path | None = None,
    timer: StageTimes | None = None,
    notes: dict[str, Any] | None = None,
    spec: ArchSpec | None = None,
    widths: Widths | None = None,
    ranks: Ranks = SINGLE,
    work_dtype: torch.dtype | None = None,
    ggml_types: dict[str, str] | None = None,
) -> LayerResults:
    """Quantize every decoder layer's linears with ``cfg.method``; returns all quantized weights.

    ``spec``: the table entry (default: the model's, or one inferred from the in-memory model).

    ``input_ids`` ``[n, seqlen]`` are the calibration windows. ``source`` yields the layers
    (default: the model's own, in memory); ``sink(index, layer, results, activations)`` receives each
    finished layer and the next layer's inputs, and when one is given the results are not also
    kept (so memory stays at one layer's). Linears for which ``keep_fp(full_name, module)`` is true
    stay in full precision (e.g. shapes a format cannot hold). AWQ methods fill ``awq_record`` with
    their search results, or re-apply ``awq_state`` without searching.

    Resuming: ``start`` skips the layers before it, and ``resume_hidden(activations)`` fills the
    activation buffers with that layer's saved inputs. With ``offload_dir`` the activations are
    memory-mapped files there instead of tensors on ``device``.

    A method with ``needs_teacher`` also gets the FP layer's outputs on the FP model's inputs (``job.targets``):
    the FP stream runs beside the quantized one, one more activation buffer (``activations["teacher"]``).

    A mixture of experts' fused experts are split into linears first (:func:`llmq.arch.experts.split_experts`);
    ``notes`` collects what the methods note for the metadata (each expert's tokens and policy).

    Mixed precision: ``widths`` gives linears (by full name) another width than ``cfg``'s; with
    ``cfg.bits_per_weight`` and none given (nor noted in ``notes`` by the run being resumed), a first pass
    chooses them (:mod:`llmq.job.mixed`). They are noted as ``widths/<linear>``.

    torch.distributed (``ranks``, :mod:`llmq.job.distributed`): every rank passes all of ``input_ids`` and runs its
    share of the windows; the activations handed to ``sink`` and ``resume_hidden`` are that share.

    GGUF (``ggml_types``, by full linear name): those linears are rounded onto llama.cpp's grid of that type
    (:mod:`llmq.algorithms.ggml`), and their results are grids (:class:`~llmq.algorithms.ggml.GgmlGrid`).

    The model and the activations stay in their dtype; each layer computes in ``work_dtype`` (default:
    :func:`llmq.utils.device.forward_dtype`'s choice), cast up while it is worked on and back before the sink gets it.
    """
    check_distributed(cfg, ranks)
    input_ids = input_ids[ranks.windows(input_ids.shape[0])]
    spec = spec or resolve_arch(model)
    split_experts(model, spec)
    device = resolve_device(device)
    source = source or InMemoryLayers(model, spec)
    method = METHOD_FNS[cfg.method]
    n_layers = len(get_layers(model, spec))
    timer = timer or StageTimes()

    with timer("capture"):
        hidden, layer_kwargs = capture_layer_inputs(model, spec, input_ids, device, offload_dir)
        work = work_dtype or forward_dtype(hidden.dtype, device)
        activations = {"hidden": hidden}
        if needs_teacher(cfg.method):
            activations["teacher"] = allocate_activations(tuple(hidden.shape), hidden.dtype, hidden.device,
                                                          offload_dir, "teacher")
            activations["teacher"].copy_(hidden)
        source.after_capture(model)
    widths = widths or noted_widths(notes)
    if cfg.bits_per_weight is not None and not widths:
        if start:
            raise RuntimeError("a mixed-precision run resumed without the widths it chose: its state is damaged")
        widths = _allocate_widths(model, spec, source, hidden, layer_kwargs, cfg, device, batch_size, keep_fp,
                                  offload_dir, timer, work)
    if notes is not None:
        notes.update({f"widths/{name}": {"bits": w.bits, "group_size": w.group_size, "sym": w.sym}
                      for name, w in sorted(widths.items())})
    if start:
        resume_hidden(activations)
    log.info("captured %d calibration windows of %d tokens for %d layers; layer forwards in %s", *hidden.shape[:2],
             n_layers, str(work).removeprefix("torch."))
    fp_outputs = None
    if cfg.next_inputs == "fp":
        fp_outputs = allocate_activations(tuple(hidden.shape), hidden.dtype, hidden.device, offload_dir, "fp_outputs")

    all_results: LayerResults = {}
    progress = LayerProgress(n_layers, start, enabled=ranks.writes)
    for index in tqdm(range(start, n_layers), desc=f"{cfg.method} W{cfg.bits}", unit="layer",
                      initial=start, total=n_layers, disable=None if ranks.writes else True):
        with timer("load"):
            layer = source.load_layer(index).to(device)
            restore = compute_in(layer, hidden.dtype, work, leave=experts_of(layer))
        prefix = f"{spec.layers}.{index}."
        groups = _layer_groups(layer, spec, model.config, index, keep_fp)

        kwargs = cast_tensors(layer_kwargs[index], hidden.dtype, work)
        observe = functools.partial(_observe, layer, hidden, kwargs, batch_size)
        if fp_outputs is not None:
            with timer("propagate"):
                _propagate(layer, hidden, kwargs, batch_size, out=fp_outputs)
        teacher = activations.get("teacher")
        if teacher is not None:  # the FP layer's outputs on the FP model's inputs: the targets, and the next inputs
            with timer("propagate"):
                _propagate(layer, teacher, kwargs, batch_size)
        record = awq_record.__setitem__ if awq_record is not None else (lambda name, tensor: None)
        experts = LayerExperts(layer, spec, model.config, index) if spec.is_sparse(model.config, index) else None
        note = notes.__setitem__ if notes is not None else (lambda key, value: None)
        job = LayerJob(index, prefix, groups, cfg, observe, layer=layer, kwargs=kwargs,
                       scale_groups=spec.layer_scale_groups(model.config, index), batch_size=batch_size,
                       record=record, awq_state=awq_state, timer=timer, windows=hidden.shape[0],
                       seqlen=hidden.shape[1], experts=experts, note=note, inputs=hidden, targets=teacher,
                       widths={name: cfg.at(widths[prefix + name]) for g in groups for name in g
                               if prefix + name in widths}, ranks=ranks,
                       ggml_types={name: (ggml_types or {})[prefix + name] for g in groups for name in g
                                   if prefix + name in (ggml_types or {})})
        results = method(job)
        kill_point("layer.solved")
        with timer("propagate"):
            if fp_outputs is not None:
                hidden.copy_(fp_outputs)  # the AWQ reference feeds the next layer full-precision outputs
            else:  # the quantized layer's outputs are the next layer's inputs
                _propagate(layer, hidden, kwargs, batch_size)
        restore()
        # finished codes leave the compute device: a 7B model's uint8 codes are ~7 GB
        layer_results = {prefix + name: qw.to("cpu") for name, qw in results.items()}
        with timer("write"):
            if sink is not None:
                sink(index, layer, layer_results, activations)
            else:
                all_results.update(layer_results)
        source.release_layer(index, layer)
        progress.step(index, f"{cfg.method}" + "".join(
            f", {k} {v:.4g}" if isinstance(v, float) else f", {k} {v}" for k, v in job.summary.items()))
        # streamed, this layer's codes are written: drop them now, not when the next layer's job replaces
        # them (a Qwen3-30B-A3B layer's uint8 codes are 604 MB, held through the next layer's load and observe)
        del results, layer_results, job, experts
    return all_results
