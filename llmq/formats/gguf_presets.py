"""llama-quantize's per-tensor type choice for its presets (``Q4_K_M`` ...), ported from llama.cpp's
``src/llama-quant.cpp`` (the version llama-cpp-python 0.3.36 vendors).

A preset (a ``llama_ftype``) names a default type (``llama_ftype_get_default_type``); each tensor then gets that type
or another one by its category, its layer and the model's shape (``llama_tensor_get_type_impl``), and a type whose
block does not divide the tensor's rows is replaced (``tensor_type_fallback``). The port covers the branches the
presets below reach without an importance matrix: the imatrix-only branches (``IQ3_XXS``'s ffn_down, ``Q4_0``/``Q5_0``'s
first ffn_down layers, ``IQ4_NL``'s ffn_down when an imatrix *is* given) are marked where they sit, and the presets
that require an imatrix (IQ1/IQ2/IQ3_XXS, Q2_K_S) are not offered. Command-line overrides (``--tensor-type``,
``--output-tensor-type``, ``--token-embedding-type``, ``--pure``) are not modelled: the defaults apply.

Names are llama.cpp's (``blk.3.attn_v.weight``); shapes are in torch order (``[..., rows, columns]``): the
column count is ggml's ``ne[0]``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import gguf

from llmq.errors import ConfigError

T = gguf.GGMLQuantizationType
FT = gguf.LlamaFileType

# the presets: llama-quantize's name -> llama_ftype (llama.h); the default type is llama_ftype_get_default_type's
PRESETS: dict[str, FT] = {
    "Q8_0": FT.MOSTLY_Q8_0,
    "Q6_K": FT.MOSTLY_Q6_K,
    "Q5_K_M": FT.MOSTLY_Q5_K_M,
    "Q5_K_S": FT.MOSTLY_Q5_K_S,
    "Q5_1": FT.MOSTLY_Q5_1,
    "Q5_0": FT.MOSTLY_Q5_0,
    "Q4_K_M": FT.MOSTLY_Q4_K_M,
    "Q4_K_S": FT.MOSTLY_Q4_K_S,
    "Q4_1": FT.MOSTLY_Q4_1,
    "Q4_0": FT.MOSTLY_Q4_0,
    "IQ4_NL": FT.MOSTLY_IQ4_NL,
    "Q3_K_L": FT.MOSTLY_Q3_K_L,
    "Q3_K_M": FT.MOSTLY_Q3_K_M,
    "Q3_K_S": FT.MOSTLY_Q3_K_S,
    "Q2_K": FT.MOSTLY_Q2_K,
}

# llama_ftype_get_default_type
DEFAULT_TYPE: dict[FT, T] = {
    FT.MOSTLY_Q8_0: T.Q8_0, FT.MOSTLY_Q6_K: T.Q6_K,
    FT.MOSTLY_Q5_K_M: T.Q5_K, FT.MOSTLY_Q5_K_S: T.Q5_K, FT.MOSTLY_Q5_1: T.Q5_1, FT.MOSTLY_Q5_0: T.Q5_0,
    FT.MOSTLY_Q4_K_M: T.Q4_K, FT.MOSTLY_Q4_K_S: T.Q4_K, FT.MOSTLY_Q4_1: T.Q4_1, FT.MOSTLY_Q4_0: T.Q4_0,
    FT.MOSTLY_IQ4_NL: T.IQ4_NL,
    FT.MOSTLY_Q3_K_L: T.Q3_K, FT.MOSTLY_Q3_K_M: T.Q3_K, FT.MOSTLY_Q3_K_S: T.Q3_K,
    FT.MOSTLY_Q2_K: T.Q2_K,
}

# tensor_type_fallback: a 256-weight type whose block does not divide the row length -> a 32-weight one
FALLBACK: dict[T, T] = {
    T.IQ1_S: T.IQ4_NL, T.IQ1_M: T.IQ4_NL, T.IQ2_XXS: T.IQ4_NL, T.IQ2_XS: T.IQ4_NL, T.IQ2_S: T.IQ4_NL,
    T.IQ3_XXS: T.IQ4_NL, T.IQ3_S: T.IQ4_NL, T.IQ4_XS: T.IQ4_NL,
    T.Q2_K: T.Q4_0, T.Q3_K: T.Q4_0, T.TQ1_0: T.Q4_0, T.TQ2_0: T.Q4_0,
    T.Q4_K: T.Q5_0,
    T.Q5_K: T.Q5_1,
    T.Q6_K: T.Q8_0,
}

# tensor_allows_quantization: substrings of names never quantized (the subset that can occur in the architectures
# llmq writes, plus the generic ones), besides norms, 1-D tensors and names not ending in "weight"
_NEVER_QUANTIZED = ("ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel", "per_layer_model_proj",
                    "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight", "indexer.q_proj.weight",
                    "attn_rel_b.weight", ".position_embd", ".rel_pos", ".patch_embd", ".patch_merger")
_NEVER_QUANTIZED_EXACT = ("position_embd.weight", "token_types.weight")  # LLM_TENSOR_POS_EMBD, TOKEN_TYPES


@dataclass(frozen=True)
class ModelFacts:
    """What ``llama_tensor_get_type_impl`` reads from the model besides the tensors: llama.cpp's architecture name,
    the layer count (``n_layer_all``), head counts of layer 0 (``n_gqa() = n_head / n_head_kv``) and the expert
    count (``hparams.n_expert``)."""

    arch: str
    n_layer: int
    n_head: int
    n_head_kv: int
    n_expert: int = 0

    @property
    def n_gqa(self) -> int:
        return self.n_head // self.n_head_kv if self.n_head_kv else 0

    @property
    def is_70b(self) -> bool:
        """``model.type == LLM_TYPE_70B``, as the per-architecture loaders set it (src/models/llama.cpp, qwen2.cpp,
        olmo.cpp, deci.cpp: 80 layers; LLaMA's only with grouped-query attention)."""
        if self.n_layer != 80:
            return False
        return self.arch in ("qwen2", "olmo", "deci") or (self.arch == "llama" and self.n_head != self.n_head_kv)


@dataclass
class _State:
    """quantize_state_impl's counters: the attention-v tensors seen so far and in all, the FFN tensors per kind."""

    n_attention_wv: int = 0
    i_attention_wv: int = 0
    n_ffn_down: int = 0
    i_ffn_down: int = 0
    n_ffn_gate: int = 0
    i_ffn_gate: int = 0
    n_ffn_up: int = 0
    i_ffn_up: int = 0
    has_tied_embeddings: bool = True


def category(name: str) -> str:
    """tensor_get_category: a broad role from the name, the first match winning (order matters: ``attn_qkv`` before
    ``attn_v``, ``ffn_up`` before ``ffn_gate``)."""
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for part, cat in (("attn_qkv.weight", "attn_qkv"), ("attn_kv_b.weight", "attn_kv_b"), ("attn_v.weight", "attn_v"),
                      ("attn_k.weight", "attn_k"), ("attn_q.weight", "attn_q"), ("attn_output.weight", "attn_output"),
                      ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"), ("ffn_down", "ffn_down")):
        if part in name:
            return cat
    return "other"


def _is_attn_v(cat: str) -> bool:
    """category_is_attn_v: the tensors holding V, the most sensitive to quantization."""
    return cat in ("attn_v", "attn_qkv", "attn_kv_b")


def allows_quantization(name: str, shape: Sequence[int]) -> bool:
    """tensor_allows_quantization (default params: the output tensor is quantized): 2-D and 3-D weights except norms,
    MoE routers and a few small tensors. The others keep the type they have in the input file."""
    if len(shape) < 2 or not name.endswith("weight") or "_norm.weight" in name:
        return False
    return not any(part in name for part in _NEVER_QUANTIZED) and name not in _NEVER_QUANTIZED_EXACT


def block_size(t: T) -> int:
    return gguf.GGML_QUANT_SIZES[t][0]


def fallback(ncols: int, target: T) -> T:
    """tensor_type_fallback: rows of ``ncols`` weights that ``target``'s block does not divide get the 32-weight type
    of the table, or F16 when even that does not divide them (SmolLM2's 576-wide rows: Q4_K -> Q5_0, Q6_K -> Q8_0)."""
    if ncols % block_size(target) == 0:
        return target
    new = FALLBACK.get(target)
    if new is None:
        if block_size(target) > 32:
            raise ConfigError(f"llama.cpp defines no fallback for type {target.name}")
        new = target  # already a 32-weight type: F16 below
    return new if ncols % block_size(new) == 0 else T.F16


def _use_more_bits(i_layer: int, n_layers: int) -> bool:
    """use_more_bits: the first and last eighth of the layers, and every third one between."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def _layer(name: str, counter: int, facts: ModelFacts) -> int:
    """layer_info: the running counter for dense models; the layer in the name for MoE ones (Mixtral's experts are
    not stored in layer order)."""
    if max(1, facts.n_expert) > 1:
        match = re.match(r"blk\.(\d+)\.", name)
        if not match:
            raise ConfigError(f"cannot tell the layer of tensor {name}")
        return int(match.group(1))
    return counter


def _output_type(new: T, ncols: int, ftype: FT, facts: ModelFacts) -> T:
    """The output tensor (and a tied token embedding): Q8_0 where the default's block does not divide the rows (and
    for Falcon), else Q6_K unless the default is Q8_0. (The MXFP4 and IQ1/IQ2 presets' branches are not offered.)"""
    if facts.arch == "falcon" or ncols % block_size(new) != 0:
        return T.Q8_0
    return T.Q6_K if new != T.Q8_0 else new


def _attn_v_type(qs: _State, new: T, ftype: FT, facts: ModelFacts) -> T:
    """llama_tensor_get_type_impl's attention-v branch (counts every attn_v / attn_qkv / attn_kv_b tensor)."""
    gqa4 = facts.n_gqa >= 4
    if ftype == FT.MOSTLY_Q2_K:
        new = T.Q4_K if gqa4 else T.Q3_K
    elif ftype == FT.MOSTLY_Q3_K_M:
        new = T.Q5_K if qs.i_attention_wv < 2 else T.Q4_K
    elif ftype == FT.MOSTLY_Q3_K_L:
        new = T.Q5_K
    elif ftype == FT.MOSTLY_IQ4_NL and gqa4:
        new = T.Q5_K
    elif ftype in (FT.MOSTLY_Q4_K_M, FT.MOSTLY_Q5_K_M) and _use_more_bits(qs.i_attention_wv, qs.n_attention_wv):
        new = T.Q6_K
    elif ftype == FT.MOSTLY_Q4_K_S and qs.i_attention_wv < 4:
        new = T.Q5_K
    if facts.is_70b and new in (T.Q3_K, T.Q4_K):
        new = T.Q5_K  # 8 heads share each V head in the 70B: its attn_v is 8x smaller than attn_q
    if facts.n_expert == 8:
        new = T.Q8_0  # the 8-expert model (Mixtral): costs ~128 MB
    qs.i_attention_wv += 1
    return new


def _ffn_down_type(qs: _State, new: T, name: str, ftype: FT, facts: ModelFacts) -> T:
    """llama_tensor_get_type_impl's ffn_down branch."""
    i_layer, n_layer = _layer(name, qs.i_ffn_down, facts), qs.n_ffn_down
    falcon = facts.arch == "falcon"
    if ftype == FT.MOSTLY_Q2_K:
        new = T.Q3_K
    elif ftype == FT.MOSTLY_Q3_K_M:
        new = (T.Q5_K if i_layer < n_layer // 16
               else T.Q4_K if not falcon or _use_more_bits(i_layer, n_layer) else T.Q3_K)
    elif ftype == FT.MOSTLY_Q3_K_L:
        new = T.Q4_K if falcon else T.Q5_K
    elif ftype == FT.MOSTLY_Q4_K_M:
        if falcon:
            new = T.Q6_K if i_layer < n_layer // 16 else T.Q5_K if _use_more_bits(i_layer, n_layer) else T.Q4_K
        elif _use_more_bits(i_layer, n_layer):
            new = T.Q6_K
    elif i_layer < n_layer // 8 and ftype == FT.MOSTLY_IQ4_NL:  # and no imatrix (with one: the default type)
        new = T.Q5_K
    elif ftype == FT.MOSTLY_Q5_K_M and _use_more_bits(i_layer, n_layer):
        new = T.Q6_K
    elif ftype == FT.MOSTLY_Q4_K_S and not falcon and i_layer < n_layer // 8:
        new = T.Q5_K
    # imatrix only: Q4_0 / Q5_0 give the first eighth of the ffn_down layers Q4_1 / Q5_1
    qs.i_ffn_down += 1
    return new


def _attn_output_type(new: T, ftype: FT, facts: ModelFacts) -> T:
    """llama_tensor_get_type_impl's attn_output branch."""
    if facts.arch == "falcon":
        return T.Q4_K if ftype == FT.MOSTLY_Q3_K_L else new
    if facts.n_expert == 8:
        if ftype in (FT.MOSTLY_Q2_K, FT.MOSTLY_Q3_K_S, FT.MOSTLY_Q3_K_M, FT.MOSTLY_IQ4_NL, FT.MOSTLY_Q4_K_S,
                     FT.MOSTLY_Q4_K_M):
            return T.Q5_K
        return new
    return {FT.MOSTLY_Q2_K: T.Q3_K, FT.MOSTLY_Q3_K_M: T.Q4_K, FT.MOSTLY_Q3_K_L: T.Q5_K}.get(ftype, new)


def _impl(qs: _State, new: T, name: str, ncols: int, ftype: FT, cat: str, facts: ModelFacts) -> T:
    """llama_tensor_get_type_impl for the offered presets (no imatrix, no overrides). Its attn_qkv branch (Q4_K_M ->
    Q5_K ...) is never reached: attn_qkv is in the attention-v category, whose branch comes first."""
    if cat == "output" or (qs.has_tied_embeddings and cat == "token_embd"):
        return _output_type(new, ncols, ftype, facts)
    if cat == "token_embd":
        return new  # untied: the default type (only the IQ1/IQ2/IQ3_XXS/TQ presets change it)
    if _is_attn_v(cat):
        return _attn_v_type(qs, new, ftype, facts)
    if cat == "attn_k":
        return T.Q8_0 if facts.n_expert == 8 else new
    if cat == "ffn_down":
        return _ffn_down_type(qs, new, name, ftype, facts)
    if cat == "attn_output":
        return _attn_output_type(new, ftype, facts)
    if cat in ("ffn_gate", "ffn_up"):  # only IQ3_XS changes these; the counters still advance
        if cat == "ffn_gate":
            qs.i_ffn_gate += 1
        else:
            qs.i_ffn_up += 1
    return new


def _weights_order(name: str) -> tuple[int, str]:
    """llama_model_loader::weight_name_comparer: by layer (tensors outside the blocks first), then by name. The
    counters above advance in this order."""
    match = re.match(r"blk\.(\d+)\.", name)
    return (int(match.group(1)) if match else -1, name)


def preset_ftype(preset: str) -> FT:
    """The llama_ftype of a preset name, or a ConfigError listing the offered ones."""
    try:
        return PRESETS[preset.upper()]
    except (KeyError, AttributeError):
        raise ConfigError(f"unknown GGUF preset {preset!r}; use one of {', '.join(PRESETS)} "
                          "(llama-quantize's names; the IQ1/IQ2/IQ3 and Q2_K_S presets need an importance matrix "
                          "and are not offered)") from None


def preset_types(shapes: Mapping[str, Sequence[int]], preset: str, facts: ModelFacts,
                 current: Mapping[str, str] | None = None) -> dict[str, str]:
    """llama-quantize's type for every tensor of a model (``shapes``: llama.cpp name -> torch-order shape) under
    ``preset``: llama_model_quantize_impl's preliminary loop. Tensors it does not quantize keep ``current``'s type
    (default F32, what llmq writes them in)."""
    ftype = preset_ftype(preset)
    default = DEFAULT_TYPE[ftype]
    names = sorted(shapes, key=_weights_order)
    qs = _State()
    # init_quantize_state_counters
    qs.n_attention_wv = sum(_is_attn_v(category(n)) for n in names)
    qs.has_tied_embeddings = "output.weight" not in shapes
    qs.n_ffn_down = qs.n_ffn_gate = qs.n_ffn_up = facts.n_layer
    out = {}
    for name in names:
        shape = shapes[name]
        if not allows_quantization(name, shape):
            out[name] = (current or {}).get(name, "F32")
            continue
        # llama_tensor_get_type: the standard logic, then the shape fallback
        new = _impl(qs, default, name, int(shape[-1]), ftype, category(name), facts)
        out[name] = fallback(int(shape[-1]), new).name
    return {name: out[name] for name in shapes}
