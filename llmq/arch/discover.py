"""The table entry of a decoder whose ``model_type`` has none, inferred from the model itself.

GPTQ and RTN need to know only where the decoder layers are and their linears in true-sequential
groups. The layer list is the model's ``nn.ModuleList`` of ``num_hidden_layers`` identical layers;
the groups come from running layer 0 once with a forward pre-hook on each of its ``nn.Linear``s:
linears that read the same input tensor form one group (their Hessian is one), and groups are
ordered by their first call, so each group's input depends only on the groups before it (the
GPTQ paper's true-sequential order, Section 4). AWQ needs more than the model shows (which norm
or linear produced each group's input, so that a scale can fold into it): a table entry.
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn

from llmq.arch.spec import ArchSpec
from llmq.arch.table import ARCHITECTURES
from llmq.errors import UnsupportedArchitectureError

log = logging.getLogger(__name__)

_TABLE_HINT = (f"name a table entry with the same layout (--arch NAME; entries: {', '.join(sorted(ARCHITECTURES))}) "
               "or add one in llmq/arch/table.py")

# activations above this in layer 0 leave too little headroom under float16's 65504 deeper in the model
_FP16_HEADROOM = 1e4


class _StopForward(Exception):
    pass


def find_layers(model: nn.Module) -> str:
    """Dotted path of the decoder-layer list: a ``ModuleList`` of ``num_hidden_layers`` layers of one class
    holding ``nn.Linear``s (the outermost such list; a multimodal model's vision encoder has another length)."""
    n = getattr(model.config.get_text_config(), "num_hidden_layers", None)
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)
             and len({type(c) for c in m}) == 1]
    lists = [(name, m) for name, m in lists if not any(name.startswith(o + ".") for o, _ in lists)]
    with_linears = [name for name, m in lists if len(m) == n and _linear_names(m[0])]
    exact = with_linears or [name for name, m in lists if len(m) == n]  # the second: refused for want of linears
    if len(exact) == 1:
        return exact[0]
    found = ", ".join(f"{name} ({len(m)})" for name, m in lists) or "none"
    raise UnsupportedArchitectureError(
        f"cannot tell which module list holds the {n} decoder layers of this {model.config.model_type!r} model "
        f"(lists of one layer class: {found}): {_TABLE_HINT}")


def infer_layout(model: nn.Module) -> ArchSpec:
    """Where the layers are and what runs before and after them; no groups yet (see :func:`discover_groups`).

    Every module beside the path to the layers runs before them, except the output embeddings (the final
    norm is loaded with the embedding: it is small, and nothing decides here on which side it runs)."""
    layers = find_layers(model)
    head = model.get_output_embeddings()
    parts = layers.split(".")
    before, after = [], []
    for depth in range(len(parts)):
        parent = ".".join(parts[:depth])
        for child, module in model.get_submodule(parent).named_children():
            name = f"{parent}.{child}" if parent else child
            if child == parts[depth]:
                continue
            (after if module is head else before).append(name)
    layer_list = model.get_submodule(layers)
    for i, layer in enumerate(layer_list):
        fused = [n for n, p in layer.named_parameters() if p.dim() > 2]
        if fused:
            raise UnsupportedArchitectureError(
                f"decoder layer {i} holds {len(fused)} tensors of more than two dimensions ({fused[0]}, ...): fused "
                "mixture-of-experts weights, which need a table entry with a MoESpec: " + _TABLE_HINT)
    names = [_linear_names(layer) for layer in layer_list]
    if not names[0]:
        kinds = sorted({type(m).__name__ for m in layer_list[0].modules() if m is not layer_list[0]})
        raise UnsupportedArchitectureError(
            f"the decoder layers of this {model.config.model_type!r} model hold no nn.Linear (they hold "
            f"{', '.join(kinds)}), so there is nothing llmq can quantize: " + _TABLE_HINT)
    for i, n in enumerate(names):
        if n != names[0]:
            raise UnsupportedArchitectureError(
                f"decoder layer {i} has other linears than layer 0 ({sorted(set(n) ^ set(names[0]))[:3]}): a hybrid "
                "layout needs a table entry: " + _TABLE_HINT)
    return ArchSpec(layers=layers, sequential=(), before=tuple(before), after=tuple(after))


def _linear_names(layer: nn.Module) -> list[str]:
    return [name for name, m in layer.named_modules() if isinstance(m, nn.Linear)]


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``a`` and ``b`` are one tensor, or views of the same memory with the same values (a reshape)."""
    return a is b or (a.dtype == b.dtype and a.numel() == b.numel() and a.is_contiguous() and b.is_contiguous()
                      and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
                      and a.storage_offset() == b.storage_offset())


@torch.no_grad()
def discover_groups(model: nn.Module, layout: ArchSpec, input_ids: torch.Tensor,
                    ) -> tuple[tuple[tuple[str, ...], ...], float]:
    """Layer 0's linears in true-sequential groups, and the largest activation they read.

    Runs the model on ``input_ids`` up to the end of layer 0 (the modules before the layers and layer 0 must
    hold real weights). A linear that runs more than once per layer cannot be given one Hessian: an error.
    """
    layer = model.get_submodule(layout.layers)[0]
    calls: list[tuple[str, torch.Tensor]] = []

    def record(name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            calls.append((name, args[0] if args else kwargs["input"]))
        return hook

    def stop(module: nn.Module, args: tuple, output: object) -> None:
        raise _StopForward

    hooks = [m.register_forward_pre_hook(record(name), with_kwargs=True)
             for name, m in layer.named_modules() if isinstance(m, nn.Linear)]
    hooks.append(layer.register_forward_hook(stop))
    try:
        model(input_ids=input_ids, use_cache=False)
    except _StopForward:
        pass
    finally:
        for h in hooks:
            h.remove()

    groups: list[list[str]] = []
    inputs: list[torch.Tensor] = []
    seen: set[str] = set()
    for name, x in calls:
        if name in seen:
            raise UnsupportedArchitectureError(
                f"{layout.layers}.0.{name} runs more than once per layer, so one Hessian cannot describe its "
                "inputs: this layout needs a table entry: " + _TABLE_HINT)
        seen.add(name)
        for group, y in zip(groups, inputs, strict=True):
            if _same_tensor(x, y):
                group.append(name)
                break
        else:
            groups.append([name])
            inputs.append(x)
    idle = [n for n in _linear_names(layer) if n not in seen]
    if idle:
        log.warning("%s never ran in layer 0 on the sample input: left in full precision", ", ".join(idle))
    largest = max((float(x.detach().abs().max()) for x in inputs), default=0.0)
    return tuple(tuple(g) for g in groups), largest


def discover_arch(model: nn.Module, layout: ArchSpec | None = None) -> ArchSpec:
    """The inferred entry (layout and groups) of ``model``, whose modules before the layers and layer 0 hold
    real weights; it has no AWQ scale groups. ``layout``: :func:`infer_layout` of the model, if known."""
    layout = layout or infer_layout(model)
    embed = model.get_input_embeddings()
    device = embed.weight.device if embed is not None else torch.device("cpu")
    vocab = model.config.get_text_config().vocab_size
    input_ids = (torch.arange(1, 33) % vocab)[None].to(device)  # a sample: what the groups are does not depend on it
    groups, largest = discover_groups(model, layout, input_ids)
    fp16_ok = largest < _FP16_HEADROOM
    log.info("model_type %r has no table entry; inferred from the model: decoder layers %s, true-sequential "
             "groups %s%s", model.config.model_type, layout.layers, " | ".join(", ".join(g) for g in groups),
             "" if fp16_ok else f"; activations of {largest:.3g} in layer 0: stored and run in bfloat16")
    return ArchSpec(layers=layout.layers, sequential=groups, before=layout.before, after=layout.after,
                    fp16_ok=fp16_ok)
