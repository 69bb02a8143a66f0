"""Attention of loaded bf16 models on the CPU in float32.

Torch's CPU flash attention in bfloat16 is slow for the few queries of a decode step, whether or not the CPU
multiplies bf16 natively: one decode query over 514 cached keys (TinyLlama's 32 heads) takes 1.5 ms in bf16
against 0.26 ms cast to float32 and back on an AVX2 EPYC, and 1.14 ms against 0.15 ms (before the cast) on an
AVX512-BF16 EPYC (Zen 4), where a W4 decode step went from 63-67 ms to 51-56 ms with it (``/tmp`` probes of
``scripts/bench_decode.py``'s model, interleaved runs). At 512 queries (prefill) the two are within 5%.
:func:`use_float32_attention` registers transformers' own SDPA attention, called on float32 copies of the
query, keys and values with the output rounded to bf16 once, under :data:`NAME`, and switches a model to it; it
rounds less than bf16 attention does, so outputs move by no more than bf16 rounding. On CUDA, and for models in
other dtypes, models keep their attention.
"""

from __future__ import annotations

import logging

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

log = logging.getLogger(__name__)

NAME = "llmq_sdpa_float32"


def attention_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype a loaded model's attention runs in: float32 for bf16 on the CPU, ``dtype`` otherwise."""
    return torch.float32 if dtype == torch.bfloat16 and device.type == "cpu" else dtype


def sdpa_in_float32(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, **kwargs) -> tuple[torch.Tensor, None]:
    dtype = attention_dtype(query.dtype, query.device)
    if dtype == query.dtype:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.to(dtype)
    out, weights = sdpa_attention_forward(module, query.to(dtype), key.to(dtype), value.to(dtype), attention_mask,
                                          **kwargs)
    return out.to(query.dtype), weights


def use_float32_attention(model: PreTrainedModel, dtype: torch.dtype, device: torch.device) -> bool:
    """Switch ``model`` (SDPA attention, ``dtype`` on ``device``) to float32 attention where
    :func:`attention_dtype` says so; returns whether it did."""
    if model.config._attn_implementation != "sdpa" or attention_dtype(dtype, device) == dtype:
        return False
    AttentionInterface.register(NAME, sdpa_in_float32)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    model.set_attn_implementation(NAME)
    log.info("attention runs in %s (torch's %s CPU attention is slow per decode query)",
             attention_dtype(dtype, device), str(dtype).removeprefix("torch."))
    return True
