"""One Llama-2-7B-shaped decoder layer's forward over 8 windows of 512 tokens in bfloat16 and in float32, on the
CPU; prints one JSON line. Why llmq.utils.device runs a bf16 model's layer forwards in float32 on CPUs without native
bf16 matmuls (AVX512-BF16 or AMX).

    python scripts/bench_forward_dtype.py
"""

from __future__ import annotations

import json
import time

import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from llmq.utils.device import native_bf16


def main() -> None:
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    layer = LlamaDecoderLayer(cfg, 0).to(torch.bfloat16).eval()
    x = torch.randn(8, 512, 4096, dtype=torch.bfloat16)
    pos = torch.arange(512)[None]
    seconds = {}
    for dtype in (torch.bfloat16, torch.float32):
        layer.to(dtype)
        rotary = LlamaRotaryEmbedding(cfg)(x.to(dtype), pos)
        with torch.no_grad():
            layer(x[:1].to(dtype), position_embeddings=rotary, attention_mask=None)  # warm-up
            start = time.perf_counter()
            layer(x.to(dtype), position_embeddings=rotary, attention_mask=None)
            seconds[str(dtype).removeprefix("torch.")] = round(time.perf_counter() - start, 2)
    print(json.dumps({"layer": "llama2-7b", "tokens": x.shape[0] * x.shape[1], "threads": torch.get_num_threads(),
                      "cpu": torch.backends.cpu.get_cpu_capability(), "native_bf16": native_bf16(torch.device("cpu")),
                      "forward_s": seconds, "bf16_over_fp32": round(seconds["bfloat16"] / seconds["float32"], 2)}))


if __name__ == "__main__":
    main()
