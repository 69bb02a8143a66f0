"""``llmq generate``: stream a model's continuation of a prompt and time its prefill and decode."""

from __future__ import annotations

import time
from typing import NamedTuple, TextIO

import torch
from transformers import TextStreamer

from llmq.errors import LlmqError


class Generation(NamedTuple):
    ids: torch.Tensor  # [1, prompt + new] token ids
    prompt_tokens: int
    new_tokens: int
    prefill_s: float  # prompt in, first new token out
    decode_s: float  # every later token

    @property
    def decode_tokens_per_s(self) -> float:
        return (self.new_tokens - 1) / self.decode_s if self.new_tokens > 1 and self.decode_s > 0 else float("nan")

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else float("nan")


class _TimedStreamer(TextStreamer):
    """transformers' streamer (prints each piece of text as soon as it is decodable) that also notes when
    each new token arrived."""

    def __init__(self, tokenizer, out: TextIO | None):  # noqa: ANN001 (any tokenizer)
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.out, self.arrivals = out, []

    def put(self, value: torch.Tensor) -> None:
        if not self.next_tokens_are_prompt:
            self.arrivals.append(time.perf_counter())
        super().put(value)

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if self.out is not None:
            print(text, end="\n" if stream_end else "", file=self.out, flush=True)


def prompt_ids(tokenizer, prompt: str, chat: bool) -> torch.Tensor:  # noqa: ANN001
    """``[1, n]`` token ids of ``prompt``, wrapped in the tokenizer's chat template when ``chat``."""
    if not chat:
        return tokenizer(prompt, return_tensors="pt").input_ids
    if not getattr(tokenizer, "chat_template", None):
        raise LlmqError("--chat needs a tokenizer with a chat template, and this one has none: drop --chat to "
                        "continue the prompt as plain text")
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    return ids["input_ids"]


def generate(model: torch.nn.Module, tokenizer, prompt: str, max_new_tokens: int = 128, chat: bool = False,  # noqa: ANN001
             out: TextIO | None = None, **generate_kwargs) -> Generation:
    """Greedy (unless ``generate_kwargs`` say otherwise) continuation of ``prompt``, streamed to ``out``."""
    if max_new_tokens < 1:
        raise LlmqError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    device = next(model.parameters()).device
    ids = prompt_ids(tokenizer, prompt, chat).to(device)
    streamer = _TimedStreamer(tokenizer, out)
    kwargs = dict(do_sample=False, max_new_tokens=max_new_tokens, attention_mask=torch.ones_like(ids),
                  pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    kwargs.update(generate_kwargs)
    start = time.perf_counter()
    with torch.inference_mode():
        result = model.generate(ids, streamer=streamer, **kwargs)
    end = time.perf_counter()
    new = result.shape[1] - ids.shape[1]
    first = streamer.arrivals[0] if streamer.arrivals else end
    return Generation(result.cpu(), ids.shape[1], new, first - start, end - first)
