"""Per-architecture knowledge as data: one small entry per ``model_type`` (``table``), in the vocabulary of ``spec``.

An entry says where the decoder layers are, which modules run before the first layer and after
the last (the pipeline needs them to capture inputs; the streaming reader loads just those), and
the true-sequential groups of linears: each group is quantized on inputs that already went
through the quantized groups before it (GPTQ paper, Section 4, "true sequential"). A mixture of
experts adds where its MoE block is (``MoESpec``); ``experts`` turns its fused experts into linears.
Anything not named in a layer's groups (embeddings, lm_head, norms, routers) is never quantized.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from ..errors import UnsupportedArchitectureError
from .spec import ArchSpec, ExpertNames, MoESpec, Rows, ScaleGroup, SparseLayers
from .table import ARCHITECTURES

__all__ = ["ARCHITECTURES", "ArchSpec", "ExpertNames", "MoESpec", "Rows", "ScaleGroup", "SparseLayers", "get_arch",
           "get_layers", "layer_linears"]


def get_arch(model_type: str) -> ArchSpec:
    """The entry for ``model_type``, or an error listing the supported ones."""
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"model_type {model_type!r} is not supported; supported: {', '.join(sorted(ARCHITECTURES))}. "
            "Adding one is a small entry in llmq/arch/table.py."
        ) from None


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
