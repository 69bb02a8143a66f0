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


def tiny_config(model_type: str, **overrides):
    """A random-initialisable config of ``model_type`` with every dimension small."""
    from transformers import AutoConfig

    kwargs = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    if model_type == "qwen3":
        kwargs["head_dim"] = 16
    kwargs.update(overrides)
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_model(model_type: str = "llama", seed: int = 0, **overrides):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides))
    return model.eval()
