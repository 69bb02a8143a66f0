"""Per-architecture knowledge as data: one small entry per ``model_type`` (``table``), in the vocabulary of ``spec``.

An entry says where the decoder layers are, which modules run before the first layer and after
the last (the pipeline needs them to capture inputs; the streaming reader loads just those), and
the true-sequential groups of linears: each group is quantized on inputs that already went
through the quantized groups before it (GPTQ paper, Section 4, "true sequential"). A mixture of
experts adds where its MoE block is (``MoESpec``); ``experts`` turns its fused experts into linears.
Anything not named in a layer's groups (embeddings, lm_head, norms, routers) is never quantized.
A dense decoder without an entry gets one inferred from the model itself (``discover``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.nn as nn

from llmq.arch.discover import discover_arch
from llmq.arch.spec import ArchSpec, ExpertNames, MoESpec, Rows, ScaleGroup, SparseLayers
from llmq.arch.table import ARCHITECTURES
from llmq.errors import UnsupportedArchitectureError

__all__ = ["ARCHITECTURES", "ArchSpec", "ExpertNames", "MoESpec", "Rows", "ScaleGroup", "SparseLayers", "arch_for",
           "discover_arch", "disk_namer", "get_arch", "get_layers", "layer_linears", "model_namer", "resolve_arch"]


def get_arch(model_type: str) -> ArchSpec:
    """The entry for ``model_type``, or an error listing the supported ones."""
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"model_type {model_type!r} is not supported; supported: {', '.join(sorted(ARCHITECTURES))}. "
            "Adding one is a small entry in llmq/arch/table.py."
        ) from None


def arch_for(model_type: str, arch: str | None = None) -> ArchSpec | None:
    """The entry named ``arch`` (for a ``model_type`` sharing another's layout), else ``model_type``'s own, else
    None: a model to infer the entry of (:func:`resolve_arch`)."""
    return get_arch(arch) if arch is not None else ARCHITECTURES.get(model_type)


def resolve_arch(model: nn.Module, arch: str | None = None) -> ArchSpec:
    """``model``'s entry: from the table, or inferred from the model (which then needs real weights in its
    modules before the layers and in layer 0; see :func:`llmq.arch.discover.discover_arch`)."""
    return arch_for(model.config.model_type, arch) or discover_arch(model)


def _renamings(model: nn.Module, saving: bool) -> list:
    """transformers' own renames between checkpoint names and module names (GPT-NeoX's ``embed_out`` is the
    module ``lm_head``): the ``WeightRenaming``s of its conversion mapping, reversed for saving, as
    ``save_pretrained`` does. Its converters (fused experts) are llmq's own business (``experts``)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import PrefixChange, WeightRenaming

    transforms = [t for t in get_model_conversion_mapping(model, add_legacy=not saving)
                  if not isinstance(t, PrefixChange)]
    if saving:
        transforms = [t.reverse_transform() for t in transforms[::-1]]
    return [t for t in transforms if isinstance(t, WeightRenaming)]


def disk_namer(model: nn.Module, spec: ArchSpec | None = None) -> Callable[[str], str]:
    """A tensor's name in ``model`` -> its name in checkpoints, as transformers saves them (and the table's
    ``to_disk`` for per-expert tensors): what the streaming reader reads and every writer writes."""
    from transformers.core_model_loading import apply_renamings

    renamings = _renamings(model, saving=True)
    to_disk = spec.to_disk if spec is not None else (lambda key: key)
    return (lambda key: apply_renamings(to_disk(key), renamings)) if renamings else to_disk


def model_namer(model: nn.Module, spec: ArchSpec | None = None) -> Callable[[str], str]:
    """The inverse of :func:`disk_namer`: a checkpoint's tensor name -> its name in ``model``."""
    from transformers.core_model_loading import apply_renamings

    renamings = _renamings(model, saving=False)
    from_disk = spec.from_disk if spec is not None else (lambda key: key)
    return (lambda key: from_disk(apply_renamings(key, renamings))) if renamings else from_disk


def get_layers(model: nn.Module, spec: ArchSpec) -> nn.ModuleList:
    return model.get_submodule(spec.layers)


def layer_linears(layer: nn.Module, spec: ArchSpec, config: Any = None, index: int = 0) -> dict[str, nn.Linear]:
    """The quantizable linears of decoder layer ``index``, by their name in the layer (``config``: the
    model's, which says which layers of a mixture of experts are sparse)."""
    found = {}
    names = [n for g in spec.groups(config, index) for n in g]
    for name in names:
        try:
            module = layer.get_submodule(name)
        except AttributeError:
            raise UnsupportedArchitectureError(
                f"layer {index} has no module {name}, which the table for this model_type names"
                + (": are the MoE experts split into linears (llmq.arch.experts.split_experts)?" if spec.moe else "")
            ) from None
        if not isinstance(module, nn.Linear):
            raise UnsupportedArchitectureError(f"{name} is a {type(module).__name__}, expected nn.Linear")
        found[name] = module
    return found
