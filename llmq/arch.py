"""Per-architecture knowledge as data: one small entry per ``model_type``.

An entry says where the decoder layers are, which modules run before the first layer and after
the last (the pipeline needs them to capture inputs; the streaming reader loads just those), and
the true-sequential groups of linears: each group is quantized on inputs that already went
through the quantized groups before it (GPTQ paper, Section 4, "true sequential").
Anything not named in ``sequential`` (embeddings, lm_head, norms) is never quantized.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from .errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class ScaleGroup:
    """Where an AWQ scale folds: ``linears`` read ``prev``'s output (AWQ, Lin et al. 2024, Sec. 3.2).

    The linears' input columns are multiplied by ``s`` and ``prev``'s output channels divided by it
    (a norm's weight and bias, or a linear's output rows), which leaves the function unchanged.
    ``inspect`` is the module whose output the scale search compares (default: the one linear).
    """

    prev: str
    linears: tuple[str, ...]
    inspect: str | None = None


@dataclass(frozen=True)
class ArchSpec:
    layers: str  # dotted path of the nn.ModuleList of decoder layers
    sequential: tuple[tuple[str, ...], ...]  # linears inside a layer, in true-sequential groups
    before: tuple[str, ...]  # modules run before the first layer (embedding, rotary)
    after: tuple[str, ...]  # modules run after the last layer (final norm, lm_head)
    scale_groups: tuple[ScaleGroup, ...] = ()  # AWQ: where each activation-aware scale folds

    @property
    def linears(self) -> tuple[str, ...]:
        return tuple(name for group in self.sequential for name in group)


# LLaMA-style decoder: pre-norm attention then a gated MLP. q/k/v read the same normed input,
# o reads the attention output, gate/up read the same normed input, down reads act(gate) * up.
LLAMA = ArchSpec(
    layers="model.layers",
    sequential=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    ),
    before=("model.embed_tokens", "model.rotary_emb"),
    after=("model.norm", "lm_head"),
    scale_groups=(
        ScaleGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                   inspect="self_attn"),
        # v -> o folds per output row of v; under grouped-query attention v has fewer rows than o has
        # input columns, and the group is skipped (as in the AWQ reference)
        ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",)),
        ScaleGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), inspect="mlp"),
        # up -> down: down reads act(gate) * up, linear in up's output
        ScaleGroup("mlp.up_proj", ("mlp.down_proj",)),
    ),
)

ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": LLAMA,
    "mistral": LLAMA,  # LLaMA layout with sliding-window attention (a mask matter, not a weight one)
    "qwen2": LLAMA,  # LLaMA layout with biases on q/k/v (kept in full precision beside the codes)
    "qwen3": LLAMA,  # LLaMA layout with RMSNorm on q and k per head (norms are never quantized)
}


def get_arch(model_type: str) -> ArchSpec:
    """The entry for ``model_type``, or an error listing the supported ones."""
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"model_type {model_type!r} is not supported; supported: {', '.join(sorted(ARCHITECTURES))}. "
            "Adding one is a small entry in llmq/arch.py."
        ) from None


def get_layers(model: nn.Module, spec: ArchSpec) -> nn.ModuleList:
    return model.get_submodule(spec.layers)


def layer_linears(layer: nn.Module, spec: ArchSpec) -> dict[str, nn.Linear]:
    """The quantizable linears of one decoder layer, by their name in the table."""
    found = {}
    for name in spec.linears:
        module = layer.get_submodule(name)
        if not isinstance(module, nn.Linear):
            raise UnsupportedArchitectureError(f"{name} is a {type(module).__name__}, expected nn.Linear")
        found[name] = module
    return found
