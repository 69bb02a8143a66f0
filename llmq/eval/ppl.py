"""Evaluation of an in-memory causal LM: perplexity by the GPTQ paper's protocol, and lm-eval tasks.

Perplexity (Frantar et al., 2023, as in the reference GPTQ ``llama_eval``): for each window of
``seqlen`` tokens, the float32 cross entropy of the next-token predictions (``seqlen - 1``
predicted tokens per window); perplexity is ``exp`` of the mean negative log-likelihood over all
predicted tokens of all windows.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from llmq.errors import LlmqError

log = logging.getLogger(__name__)


def _model_device(model: torch.nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def perplexity(
    model: torch.nn.Module,
    windows: torch.LongTensor,
    batch_size: int = 1,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Perplexity of ``model`` on ``windows`` ``[n, seqlen]`` (see the module docstring).

    Returns ``{"ppl", "nll" (mean per predicted token), "tokens" (predicted), "windows", "seqlen"}``.
    Any model whose ``forward(input_ids)`` returns an object with ``.logits`` works.
    """
    if windows.ndim != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
        raise LlmqError(f"windows must be [n >= 1, seqlen >= 2] token ids, got shape {tuple(windows.shape)}")
    if batch_size < 1:
        raise LlmqError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device) if device is not None else _model_device(model)
    n, seqlen = windows.shape
    total_nll = 0.0  # float64 accumulation on the host
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in tqdm(range(0, n, batch_size), desc="perplexity", unit="batch", disable=not progress):
                batch = windows[start : start + batch_size].to(device)
                logits = model(batch).logits[:, :-1, :].float()
                targets = batch[:, 1:]
                nll = F.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
                )
                total_nll += nll.item()
    finally:
        model.train(was_training)
    tokens = n * (seqlen - 1)
    mean_nll = total_nll / tokens
    ppl = math.exp(mean_nll)
    log.info("perplexity %.4f over %d windows of %d tokens", ppl, n, seqlen)
    return {"ppl": ppl, "nll": mean_nll, "tokens": tokens, "windows": n, "seqlen": seqlen}


def run_lm_eval(
    model: torch.nn.Module,
    tokenizer,
    tasks: list[str],
    include_path: str | None = None,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    batch_size: int = 1,
    device: str | None = None,
) -> dict[str, Any]:
    """Run EleutherAI lm-evaluation-harness ``tasks`` on an in-memory model.

    The model is wrapped in ``lm_eval.models.huggingface.HFLM`` (which evaluates it on the device it
    is on, so ``device`` moves the model first). ``include_path`` is a folder of extra task YAMLs.
    Returns the dict of ``lm_eval.simple_evaluate`` (metrics under ``["results"][task]``), without
    per-sample logs.
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    if device is not None:
        model.to(device)
    model.eval()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    task_manager = TaskManager(include_path=include_path)
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(tasks),
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=task_manager,
        log_samples=False,
    )
    if out is None:  # simple_evaluate returns None on non-zero ranks of a distributed run
        raise LlmqError("lm-eval returned no results (non-zero rank of a distributed run?)")
    return out
