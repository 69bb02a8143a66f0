"""Helpers shared by the tests: locating ``../shared``, tiny random models of each architecture."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED = Path(os.environ.get("LLMQ_SHARED") or Path(__file__).resolve().parents[2] / "shared")


def shared_path(*parts: str) -> Path:
    """A file under ``../shared``; fails (never skips) the test when it is missing."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.fail(
            f"{path} not found: these tests need the project's shared/ folder beside the checkout "
            "(or LLMQ_SHARED pointing at it)"
        )
    return path


MOE_CONFIGS = {
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, mlp_only_layers=[1],
                      norm_topk_prob=True),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=64),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2),
    "glm4_moe": dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, first_k_dense_replace=1,
                     n_group=1, topk_group=1, n_shared_experts=1),
}


# dense families beyond the LLaMA layout: special tokens inside the small vocabulary (their defaults lie past
# it), and 16-wide heads where a family's default is wider (Gemma's 256)
DENSE_CONFIGS = {family: dict(pad_token_id=0, bos_token_id=1, eos_token_id=2, head_dim=16)
                 for family in ("gemma2", "gemma3_text", "phi3", "olmo2", "cohere", "cohere2", "granite", "glm4")}


# a multimodal wrapper: the text decoder's config inside, and a one-layer vision tower
MULTIMODAL = {"gemma3": dict(vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                 num_attention_heads=2, image_size=28, patch_size=14),
                              mm_tokens_per_image=4, boi_token_index=5, eoi_token_index=6, image_token_index=7)}


def tiny_config(model_type: str, **overrides):
    """A random-initialisable config of ``model_type`` with every dimension small."""
    from transformers import AutoConfig

    if model_type in MULTIMODAL:
        text = tiny_config(f"{model_type}_text", **overrides).to_dict()
        return AutoConfig.for_model(model_type, text_config=text, **MULTIMODAL[model_type])

    kwargs = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    if model_type in ("qwen3", "qwen3_moe", "olmoe", "glm4_moe"):
        kwargs["head_dim"] = 16
    kwargs.update(MOE_CONFIGS.get(model_type, {}))  # a few narrow experts, some layers dense where a family can
    kwargs.update(DENSE_CONFIGS.get(model_type, {}))
    kwargs.update(overrides)
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_model(model_type: str = "llama", seed: int = 0, **overrides):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides))
    return model.eval()


def bf16_copy(src: Path, dst: Path) -> Path:
    """``src`` (a model folder) saved again in bfloat16, as real hub checkpoints are, with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).save_pretrained(dst)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    if (src / "generation_config.json").is_file():
        GenerationConfig.from_pretrained(src).save_pretrained(dst)
    return dst


def lay_out_in_hub_cache(cache: Path, repo_id: str, folder: Path, tags: tuple[str, ...] = ()) -> str:
    """Put ``folder``'s files into ``cache`` the way huggingface_hub stores a download; returns the commit.

    ``models--ORG--NAME/blobs/<sha256>`` holds each file once, ``snapshots/<commit>/`` links to the
    blobs, and ``refs/main`` (and each tag in ``tags``) names the commit.
    """
    import hashlib

    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for path in sorted(folder.iterdir()):
        if not path.is_file():
            continue
        data = path.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / path.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir(exist_ok=True)
    for ref in ("main", *tags):
        (repo / "refs" / ref).write_text(commit)
    return commit


def c4_texts() -> list[str]:
    """The ``text`` of the 1,000 C4 records in ../shared (0-899 calibrate, 900-999 evaluate)."""
    import json

    rows = shared_path("assets", "c4-sample", "c4_train_00000_first1000.jsonl").read_text().splitlines()
    return [json.loads(r)["text"] for r in rows]


def tiny_llama_bf16(tmp_path_factory) -> Path:
    """llmq-tiny-llama saved again in bfloat16 (for a module-scoped fixture)."""
    return bf16_copy(shared_path("assets", "llmq-tiny-llama"), tmp_path_factory.mktemp("bf16") / "tiny-llama-bf16")


def cpu_int4() -> str:
    """The path auto picks for 2-4-bit layers on this CPU: llmq's int4_avx2 on x86 with AVX2 (tests/test_kernels.py
    fails where it cannot build there), torch's int4_cpu elsewhere."""
    from llmq.runtime.kernels import native

    return "int4_avx2" if native.unavailable() is None else "int4_cpu"
