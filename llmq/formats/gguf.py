"""GGUF, llama.cpp's single-file format: write a transformers model as llama.cpp's converter would, read one back.

:func:`write_gguf` produces what ``convert_hf_to_gguf.py`` (llama.cpp, the version llama-cpp-python 0.3.36 vendors)
makes of the same model: the common hyper-parameters (``TextModel.set_gguf_parameters``) plus the family's own, as
its :class:`~llmq.arch.spec.GgufSpec` in ``llmq/arch/table.py`` lists them, the tokenizer (``llmq.formats.gguf_vocab``),
tensors under llama.cpp's names (``gguf.get_tensor_name_map``), q/k rows permuted for LLaMA-rope families
(``LlamaModel.permute``), Gemma's norms shifted by one, MoE experts stacked into ``blk.N.ffn_{gate,up,down}_exps``
``[n_expert, rows, cols]``, no ``output.weight`` when the embeddings are tied, and 1-D tensors, norms, biases and MoE
routers in F32. Each tensor's type comes from ``tensor_types``: one type for every weight matrix (the converter's
``--outtype``), a llama-quantize preset (:func:`tensor_types_for`), or a per-tensor dict; the bytes come from
``encode`` (default: plain casts, and ``gguf.quants.quantize`` for the quantized types it implements).

The file also holds the model's transformers config (key ``llmq.hf_config``, which llama.cpp ignores), so
:func:`read_gguf` / :func:`load_gguf_model` rebuild the same transformers model; files from elsewhere are read with
the config transformers derives from their metadata.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
import torch.nn as nn

from llmq.arch import ARCHITECTURES, ArchSpec
from llmq.arch.spec import GgufKey, GgufSpec
from llmq.errors import CheckpointError, ConfigError
from llmq.formats.gguf_presets import PRESETS, ModelFacts, fallback, preset_types
from llmq.formats.gguf_vocab import add_tokenizer

log = logging.getLogger(__name__)

T = gguf.GGMLQuantizationType
CONFIG_KEY = "llmq.hf_config"  # the transformers config, JSON (llama.cpp ignores keys it does not know)
# the source tokenizer's files, JSON {file name: text}: llmq reads a file back with the very tokenizer it was
# quantized and evaluated with (transformers' GGUF tokenizer conversion adds tokens, e.g. GPT-2's <|endoftext|>)
TOKENIZER_KEY = "llmq.hf_tokenizer"

# encode(name, weight, type) -> (bytes as a numpy array, the type written): weight is float32 on the CPU, in the
# layout written (q/k rows permuted, experts stacked), torch order [..., rows, columns]
Encoder = Callable[[str, torch.Tensor, str], tuple[np.ndarray, Any]]


# ----------------------------------------------------------------------------------------------------------------------
# the architecture's entry and its hyper-parameters


def gguf_spec(config: Any) -> tuple[ArchSpec, GgufSpec]:
    """The table entry of ``config.model_type`` and its GGUF part, or a ConfigError naming what is missing."""
    model_type = getattr(config, "model_type", None)
    arch = ARCHITECTURES.get(model_type)
    if arch is None or arch.gguf is None:
        have = sorted(k for k, v in ARCHITECTURES.items() if v.gguf is not None)
        raise ConfigError(f"GGUF export has no entry for model_type {model_type!r}; supported: {', '.join(have)}. "
                          "Adding one is a GgufSpec on its entry in llmq/arch/table.py (see conversion/*.py in "
                          "llama.cpp for the family's keys and tensor changes)")
    return arch, arch.gguf


def hparams(config: Any) -> dict[str, Any]:
    """The converter's view of the config (``self.hparams``): the config's dict (less the entry's ``ignore``) with a
    multimodal model's ``text_config`` lifted to the top, the rope parameters mirrored as ``TextModel.__init__``
    does, and the derived values the table's keys name: ``rope_theta``, ``rope_theta_swa``,
    ``original_max_position_embeddings``, ``head_dim_or_default`` (head_dim, else hidden / heads),
    ``rope_dims_partial`` (Phi-3's ``int(partial_rotary_factor * hidden) // heads``)."""
    h = config.to_dict()
    if isinstance(h.get("text_config"), dict):
        h = {**h, **h["text_config"]}
    for name in gguf_spec(config)[1].ignore:
        h.pop(name, None)
    rope = dict(h.get("rope_parameters") or h.get("rope_scaling") or {})
    full = rope.get("full_attention", rope)
    theta = full.get("rope_theta", h.get("rope_theta", h.get("rotary_emb_base")))
    local = rope.get("sliding_attention", {}).get("rope_theta",
                                                  h.get("rope_local_base_freq", h.get("local_rope_theta")))
    heads, hidden = h.get("num_attention_heads"), h.get("hidden_size")
    partial = full.get("partial_rotary_factor", h.get("partial_rotary_factor", 1.0))
    original = full.get("original_max_position_embeddings", h.get("original_max_position_embeddings"))
    derived = {
        "rope_parameters_flat": full,
        "rope_theta": theta,
        "rope_theta_swa": local,
        "original_max_position_embeddings": original,
        "head_dim_or_default": h.get("head_dim") or (hidden // heads if hidden and heads else None),
        "rope_dims_partial": int(partial * hidden) // heads if hidden and heads else None,
        "longrope_attn_factor": _longrope_attn_factor(full, h.get("max_position_embeddings"), original),
    }
    return {**h, **derived}


def _longrope_attn_factor(rope: Mapping[str, Any], n_ctx: int | None, original: int | None) -> float | None:
    """Phi3MiniModel.generate_extra_tensors' attention factor of a LongRoPE (or YaRN) model with long factors:
    ``sqrt(1 + ln(scale) / ln(original))`` (YaRN: ``0.1 ln(scale) + 1``), 1 when not extended; None without."""
    if not rope.get("long_factor") or not n_ctx or not original:
        return None
    scale = n_ctx / original
    if scale <= 1.0:
        return 1.0
    kind = str(rope.get("rope_type", rope.get("type", ""))).lower()
    return 0.1 * math.log(scale) + 1.0 if kind == "yarn" else math.sqrt(1 + math.log(scale) / math.log(original))


def _find(h: Mapping[str, Any], keys: Sequence[str]) -> Any:
    """ModelBase.find_hparam(optional=True): the first of ``keys`` present (even when None)."""
    return next((h[k] for k in keys if k in h), None)


def _common_keys(gw: gguf.GGUFWriter, h: Mapping[str, Any]) -> None:
    """TextModel.set_gguf_parameters: the hyper-parameters every family writes (where the config has them)."""
    gw.add_block_count(h["num_hidden_layers"])
    if (n_ctx := _find(h, ["max_position_embeddings", "n_ctx", "n_positions", "max_length", "max_sequence_length",
                           "model_max_length"])) is not None:
        gw.add_context_length(n_ctx)
    if (n_embd := _find(h, ["hidden_size", "n_embd", "dim"])) is not None:
        gw.add_embedding_length(n_embd)
    if (n_ff := _find(h, ["prefix_dense_intermediate_size", "dense_intermediate_size", "intermediate_size",
                          "n_inner", "hidden_dim"])) is not None:
        gw.add_feed_forward_length(n_ff)
    if (n_head := _find(h, ["num_attention_heads", "n_head", "n_heads"])) is not None:
        gw.add_head_count(n_head)
    if (n_head_kv := _find(h, ["num_key_value_heads", "n_kv_heads"])) is not None:
        gw.add_head_count_kv(n_head_kv)
    if h.get("is_causal") is False:
        gw.add_causal_attention(False)
    _rope_scaling(gw, h["rope_parameters_flat"])
    if h["rope_theta"] is not None:
        gw.add_rope_freq_base(h["rope_theta"])
    if h["rope_theta_swa"] is not None:
        gw.add_rope_freq_base_swa(h["rope_theta_swa"])
    if (eps := _find(h, ["rms_norm_eps", "norm_eps"])) is not None:
        gw.add_layer_norm_rms_eps(eps)
    if (eps := _find(h, ["layer_norm_eps", "layer_norm_epsilon", "norm_epsilon"])) is not None:
        gw.add_layer_norm_eps(eps)
    if (n := _find(h, ["num_local_experts", "num_experts", "n_routed_experts"])) is not None:
        gw.add_expert_count(n)
    if (n := _find(h, ["num_experts_per_tok", "num_experts_per_token", "top_k_experts"])) is not None:
        gw.add_expert_used_count(n)
    if (n := h.get("n_group")) is not None:
        gw.add_expert_group_count(n)
    if (n := h.get("topk_group")) is not None:
        gw.add_expert_group_used_count(n)
    if (func := _find(h, ["score_function", "scoring_func", "score_func"])) is not None:
        gating = {"sigmoid": gguf.ExpertGatingFuncType.SIGMOID, "softmax": gguf.ExpertGatingFuncType.SOFTMAX}
        if func not in gating:
            raise ConfigError(f"llama.cpp has no expert gating function {func!r}")
        gw.add_expert_gating_func(gating[func])
    if (head_dim := h.get("head_dim")) is not None:
        gw.add_key_length(head_dim)
        gw.add_value_length(head_dim)


def _rope_scaling(gw: gguf.GGUFWriter, rope: Mapping[str, Any]) -> None:
    """The rope scaling part of TextModel.set_gguf_parameters (linear, YaRN, LongRoPE; Llama 3's is the
    ``rope_freqs`` tensor instead)."""
    rope_type, factor = rope.get("rope_type", rope.get("type")), rope.get("factor")
    if rope_type == "linear" and factor is not None:
        gw.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        gw.add_rope_scaling_factor(factor)
    elif rope_type == "yarn" and factor is not None:
        gw.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        gw.add_rope_scaling_factor(factor)
        gw.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        for key, add in (("extrapolation_factor", gw.add_rope_scaling_yarn_ext_factor),
                         ("beta_fast", gw.add_rope_scaling_yarn_beta_fast),
                         ("beta_slow", gw.add_rope_scaling_yarn_beta_slow)):
            if rope.get(key) is not None:
                add(rope[key])
        if (attn := rope.get("attention_factor", rope.get("attn_factor"))) is not None:
            gw.add_rope_scaling_yarn_attn_factor(attn)
    elif rope_type in ("su", "longrope"):
        gw.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)


_KINDS = {"u32": gguf.GGUFValueType.UINT32, "i32": gguf.GGUFValueType.INT32, "f32": gguf.GGUFValueType.FLOAT32,
          "bool": gguf.GGUFValueType.BOOL, "str": gguf.GGUFValueType.STRING}


def _add_key(gw: gguf.GGUFWriter, key: GgufKey, h: Mapping[str, Any]) -> None:
    """One of the family's own keys (a table entry): its constant, else its source's value, else its default."""
    if key.when is not None and h.get(key.when[0]) != key.when[1]:
        return
    value = key.value
    if value is None and key.source is not None:
        value = _find(h, (key.source,) if isinstance(key.source, str) else key.source)
    if value is None:
        value = key.default
    if value is None:
        return
    name = key.key.format(arch=gw.arch)
    if key.kind == "bool[]":
        entry = gguf.GGUFValue([bool(v) for v in value], gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.BOOL)
    else:
        cast = {"f32": float, "u32": int, "i32": int, "bool": bool, "str": str}[key.kind]
        entry = gguf.GGUFValue(cast(value), _KINDS[key.kind])
    gw.kv_data[0][name] = entry  # an override (OLMoE's eps) keeps the common key's place, as the converter's does


# ----------------------------------------------------------------------------------------------------------------------
# tensors: which Hugging Face tensors make each GGUF tensor, and how


@dataclass(frozen=True)
class _Entry:
    """One GGUF tensor: made from ``sources`` (several: the experts stacked along a new first axis), or half of one
    (``part`` 0/1 of a fused ``gate_up_proj [E, 2I, H]``), its rows permuted for rope (``heads``: the head count of
    LlamaModel.permute) and ``offset`` added (Gemma's norms). ``shape``: the GGUF tensor's, torch order."""

    name: str
    sources: tuple[str, ...]
    shape: tuple[int, ...]
    part: int | None = None
    heads: int = 0
    offset: float = 0.0
    stack: bool = False


def permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """LlamaModel.permute: each head's rows from transformers' rotate-half order (first halves, then second halves of
    the rotary pairs) to llama.cpp's interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of :func:`permute`."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tied(config: Any) -> bool:
    return bool(getattr(config.get_text_config(), "tie_word_embeddings", getattr(config, "tie_word_embeddings", False)))


def _canonical(name: str, arch: ArchSpec) -> tuple[str, str | None, int | None, int | None]:
    """A state-dict name in the spelling gguf's TensorNameMap knows (``model.layers.N.``), and, for an expert
    tensor, which of gate/up/down/gate_up it is, its expert index (split experts) and layer."""
    layers = arch.layers
    if name.startswith(layers + "."):
        rest = name[len(layers) + 1:]
        layer, _, inner = rest.partition(".")
        name = f"model.layers.{rest}"
        if arch.moe is not None:
            prefix = f"{arch.moe.block}.{arch.moe.experts}."
            if inner.startswith(prefix):
                parts = inner[len(prefix):].split(".")
                n = arch.moe.names
                kinds = {n.gate: "gate", n.up: "up", n.down: "down", "gate_up_proj": "gate_up", "down_proj": "down"}
                if len(parts) == 1:  # transformers' fused experts: gate_up_proj / down_proj [E, ...]
                    return name, kinds.get(parts[0]), None, int(layer)
                if len(parts) == 3 and parts[0].isdigit():  # llmq's split experts: experts.{e}.{gate}.weight
                    return name, kinds.get(parts[1]), int(parts[0]), int(layer)
    return name, None, None, None


def tensor_plan(shapes: Mapping[str, Sequence[int]], config: Any) -> list[_Entry]:
    """Every GGUF tensor of a model whose state dict has ``shapes`` (name -> shape), in state-dict order (stacked
    experts where their first tensor is), as the family's converter class names and transforms them."""
    arch, spec = gguf_spec(config)
    h = hparams(config)
    tmap = gguf.get_tensor_name_map(_model_arch(spec), h["num_hidden_layers"])
    tied = _tied(config)
    entries: list[_Entry] = []
    experts: dict[tuple[int, str], list[tuple[int, str]]] = {}  # (layer, kind) -> [(expert, name)] of split experts
    for name, shape in shapes.items():
        shape = tuple(int(s) for s in shape)
        if name.endswith("rotary_emb.inv_freq") or (tied and name == "lm_head.weight"):
            continue  # a buffer the converter skips; the tied output is token_embd itself
        canon, kind, expert, layer = _canonical(name, arch)
        if kind is None:
            entries.append(_plain(name, canon, shape, spec, h, tmap))
        elif expert is None:
            entries.extend(_fused_experts(name, kind, layer, shape, tmap))
        else:  # one expert's linear: stacked with the layer's others of its kind, where the first one is
            group = experts.setdefault((layer, kind), [])
            if not group:
                entries.append(_Entry(f"\0{layer}.{kind}", (), shape))  # a placeholder keeping the place
            group.append((expert, name))
    return [_stacked(e, experts, tmap) if e.name.startswith("\0") else e for e in entries]


def _plain(name: str, canon: str, shape: tuple[int, ...], spec: GgufSpec, h: Mapping[str, Any],
           tmap: gguf.TensorNameMap) -> _Entry:
    """A tensor that maps to one GGUF tensor: renamed, q/k rows permuted (LlamaModel.modify_tensors, weights and
    biases), norms offset (Gemma)."""
    heads = 0
    if spec.permute_qk and canon.endswith(("q_proj.weight", "q_proj.bias")):
        heads = h["num_attention_heads"]
    elif spec.permute_qk and canon.endswith(("k_proj.weight", "k_proj.bias")):
        heads = h.get("num_key_value_heads") or h["num_attention_heads"]
    offset = spec.norm_offset if canon.endswith("norm.weight") else 0.0
    return _Entry(_gguf_name(tmap, canon), (name,), shape, heads=heads, offset=offset)


def _fused_experts(name: str, kind: str, layer: int, shape: tuple[int, ...], tmap: gguf.TensorNameMap) -> list[_Entry]:
    """transformers' fused experts: ``gate_up_proj [E, 2I, H]`` is split into the gate and up halves
    (Qwen2MoeModel.modify_tensors), ``down_proj [E, H, I]`` kept whole."""
    if kind == "down":
        return [_Entry(_gguf_name(tmap, f"model.layers.{layer}.mlp.experts.down_proj.weight"), (name,), shape)]
    half = (shape[0], shape[1] // 2, shape[2])
    return [_Entry(_gguf_name(tmap, f"model.layers.{layer}.mlp.experts.{which}_proj.weight"), (name,), half, part=part)
            for part, which in ((0, "gate"), (1, "up"))]


def _stacked(placeholder: _Entry, experts: Mapping[tuple[int, str], list[tuple[int, str]]],
             tmap: gguf.TensorNameMap) -> _Entry:
    """The stacked tensor of one layer's split experts of one kind (ModelBase's ``_experts`` merging)."""
    layer, kind = placeholder.name[1:].split(".")
    group = sorted(experts[(int(layer), kind)])
    if [e for e, _ in group] != list(range(len(group))):
        raise ConfigError(f"layer {layer}'s {kind} experts are not numbered 0..{len(group) - 1}")
    name = _gguf_name(tmap, f"model.layers.{layer}.mlp.experts.{kind}_proj.weight")
    return _Entry(name, tuple(n for _, n in group), (len(group), *placeholder.shape), stack=True)


def _gguf_name(tmap: gguf.TensorNameMap, name: str) -> str:
    new = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
    if new is None:
        raise ConfigError(f"llama.cpp's architecture has no tensor for {name}: the model has a tensor its GGUF entry "
                          "(llmq/arch/table.py) does not account for")
    return new


def _model_arch(spec: GgufSpec) -> gguf.MODEL_ARCH:
    try:
        return next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == spec.arch)
    except StopIteration:
        raise ConfigError(f"the installed gguf package knows no architecture {spec.arch!r}") from None


def _gather(entry: _Entry, state: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The GGUF tensor of ``entry`` from the model's tensors, in float32."""
    if entry.stack:
        t = torch.stack([state[s].detach().float() for s in entry.sources])
    else:
        t = state[entry.sources[0]].detach().float()
    if entry.part is not None:
        t = t.chunk(2, dim=-2)[entry.part]
    if entry.heads:
        t = permute(t, entry.heads)
    if entry.offset:
        t = t + entry.offset
    return t.contiguous().cpu()


def _generated(spec: GgufSpec, h: Mapping[str, Any]) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors the converter makes from the config (``generate_extra_tensors``)."""
    rope = h["rope_parameters_flat"]
    if "rope_freqs" in spec.extra_tensors and str(rope.get("rope_type", "")).lower() == "llama3":
        yield "rope_freqs.weight", _llama3_rope_factors(rope, h)
    if "rope_factors" in spec.extra_tensors and rope.get("long_factor"):
        # Phi3MiniModel.generate_extra_tensors (LongRoPE, the 128k models)
        yield "rope_factors_long.weight", torch.tensor(rope["long_factor"], dtype=torch.float32)
        yield "rope_factors_short.weight", torch.tensor(rope["short_factor"], dtype=torch.float32)


def _llama3_rope_factors(rope: Mapping[str, Any], h: Mapping[str, Any]) -> torch.Tensor:
    """LlamaModel.generate_extra_tensors: Llama 3.1's per-frequency rope scaling as llama.cpp's rope_freqs."""
    base, dim = rope.get("rope_theta", 10000.0), h["head_dim_or_default"]
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old = rope.get("original_max_position_embeddings", 8192)
    factors = []
    for freq in freqs:  # 0-d float32 tensors, as the converter computes (float32 arithmetic, not Python's doubles)
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            factors.append(1)
        elif wavelen > old / low:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------------------------------
# tensor types


# the converter's forced-F32 tensors (ModelBase.prepare_tensors): routers and positional tables, besides 1-D tensors,
# norms and anything not ending in .weight
_F32_PARTS = ("ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight", "position_embd.weight", "token_types.weight")


def must_be_f32(name: str, shape: Sequence[int]) -> bool:
    """Whether llama.cpp needs ``name`` in F32 (ModelBase.prepare_tensors: 1-D tensors, norms, biases, MoE routers)."""
    return len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight") or \
        any(name.endswith(p) for p in _F32_PARTS)


def _ggml_type(name: str) -> T:
    try:
        return T[name.upper()]
    except KeyError:
        raise ConfigError(f"unknown ggml type {name!r}; use F32, F16, BF16, Q8_0, a llama.cpp quant type "
                          f"(Q4_K, ...) or a preset ({', '.join(PRESETS)})") from None


def _resolve_types(shapes: Mapping[str, Sequence[int]], tensor_types: Mapping[str, str] | str,
                   facts: ModelFacts) -> tuple[dict[str, T], gguf.LlamaFileType]:
    """Every GGUF tensor's type and the file's ``general.file_type`` from ``write_gguf``'s ``tensor_types``."""
    if isinstance(tensor_types, str) and tensor_types.upper() in PRESETS:
        types = preset_types(shapes, tensor_types, facts)
        return {n: T[t] for n, t in types.items()}, PRESETS[tensor_types.upper()]
    if isinstance(tensor_types, str):
        one = _ggml_type(tensor_types)
        # the converter's --outtype: every weight matrix, else F32; a row length the block does not divide falls back
        types = {n: T.F32 if must_be_f32(n, s) else fallback(int(s[-1]), one) for n, s in shapes.items()}
        return types, _file_type(types)
    unknown = sorted(set(tensor_types) - set(shapes))
    if unknown:
        raise ConfigError(f"tensor_types names tensors the GGUF file does not have: {unknown[:5]}; "
                          "names are llama.cpp's (blk.0.attn_q.weight), as tensor_types_for returns them")
    types = {n: _ggml_type(tensor_types.get(n, "F32")) for n in shapes}
    for n, t in types.items():
        if t != T.F32 and must_be_f32(n, shapes[n]):
            raise ConfigError(f"{n} must stay F32 in llama.cpp (1-D tensors, norms, biases, routers); got {t.name}")
        if int(shapes[n][-1]) % gguf.GGML_QUANT_SIZES[t][0]:
            raise ConfigError(f"{n}'s rows of {shapes[n][-1]} weights do not split into {t.name} blocks of "
                              f"{gguf.GGML_QUANT_SIZES[t][0]}; tensor_types_for picks llama.cpp's fallback type")
    return types, _file_type(types)


def _file_type(types: Mapping[str, T]) -> gguf.LlamaFileType:
    """general.file_type for a mix of types: the commonest type among the weight matrices (``MOSTLY_<type>``)."""
    counts = Counter(t for t in types.values() if t != T.F32)
    if not counts:
        return gguf.LlamaFileType.ALL_F32
    commonest = max(sorted(counts, key=lambda t: t.value), key=lambda t: counts[t])
    return gguf.LlamaFileType.__members__.get(f"MOSTLY_{commonest.name}", gguf.LlamaFileType.GUESSED)


# what default_encode can write: casts, and the types gguf.quants.quantize implements
DEFAULT_ENCODABLE = (T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1)


def default_encode(name: str, weight: torch.Tensor, ggml_type: str) -> tuple[np.ndarray, T]:
    """F32/F16 casts, and ``gguf.quants.quantize`` for BF16 and the quantized types gguf-py implements (Q8_0,
    Q4_0/1, Q5_0/1); the K-quants and IQ4_NL need an encoder (``encode=``), e.g. llmq's own."""
    t = _ggml_type(ggml_type)
    _check_encodable({name: t})
    array = weight.detach().to(torch.float32).cpu().numpy()
    if t == T.F32:
        return array, t
    if t == T.F16:
        return array.astype(np.float16), t
    return gguf.quants.quantize(array, t), t


def _check_encodable(types: Mapping[str, T]) -> None:
    bad = {n: t for n, t in types.items() if t not in DEFAULT_ENCODABLE}
    if bad:
        name, t = next(iter(bad.items()))
        kinds = sorted({t.name for t in bad.values()})
        raise ConfigError(f"gguf-py cannot encode {', '.join(kinds)} ({len(bad)} tensors, e.g. {name}); pass encode= "
                          "(llmq's GGML encoders), or write F32/F16 and run llama-quantize")


def _nbytes(shape: Sequence[int], t: T) -> int:
    block, size = gguf.GGML_QUANT_SIZES[t]
    return math.prod(shape[:-1]) * (int(shape[-1]) // block) * size


# ----------------------------------------------------------------------------------------------------------------------
# the public API


def model_facts(config: Any) -> ModelFacts:
    """What llama-quantize's type choice reads from the model's hyper-parameters."""
    _, spec = gguf_spec(config)
    h = hparams(config)
    n_expert = _find(h, ["num_local_experts", "num_experts", "n_routed_experts"]) or 0
    return ModelFacts(arch=spec.arch, n_layer=h["num_hidden_layers"], n_head=h["num_attention_heads"],
                      n_head_kv=h.get("num_key_value_heads") or h["num_attention_heads"], n_expert=int(n_expert))


def gguf_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """The GGUF tensors ``model`` would be written as: llama.cpp name -> shape (torch order)."""
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    out = {e.name: e.shape for e in tensor_plan(shapes, model.config)}
    h = hparams(model.config)
    _, spec = gguf_spec(model.config)
    out.update({name: tuple(t.shape) for name, t in _generated(spec, h)})
    return out


def tensor_types_for(model_or_shapes: nn.Module | Mapping[str, Sequence[int]] | str | os.PathLike, preset: str,
                     facts: ModelFacts | None = None) -> dict[str, str]:
    """llama-quantize's per-tensor type for ``preset`` (``Q4_K_M`` ...): GGUF tensor name -> ggml type name.

    ``model_or_shapes``: a transformers model (its GGUF tensors, as :func:`write_gguf` names them), a GGUF file
    (its tensors and hyper-parameters, as llama-quantize reads them), or a dict of GGUF names -> shapes in torch
    order with ``facts`` (architecture, layer and head counts). Tensors llama-quantize keeps as they are get F32
    (what llmq writes them in; for a file: their type there).
    """
    if isinstance(model_or_shapes, nn.Module):
        return preset_types(gguf_shapes(model_or_shapes), preset, model_facts(model_or_shapes.config))
    if isinstance(model_or_shapes, (str, os.PathLike)):
        shapes, file_facts, current = _file_shapes(Path(model_or_shapes))
        return preset_types(shapes, preset, facts or file_facts, current)
    if facts is None:
        raise ConfigError("tensor_types_for on a dict of shapes needs facts= (ModelFacts: arch, n_layer, n_head, "
                          "n_head_kv, n_expert)")
    return preset_types(model_or_shapes, preset, facts)


def _file_shapes(path: Path) -> tuple[dict[str, tuple[int, ...]], ModelFacts, dict[str, str]]:
    """A GGUF file's tensors (torch-order shapes), the facts llama-quantize reads and the tensors' types."""
    reader = gguf.GGUFReader(path)
    meta = _metadata(reader)
    arch = meta["general.architecture"]
    n_head = meta[f"{arch}.attention.head_count"]
    facts = ModelFacts(arch=arch, n_layer=meta[f"{arch}.block_count"], n_head=n_head,
                       n_head_kv=meta.get(f"{arch}.attention.head_count_kv", n_head),
                       n_expert=meta.get(f"{arch}.expert_count", 0))
    shapes = {t.name: tuple(int(s) for s in reversed(t.shape.tolist())) for t in reader.tensors}
    return shapes, facts, {t.name: t.tensor_type.name for t in reader.tensors}


def build_writer(model: nn.Module, tokenizer: Any, tensor_types: Mapping[str, str] | str = "F32",
                 tokenizer_pre: str | None = None) -> tuple[gguf.GGUFWriter, list[tuple[str, Any, T]]]:
    """A GGUFWriter holding ``model``'s metadata and tensor infos (no file yet), and what to write: ``(name, source,
    type)`` per tensor, the source an :class:`_Entry` or a generated tensor."""
    config = model.config
    _, spec = gguf_spec(config)
    h = hparams(config)
    state = model.state_dict()
    entries = tensor_plan({k: tuple(v.shape) for k, v in state.items()}, config)
    generated = list(_generated(spec, h))
    shapes = {name: tuple(t.shape) for name, t in generated} | {e.name: e.shape for e in entries}
    types, file_type = _resolve_types(shapes, tensor_types, model_facts(config))

    gw = gguf.GGUFWriter(path=None, arch=spec.arch)
    # the tensors go first so the size label counts them (ModelBase.prepare_metadata)
    todo: list[tuple[str, Any, T]] = [(n, t, types[n]) for n, t in generated] + [(e.name, e, types[e.name])
                                                                                 for e in entries]
    for name, _, t in todo:
        gw.add_tensor_info(name, shapes[name], np.dtype(np.float32), _nbytes(shapes[name], t), raw_dtype=t)
    _add_metadata(gw, config, tokenizer, file_type, tokenizer_pre)
    return gw, todo


def _add_metadata(gw: gguf.GGUFWriter, config: Any, tokenizer: Any, file_type: gguf.LlamaFileType,
                  tokenizer_pre: str | None) -> None:
    """Every key, in the converter's order: general.*, the common hyper-parameters, the file type, the tokenizer, the
    family's own keys, the quantization version; and llmq's copy of the config."""
    _, spec = gguf_spec(config)
    h = hparams(config)
    gw.add_type(gguf.GGUFType.MODEL)
    if name := _model_name(config):
        gw.add_name(name)
    total, shared, expert, n_expert = gw.get_total_parameter_count()
    if total > 0:
        gw.add_size_label(gguf.size_label(total, shared, expert, n_expert))
    if spec.common:
        _common_keys(gw, h)
    gw.add_file_type(file_type)
    tokenizer_config = add_tokenizer(gw, tokenizer, config, tokenizer_pre)
    h = {**h, **{f"tokenizer_config.{k}": v for k, v in tokenizer_config.items()}}
    for key in spec.keys:
        _add_key(gw, key, h)
    gw.add_quantization_version(gguf.GGML_QUANT_VERSION)
    gw.add_string(CONFIG_KEY, config.to_json_string(use_diff=True))
    if files := _tokenizer_files(tokenizer):
        gw.add_string(TOKENIZER_KEY, json.dumps(files, sort_keys=True))


def _tokenizer_files(tokenizer: Any) -> dict[str, str]:
    """The files ``tokenizer.save_pretrained`` writes, by name (text files only)."""
    import tempfile

    if not hasattr(tokenizer, "save_pretrained"):
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return {p.name: p.read_text(encoding="utf-8") for p in sorted(Path(tmp).iterdir())
                if p.suffix in (".json", ".jinja", ".txt")}


def load_gguf_tokenizer(path: str | os.PathLike) -> Any:
    """The tokenizer of a GGUF file: the source tokenizer llmq stored in it, else transformers' conversion of the
    file's own tokenizer metadata."""
    import tempfile

    from transformers import AutoTokenizer

    path = Path(path)
    field = gguf.GGUFReader(path).get_field(TOKENIZER_KEY)
    if field is None:
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    files = json.loads(field.contents())
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in files.items():
            (Path(tmp) / name).write_text(text, encoding="utf-8")
        return AutoTokenizer.from_pretrained(tmp)


def gguf_metadata(config: Any, tokenizer: Any, file_type: str = "F32",
                  tokenizer_pre: str | None = None) -> dict[str, Any]:
    """The key/values :func:`write_gguf` writes for a model of ``config`` (no tensors, so no size label), as Python
    values. ``file_type``: a preset or a type name."""
    name = file_type.upper()
    ft = PRESETS.get(name) or (gguf.LlamaFileType.ALL_F32 if name == "F32" else gguf.LlamaFileType[f"MOSTLY_{name}"])
    gw = gguf.GGUFWriter(path=None, arch=gguf_spec(config)[1].arch)
    _add_metadata(gw, config, tokenizer, ft, tokenizer_pre)
    return {k: v.value for k, v in gw.kv_data[0].items()}


def _model_name(config: Any) -> str:
    """general.name: the model's folder or hub name, as the converter's fallback (the folder's name); none for a model
    made from a config (llama.cpp reads meaning into names: one containing "phi3" gets Phi-3's special tokens)."""
    return Path(str(getattr(config, "_name_or_path", "") or "")).name


def write_gguf(model: nn.Module, tokenizer: Any, path: str | os.PathLike, tensor_types: Mapping[str, str] | str = "F32",
               encode: Encoder | None = None, tokenizer_pre: str | None = None) -> Path:
    """Write ``model`` (a transformers causal LM with float weights) and ``tokenizer`` as ONE GGUF file llama.cpp
    loads, atomically (a temporary file renamed into place; an interrupted write leaves no ``path``).

    ``tensor_types``: ``"F32"``/``"F16"``/``"BF16"``/``"Q8_0"`` for every weight matrix (the converter's
    ``--outtype``), a llama-quantize preset (``"Q4_K_M"``: :func:`tensor_types_for`'s choice), or a dict GGUF name ->
    type (absent tensors: F32). 1-D tensors, norms, biases and MoE routers are always F32. ``encode(name, weight,
    type) -> (array, type)`` turns each float32 weight (in GGUF layout, torch order) into the bytes of its type
    (default :func:`default_encode`). ``tokenizer_pre``: llama.cpp's pre-tokenizer name, for a tokenizer whose hash
    llama.cpp does not list. The same inputs give the same bytes.

    Example::

        from llmq.formats.gguf import write_gguf
        write_gguf(model, tokenizer, "model-f16.gguf", "F16")
    """
    path = Path(path)
    gw, todo = build_writer(model, tokenizer, tensor_types, tokenizer_pre)
    if encode is None:
        _check_encodable({name: t for name, _, t in todo})  # before anything is written
        encode = default_encode
    state = model.state_dict()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        gw.write_header_to_file(path=tmp)
        gw.write_kv_data_to_file()
        gw.write_ti_data_to_file()
        for name, source, t in todo:
            weight = source if isinstance(source, torch.Tensor) else _gather(source, state)
            data, written = encode(name, weight, t.name)
            _check_encoded(name, data, written, t, weight.shape)
            gw.write_tensor_data(np.ascontiguousarray(data))
        gw.close()
        os.replace(tmp, path)
    except BaseException:
        gw.close()
        tmp.unlink(missing_ok=True)
        raise
    log.info("wrote %s: %d tensors", path, len(todo))
    return path


def _check_encoded(name: str, data: np.ndarray, written: Any, t: T, shape: Sequence[int]) -> None:
    """The encoder kept to the type and size the header already announced."""
    written = T[written] if isinstance(written, str) else T(written)
    if written != t:
        raise ConfigError(f"encode returned {written.name} for {name}, which the file declares {t.name}")
    if data.nbytes != _nbytes(shape, t):
        raise ConfigError(f"encode returned {data.nbytes} bytes for {name}; {t.name} {tuple(shape)} takes "
                          f"{_nbytes(shape, t)}")


# ----------------------------------------------------------------------------------------------------------------------
# reading


def _metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
    """The file's key/values as Python values (the header's GGUF.* fields left out)."""
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def gguf_config(path: str | os.PathLike, meta: Mapping[str, Any] | None = None) -> Any:
    """The transformers config of a GGUF file: the one llmq stored, else the one transformers derives from the
    llama.cpp metadata (``transformers.modeling_gguf_pytorch_utils``)."""
    from transformers import AutoConfig

    if meta is None:
        meta = _metadata(gguf.GGUFReader(path))
    if CONFIG_KEY in meta:
        d = json.loads(meta[CONFIG_KEY])
        return AutoConfig.for_model(d.pop("model_type"), **d)
    path = Path(path)
    return AutoConfig.from_pretrained(path.parent, gguf_file=path.name)


def read_gguf(path: str | os.PathLike, config: Any = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A GGUF file's metadata and its tensors under transformers' state-dict names, in float32: dequantized
    (``gguf.quants.dequantize``), the q/k permutation and norm offsets undone, stacked experts in the layout of
    ``config``'s model (fused ``gate_up_proj`` / ``down_proj``), a tied ``lm_head.weight`` the embedding itself.
    ``config``: the model's (default: the stored one, :func:`gguf_config`). Tensors the converter generates (rope
    factors) are left out."""
    reader = gguf.GGUFReader(path)
    meta = _metadata(reader)
    config = config or gguf_config(path, meta)
    stored = {t.name: t for t in reader.tensors}
    shapes = _state_shapes(config)
    entries = tensor_plan(shapes, config)
    missing = [e.name for e in entries if e.name not in stored]
    if missing:
        raise CheckpointError(f"{path} lacks tensors a {config.model_type} model of this config has: {missing[:5]}")
    out: dict[str, torch.Tensor] = {}
    halves: dict[str, dict[int, torch.Tensor]] = {}
    for e in entries:
        t = _dequantized(stored[e.name], e.shape)
        if e.offset:
            t = t - e.offset
        if e.heads:
            t = unpermute(t, e.heads)
        if e.part is not None:
            halves.setdefault(e.sources[0], {})[e.part] = t
        elif e.stack:
            for i, s in enumerate(e.sources):
                out[s] = t[i].clone()
        else:
            out[e.sources[0]] = t
    for name, parts in halves.items():
        out[name] = torch.cat([parts[0], parts[1]], dim=-2)
    embedding = next((e.sources[0] for e in entries if e.name == "token_embd.weight"), None)
    if _tied(config) and "lm_head.weight" in shapes and embedding is not None:
        out["lm_head.weight"] = out[embedding]  # the tied output is the embedding (no output.weight in the file)
    return meta, {k: out[k] for k in shapes if k in out}


def _dequantized(tensor: Any, shape: Sequence[int]) -> torch.Tensor:
    """One stored tensor as float32 in torch order."""
    from llmq.algorithms.ggml import GGML_TYPES
    from llmq.algorithms.ggml import dequantize as ggml_dequantize

    data = np.asarray(tensor.data)
    if tensor.tensor_type.name in GGML_TYPES:  # llmq's decoder: vectorised, and bit-exact with gguf-py's (tested)
        cols = int(shape[-1])
        return ggml_dequantize(data.reshape(-1), tensor.tensor_type.name, (math.prod(shape) // cols, cols)).reshape(
            tuple(shape))
    array = data if tensor.tensor_type == T.F32 else gguf.quants.dequantize(data, tensor.tensor_type)
    return torch.from_numpy(np.array(array, dtype=np.float32).reshape(tuple(shape)))


def _state_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    """The state-dict names and shapes of ``config``'s causal LM (built on the meta device: nothing allocated)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def load_gguf_model(path: str | os.PathLike, config: Any = None, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A transformers causal LM with a GGUF file's weights (dequantized to ``dtype``), for ``llmq ppl`` / ``llmq
    info``: :func:`read_gguf` into a model of ``config`` (default: the stored one)."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    meta, state = read_gguf(path, config)
    config = config or gguf_config(path, meta)
    with no_init_weights():  # every weight comes from the file
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and _tied(config))]
    if missing or unexpected:
        raise CheckpointError(f"{path} does not fit a {config.model_type} model of this config: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    if _tied(config):
        model.tie_weights()
    return model.eval()


# ----------------------------------------------------------------------------------------------------------------------
# llmq's own rounding in the file


def linear_types(model: nn.Module, preset: str) -> dict[str, str]:
    """The llama.cpp type ``preset`` gives each decoder-layer linear, by module name (``model.layers.3.mlp.down_proj``):
    what the job rounds each onto (:mod:`llmq.algorithms.ggml_gptq`). Tensors the preset keeps in float, and those
    outside the decoder layers (``token_embd``, ``output``), are not listed: the writer encodes them from the
    model's weights. A mixture of experts' experts must be split into linears first
    (:func:`llmq.arch.experts.split_experts`), as the job splits them."""
    arch, _ = gguf_spec(model.config)
    types = tensor_types_for(model, preset)
    out = {}
    for entry in tensor_plan(_state_shapes_of(model), model.config):
        t = types.get(entry.name, "F32")
        if _ggml_type(t) in FLOAT_TYPES:
            continue
        if entry.part is not None:
            raise ConfigError(f"{entry.sources[0]} holds fused experts: split them (llmq.arch.experts.split_experts) "
                              "before choosing the linears' GGUF types")
        for source in entry.sources:
            if source.startswith(arch.layers + ".") and source.endswith(".weight"):
                out[source.removesuffix(".weight")] = t
    return out


FLOAT_TYPES = (T.F32, T.F16, T.BF16)


def _state_shapes_of(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _row_order(rows: int, heads: int) -> torch.Tensor:
    """Where each written row comes from under LlamaModel.permute: the same reordering applied to row indices."""
    return permute(torch.arange(rows, dtype=torch.float64)[:, None], heads)[:, 0].long()


def grid_encoder(model: nn.Module, results: Mapping[str, Any]) -> Encoder:
    """The ``encode`` hook that writes llmq's rounding: a tensor whose sources are all in ``results`` (module name ->
    :class:`~llmq.algorithms.ggml.GgmlGrid`) is written as those grids' own bytes (rows permuted and experts stacked
    as the writer lays out the weights), so the file decodes to exactly the weights llmq evaluated; any other
    quantized tensor (token_embd, output) is rounded by :func:`llmq.algorithms.ggml.quantize` (llama.cpp's weighted
    scale search, its default weighting), and float ones are cast."""
    from llmq.algorithms.ggml import GgmlGrid, encode, ggml_spec
    from llmq.algorithms.ggml import quantize as ggml_quantize

    entries = {e.name: e for e in tensor_plan(_state_shapes_of(model), model.config)}

    def encode_tensor(name: str, weight: torch.Tensor, ggml_type: str) -> tuple[np.ndarray, T]:
        t = _ggml_type(ggml_type)
        entry = entries[name]
        grids = [results.get(s.removesuffix(".weight")) for s in entry.sources]
        if grids and all(isinstance(g, GgmlGrid) for g in grids):
            if any(ggml_spec(g.type).type_id != int(t) for g in grids):
                raise CheckpointError(f"{name} is declared {t.name} but llmq rounded it onto "
                                      f"{sorted({g.type for g in grids})}")
            rows = [encode(g) for g in grids]
            if entry.heads:
                rows = [r[_row_order(r.shape[0], entry.heads).numpy()] for r in rows]
            return (np.stack(rows) if entry.stack else rows[0]), t
        if any(isinstance(g, GgmlGrid) for g in grids):
            raise CheckpointError(f"{name}: only some of its sources were rounded by llmq")
        if t in FLOAT_TYPES:
            return default_encode(name, weight, ggml_type)
        flat = weight.reshape(-1, weight.shape[-1])
        data = ggml_quantize(flat, ggml_type)
        return data.reshape(*weight.shape[:-1], data.shape[-1]), t

    return encode_tensor


GGUF_METHODS = ("rtn", "gptq")  # the methods whose rounding reaches llama.cpp's grids so far


def check_gguf_settings(gguf_type: str | None, method: str, bits_per_weight: float | None, e2e_steps: int) -> str:
    """Refuse, before any work, a GGUF job llmq cannot run yet; returns the preset or type to use (default
    ``Q4_K_M``, llama.cpp's most used preset)."""
    from llmq.algorithms.ggml import GGML_TYPES

    choice = (gguf_type or "Q4_K_M").upper()
    if choice not in PRESETS and choice not in GGML_TYPES:
        raise ConfigError(f"gguf_type {gguf_type!r} is neither a llama-quantize preset ({', '.join(PRESETS)}) nor a "
                          f"llama.cpp type llmq rounds onto ({', '.join(GGML_TYPES)})")
    if method not in GGUF_METHODS:
        raise ConfigError(f"--format gguf rounds with {' or '.join(GGUF_METHODS)} so far, not {method!r}: use "
                          "--method gptq (or rtn), or write the GPTQ layout (--format auto)")
    if bits_per_weight is not None or e2e_steps:
        raise ConfigError("--format gguf does not take --bits-per-weight or --e2e-steps yet: choose a preset "
                          "(--gguf-type Q4_K_M, Q3_K_M, ...) and --method gptq")
    return choice
