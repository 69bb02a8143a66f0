"""Attention of loaded models in :func:`llmq.device.gemm_dtype`: float32 for bf16 models on CPUs without native
bf16 matmuls.

Torch's CPU flash attention in bfloat16 on AVX2 takes 1.5 ms for one decode query over 515 cached keys
(TinyLlama's 32 heads), against 0.26 ms cast to float32 and back (``scripts/bench_decode.py``'s profile): a
quarter of a W4 decode step there. :func:`use_gemm_dtype_attention` registers transformers' own SDPA attention,
called on float32 copies of the query, keys and values with the output rounded to bf16 once, under
:data:`NAME`, and switches a model to it; it rounds less than bf16 attention does, so outputs move by no more
than bf16 rounding. Elsewhere (CUDA, CPUs with AVX512-BF16 or AMX) models keep their attention.
"""

from __future__ import annotations

import logging

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..device import gemm_dtype

log = logging.getLogger(__name__)

NAME = "llmq_sdpa_gemm_dtype"


def sdpa_in_gemm_dtype(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, **kwargs) -> tuple[torch.Tensor, None]:
    dtype = gemm_dtype(query.dtype, query.device)
    if dtype == query.dtype:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.to(dtype)
    out, weights = sdpa_attention_forward(module, query.to(dtype), key.to(dtype), value.to(dtype), attention_mask,
                                          **kwargs)
    return out.to(query.dtype), weights


def use_gemm_dtype_attention(model: PreTrainedModel, dtype: torch.dtype, device: torch.device) -> bool:
    """Switch ``model`` (SDPA attention, ``dtype`` on ``device``) to attention in the gemm dtype where that differs;
    returns whether it did."""
    if model.config._attn_implementation != "sdpa" or gemm_dtype(dtype, device) == dtype:
        return False
    AttentionInterface.register(NAME, sdpa_in_gemm_dtype)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    model.set_attn_implementation(NAME)
    log.info("attention runs in %s (%s matmuls are not native on this %s)", gemm_dtype(dtype, device),
             str(dtype).removeprefix("torch."), device.type)
    return True
