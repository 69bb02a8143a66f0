"""The architecture table: one entry per ``model_type``, built from the vocabulary in ``spec``."""

from __future__ import annotations

from .spec import ArchSpec, ExpertNames, MoESpec, ScaleGroup, SparseLayers, with_moe

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

ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": LLAMA,
    "mistral": LLAMA,  # LLaMA layout with sliding-window attention (a mask matter, not a weight one)
    "qwen2": LLAMA,  # LLaMA layout with biases on q/k/v (kept in full precision beside the codes)
    "qwen3": LLAMA,  # LLaMA layout with RMSNorm on q and k per head (norms are never quantized)
    "qwen3_moe": QWEN3_MOE,
    "qwen2_moe": QWEN2_MOE,
    "mixtral": MIXTRAL,
    "olmoe": OLMOE,
    "glm4_moe": GLM4_MOE,
}
