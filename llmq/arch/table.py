"""The architecture table: one entry per ``model_type``, built from the vocabulary in ``spec``."""

from __future__ import annotations

from dataclasses import replace

from llmq.arch.spec import ArchSpec, ExpertNames, GgufKey, GgufSpec, MoESpec, Rows, ScaleGroup, SparseLayers, with_moe

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

QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
GATE_UP = ("mlp.gate_proj", "mlp.up_proj")

# Gemma 2/3: LLaMA's linears, but each sublayer has a norm before and after it (input_layernorm and
# post_attention_layernorm around attention, pre_ and post_feedforward_layernorm around the MLP), so the
# MLP's input norm is pre_feedforward_layernorm; every norm computes (1 + w) * x, whose fold is
# (1 + w) / s - 1; activations reach 1e5, past float16.
GEMMA = replace(LLAMA, fp16_ok=False, scale_groups=(
    ScaleGroup("input_layernorm", QKV, inspect="self_attn", norm_offset=1.0),
    ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",)),
    ScaleGroup("pre_feedforward_layernorm", GATE_UP, inspect="mlp", norm_offset=1.0),
    ScaleGroup("mlp.up_proj", ("mlp.down_proj",)),
))

# Gemma 3 4B and larger (Gemma3ForConditionalGeneration): the same decoder inside a multimodal wrapper, whose
# vision tower and projector run only on images and stay in full precision (copied as they are); checkpoints
# name it language_model.model.*, which transformers' own renames map to these modules
GEMMA3_MULTIMODAL = replace(GEMMA, layers="model.language_model.layers",
                            before=("model.language_model.embed_tokens", "model.language_model.rotary_emb"),
                            after=("model.language_model.norm", "lm_head"))

# Phi-3/4: q/k/v fused in qkv_proj ([q; k; v] rows, heads x head_dim each) and gate/up in gate_up_proj
# ([gate; up]); each stays one linear. v -> o folds into qkv_proj's v rows, up -> down into gate_up_proj's
# up half (down reads act(gate) * up, linear in up).
PHI3 = replace(
    LLAMA,
    sequential=(("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",)),
    scale_groups=(
        ScaleGroup("input_layernorm", ("self_attn.qkv_proj",), inspect="self_attn"),
        ScaleGroup("self_attn.qkv_proj", ("self_attn.o_proj",),
                   prev_rows=Rows(("num_attention_heads", "num_key_value_heads", "num_key_value_heads"), 2)),
        ScaleGroup("post_attention_layernorm", ("mlp.gate_up_proj",), inspect="mlp"),
        ScaleGroup("mlp.gate_up_proj", ("mlp.down_proj",), prev_rows=Rows((1, 1), 1)),
    ),
)

# OLMo-2: norms after each sublayer only (post_attention_layernorm on the attention's output,
# post_feedforward_layernorm on the MLP's), none in front of q/k/v or gate/up: their input is the
# residual stream itself, so no scale folds there; v -> o and up -> down remain.
OLMO2 = replace(LLAMA, scale_groups=(
    ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",)),
    ScaleGroup("mlp.up_proj", ("mlp.down_proj",)),
))

# Cohere (Command-R) and Cohere 2: one input_layernorm feeds attention and MLP in parallel
# (x + attn(norm(x)) + mlp(norm(x))), so q/k/v and gate/up read the same tensor: one group, one Hessian,
# one scale searched on the sum of both outputs.
COHERE = replace(
    LLAMA,
    sequential=(QKV + GATE_UP, ("self_attn.o_proj",), ("mlp.down_proj",)),
    scale_groups=(
        ScaleGroup("input_layernorm", QKV + GATE_UP, inspect=("self_attn", "mlp")),
        ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",)),
        ScaleGroup("mlp.up_proj", ("mlp.down_proj",)),
    ),
)

# GLM-4 (0414): LLaMA's attention, Phi-3's fused gate_up_proj, and a norm after each sublayer besides the
# one before it (post_self_attn_layernorm, post_mlp_layernorm): post_attention_layernorm is the MLP's input norm.
GLM4 = replace(
    LLAMA,
    sequential=LLAMA.sequential[:2] + (("mlp.gate_up_proj",), ("mlp.down_proj",)),
    scale_groups=LLAMA.scale_groups[:2] + PHI3.scale_groups[2:],
)

# Mixtures of experts with LLaMA-layout attention; the MoE block takes the MLP's place.
# Qwen3-MoE: every layer sparse unless mlp_only_layers / decoder_sparse_step say otherwise.
QWEN_SPARSE = SparseLayers(step="decoder_sparse_step", dense="mlp_only_layers")
QWEN3_MOE = with_moe(LLAMA, MoESpec(num_experts="num_experts", sparse=QWEN_SPARSE))
# Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): a shared expert every token goes through, scaled by its
# own sigmoid gate (a 1-output linear that stays in full precision like the router).
QWEN2_MOE = with_moe(LLAMA, MoESpec(num_experts="num_experts", shared="shared_expert",
                                    shared_gate="shared_expert_gate", sparse=QWEN_SPARSE))
# Mixtral: every layer sparse; checkpoints name the block block_sparse_moe and the expert linears
# w1 (gate), w3 (up), w2 (down), which transformers 5 renames to mlp on load.
MIXTRAL = with_moe(LLAMA, MoESpec(num_experts="num_local_experts", names=ExpertNames("w1", "w3", "w2"),
                                  disk_block="block_sparse_moe"))
# OLMoE: Mixtral's routing with Qwen's names; q/k norms over the whole projection (never quantized).
OLMOE = with_moe(LLAMA, MoESpec(num_experts="num_experts"))
# GLM-4.5/4.6 (glm4_moe): DeepSeek-V3's MoE (sigmoid router with a score-correction bias, ungated shared
# experts) behind LLaMA-layout attention with q/k/v biases; the first k layers are dense.
GLM4_MOE = with_moe(LLAMA, MoESpec(num_experts="n_routed_experts", shared="shared_experts",
                                   sparse=SparseLayers(first_dense="first_k_dense_replace")))

# How llama.cpp stores each family (llmq.formats.gguf), after its class in llama.cpp's convert_hf_to_gguf
# (conversion/*.py): llama.cpp's architecture name, the q/k rope permutation, norm offsets, and the keys beyond
# the common ones (TextModel.set_gguf_parameters).
# LlamaModel (llama.py; also Mistral, Mixtral): rope rows permuted to llama.cpp's interleaved rope; vocab size and
# rope dimension count written; add_space_prefix from tokenizer_config.json's add_prefix_space; a 49152-token
# vocabulary (Granite's small models, SmolLM) gets add_bos_token False; Llama 3.1's rope scaling becomes the
# rope_freqs tensor.
_LLAMA_VOCAB_KEYS = (
    GgufKey("tokenizer.ggml.add_space_prefix", "tokenizer_config.add_prefix_space", kind="bool"),
    GgufKey("{arch}.vocab_size", "vocab_size"),
    GgufKey("{arch}.rope.dimension_count", "head_dim_or_default"),
    GgufKey("tokenizer.ggml.add_bos_token", kind="bool", value=False, when=("vocab_size", 49152)),
)
LLAMA_GGUF = GgufSpec("llama", permute_qk=True, keys=_LLAMA_VOCAB_KEYS, extra_tensors=("rope_freqs",))
# Qwen2MoeModel (qwen.py; Qwen3MoeModel inherits it): the experts' and the shared expert's widths
_QWEN_MOE_KEYS = (GgufKey("{arch}.expert_feed_forward_length", "moe_intermediate_size"),
                  GgufKey("{arch}.expert_shared_feed_forward_length", "shared_expert_intermediate_size"))
# the hyper-parameters of the converters that write their own (Gemma2Model, Phi3MiniModel), not the common ones
_OWN_BASICS = (
    GgufKey("{arch}.context_length", ("n_positions", "max_position_embeddings")),
    GgufKey("{arch}.embedding_length", "hidden_size"),
    GgufKey("{arch}.feed_forward_length", "intermediate_size"),
    GgufKey("{arch}.block_count", "num_hidden_layers"),
    GgufKey("{arch}.attention.head_count", "num_attention_heads"),
    GgufKey("{arch}.attention.head_count_kv", ("num_key_value_heads", "num_attention_heads")),
    GgufKey("{arch}.attention.layer_norm_rms_epsilon", "rms_norm_eps", kind="f32"),
)
# Gemma2Model (gemma.py): its own hyper-parameters (no rope base: llama.cpp's default 10000 is Gemma 2's; written here
# all the same, for a config that differs), norms + 1, key/value widths, both soft-caps, the sliding window, no space
# prefix
GEMMA2_GGUF = GgufSpec("gemma2", norm_offset=1.0, common=False, keys=_OWN_BASICS + (
    GgufKey("{arch}.attention.key_length", "head_dim"),
    GgufKey("{arch}.attention.value_length", "head_dim"),
    GgufKey("{arch}.rope.freq_base", "rope_theta", kind="f32"),
    GgufKey("{arch}.attn_logit_softcapping", "attn_logit_softcapping", kind="f32"),
    GgufKey("{arch}.final_logit_softcapping", "final_logit_softcapping", kind="f32"),
    GgufKey("{arch}.attention.sliding_window", "sliding_window"),
    GgufKey("tokenizer.ggml.add_space_prefix", kind="bool", value=False),
))
# Gemma3Model (gemma.py): norms (q/k norms too) + 1, the final soft-cap where set, the sliding window; the local
# layers' rope base is the common rope.freq_base_swa
GEMMA3_GGUF = GgufSpec("gemma3", norm_offset=1.0, keys=(
    GgufKey("{arch}.final_logit_softcapping", "final_logit_softcapping", kind="f32"),
    GgufKey("{arch}.attention.sliding_window", "sliding_window"),
))
# Phi3MiniModel (phi.py): its own hyper-parameters; fused qkv_proj stays attn_qkv and gate_up_proj is ffn_up; partial
# rotary dimensions, the original context (LongRoPE), sliding window 0 when unset; LongRoPE's factors become tensors,
# with their attention factor
PHI3_GGUF = GgufSpec("phi3", common=False, keys=_OWN_BASICS + (
    GgufKey("{arch}.rope.freq_base", "rope_theta", kind="f32"),
    GgufKey("{arch}.rope.dimension_count", "rope_dims_partial"),
    GgufKey("{arch}.rope.scaling.original_context_length", "original_max_position_embeddings"),
    GgufKey("{arch}.attention.sliding_window", "sliding_window", default=0),
    GgufKey("{arch}.rope.scaling.attn_factor", "longrope_attn_factor", kind="f32"),
), extra_tensors=("rope_factors",))
# GraniteModel (granite.py): LLaMA's, head_dim ignored (no key/value length; rope dimensions hidden / heads), with the
# four multipliers
GRANITE_GGUF = GgufSpec("granite", permute_qk=True, ignore=("head_dim",), keys=_LLAMA_VOCAB_KEYS + (
    GgufKey("{arch}.attention.scale", "attention_multiplier", kind="f32"),
    GgufKey("{arch}.embedding_scale", "embedding_multiplier", kind="f32"),
    GgufKey("{arch}.residual_scale", "residual_multiplier", kind="f32"),
    GgufKey("{arch}.logit_scale", "logits_scaling", kind="f32"),
), extra_tensors=("rope_freqs",))

ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": replace(LLAMA, gguf=LLAMA_GGUF),
    # LLaMA layout with sliding-window attention (a mask matter, not a weight one)
    "mistral": replace(LLAMA, gguf=LLAMA_GGUF),
    # LLaMA layout with biases on q/k/v (kept in full precision beside the codes); llama.cpp's NEOX rope: no permutation
    "qwen2": replace(LLAMA, gguf=GgufSpec("qwen2")),
    # LLaMA layout with RMSNorm on q and k per head (norms are never quantized)
    "qwen3": replace(LLAMA, gguf=GgufSpec("qwen3")),
    # Granite: LLaMA's layout; its multipliers (embedding, residual, attention, logits) scale activations
    # between the linears, which the captured inputs and the layer forwards already include
    "granite": replace(LLAMA, gguf=GRANITE_GGUF),
    "gemma2": replace(GEMMA, gguf=GEMMA2_GGUF),
    "gemma3_text": replace(GEMMA, gguf=GEMMA3_GGUF),  # Gemma 2's layout with q/k norms per head (never quantized)
    "gemma3": GEMMA3_MULTIMODAL,
    "phi3": replace(PHI3, gguf=PHI3_GGUF),
    "olmo2": replace(OLMO2, gguf=GgufSpec("olmo2")),
    "cohere": COHERE,
    "cohere2": COHERE,  # Cohere's layout; sliding-window layers are a mask matter
    "glm4": GLM4,
    "qwen3_moe": replace(QWEN3_MOE, gguf=GgufSpec("qwen3moe", keys=_QWEN_MOE_KEYS)),
    "qwen2_moe": replace(QWEN2_MOE, gguf=GgufSpec("qwen2moe", keys=_QWEN_MOE_KEYS)),
    "mixtral": replace(MIXTRAL, gguf=LLAMA_GGUF),  # llama.cpp: LLaMA with experts
    "olmoe": replace(OLMOE, gguf=GgufSpec("olmoe", keys=(  # OlmoeModel: the norm eps fixed at 1e-5
        GgufKey("{arch}.attention.layer_norm_rms_epsilon", kind="f32", value=1e-5),))),
    "glm4_moe": GLM4_MOE,
}
