"""An embedded, fully offline demo model: a tiny LLaMA trained for about a minute on synthetic stories.

``llmq demo`` must run on a fresh machine with no network, so nothing here downloads anything: the
text comes from a small probabilistic grammar (TinyStories-like) whose stories carry long-range
structure (a hero's name, pronoun, object and friend recur), so the model learns more than unigram
statistics and quantization error shows in perplexity. The tokenizer is byte-level (BPE with no merges
by default: one token per byte), so the layers, not the embedding table, spell the words, and that is
what makes their rounding visible: with a 512-token BPE the same training left a model that W3 g128 RTN
cost only 1.2% of perplexity, one token per byte 6.5-7.1% (seeds 0-2, 230 steps). Every linear
``in_features`` of the 4-layer ``LlamaForCausalLM`` is a multiple of 128.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from llmq.errors import ConfigError

log = logging.getLogger(__name__)

DEMO_TEXTS_FILE = "demo_texts.json"
SEQ_LEN = 128
BYTE_VOCAB = 259  # the 256 bytes and <unk>, <s>, </s>: a byte-level BPE with no merges
DEMO_STEPS = 230  # about a minute on one thread here; a step count, not a time, so the model is the same anywhere

# Word pools. Story slots draw once per story (a name, a pronoun, an object recur through the story:
# the long-range structure); ``a_*`` slots draw afresh at each use (local variety, more entropy).
_GIRLS = "Lily Mia Anna Sue Zoe Emma Lucy Sara Amy Kate Rose Ella Nora Ivy Ruby Jane Molly Grace".split()
_BOYS = "Tom Max Ben Sam Tim Leo Jack Bob Finn Dan Ned Joe Luke Adam Owen Hugo Pete Carl".split()
_POOLS = {
    "kind": "cat dog bunny bird bear duck fox frog mouse puppy".split(), "parent": "mom dad grandma".split(),
    "adj": "little happy brave kind small curious funny shy clever sleepy".split(),
    "color": "red blue green yellow pink purple orange white".split(), "num": "two three four five".split(),
    "obj": "ball kite doll hat boat drum book car cup box train sock bike teddy".split(),
    "place": "park garden forest beach yard meadow school farm hill river zoo lake".split(),
    "spot": ["under the bed", "behind the door", "in the closet", "under a tree", "in the grass",
             "by the pond", "on the roof", "in the kitchen", "behind a big rock"],
    "tool": ["glue", "tape", "string", "a needle", "a hammer"], "glad": "happy glad proud excited".split(),
    "sad": "sad upset worried scared lonely".split(), "day": "sunny cold windy warm rainy".split(),
    "when": ["One day", "One morning", "After lunch", "On a sunny day", "Later that day", "Soon"],
    "food": "cake apples cookies soup bread milk carrots".split(),
    "sound": ["a loud noise", "a soft song", "a funny sound", "a big bang", "a knock"],
    "act": "ran jumped walked sang danced laughed smiled waved hopped clapped".split(),
    "adv": "quickly slowly happily loudly quietly".split(),
}  # fmt: skip
_OPENINGS = (
    "Once upon a time, there was a {adj} {kind} named {name}.|There once was a {adj} {kind} called "
    "{name}.|{name} was a {adj} {kind} who lived near the {place}."
)
_INTROS = (
    "{Sub} had a {color} {obj} that {sub} loved very much.|{name} liked to play with {pos} {color} "
    "{obj} every day.|{Pos} favorite toy was a {color} {obj}."
)
_FILLERS = (
    "The sun was warm and the sky was blue.|{name} was very {a_sad}.|{Sub} did not know what "
    "to do.|A {a_kind} sang in a tree.|{Sub} ate some {a_food}.|Then {sub} heard {a_sound}.|"
    "{name} saw a {a_adj} {a_kind} near the {a_place}.|{Pos} {parent} made {a_food} for lunch.|"
    "{name} {a_act} {a_adv}.|{Sub} saw {a_num} {a_color} birds.|It was a {a_day} day.|"
    "{friend} {a_act} and {a_act}.|{Sub} counted {a_num} {a_obj}s {a_spot}."
)
# One beat per line; "|" separates alternatives.
_PLOTS = (
    """{a_when}, {name} could not find {pos} {obj}.|{a_when}, {pos} {obj} was gone.
{Sub} looked {spot}, but the {obj} was not there.|{Sub} looked {spot}. No {obj}!
{name} felt {sad}.|{name} was {sad} and began to cry.
Then {friend} came to help.|{Pos} friend {friend} came by.
"Do not be {sad}, {name}," said {friend}. "We will find your {obj}."
They looked {spot2}, and there it was!|They looked {spot2}, and there was the {obj}!
{name} hugged {friend} and said, "Thank you, {friend}!"
From that day on, {name} always kept {pos} {obj} in a safe place.|{name} and {friend} played.""",
    """{a_when}, {name} went to the {place} with {pos} {obj}.
There {sub} met {friend}, who had no toys.|At the {place}, {sub} saw {friend} sitting alone.
"Can I play with your {obj}, {name}?" asked {friend}.
{name} said, "Yes, {friend}! We can play together."|{name} smiled and gave {friend} the {obj}.
They played with the {obj} until the sun went down.
{name} and {friend} were very {glad}.|{name} and {friend} became best friends.""",
    """{a_when}, {name} took {pos} {obj} to the {place}.
{friend} asked, "Can I play with your {obj}, {name}?"
{name} said, "No, it is mine!"|"No, {friend}," said {name}. "It is my {obj}."
{friend} walked away, and {name} played alone.
Soon {name} felt {sad}.|But playing alone was not fun.
{Sub} ran to {friend} and said, "I am sorry. We can share my {obj}."
{name} learned that sharing makes everyone {glad}.""",
    """{a_when}, {name} was playing with {pos} {obj} when it broke.
{Sub} began to cry.|{name} felt very {sad}.
{Pos} {parent} came and asked, "What is wrong, {name}?"
"My {obj} is broken," said {name}.
{Pos} {parent} fixed the {obj} with {tool}.|{Pos} {parent} used {tool} to fix the {obj}.
{name} smiled and said, "Thank you, {parent}!"
Now the {obj} was as good as new, and {name} was {glad}.""",
    """{a_when}, {name} and {friend} went to the {place}.
They saw a {adj2} {kind2} sitting {spot2}.|A {adj2} {kind2} was hiding {spot2}.
The {kind2} said, "Hello, {name}! Hello, {friend}!"
"Do you want to play with my {obj}?" asked {name}.
The {kind2} was {glad}, and the three friends played all day.
When it was time to go home, {name} waved at the {kind2}.
{name} told {pos} {parent} about the {kind2}. It was the best day ever.""",
)


class _Slots(dict):
    """Story slots; a missing ``a_<pool>`` key draws a fresh word from that pool at each use."""

    rng: random.Random

    def __missing__(self, key: str) -> str:
        return self.rng.choice(_POOLS[key.removeprefix("a_")])


def _story(rng: random.Random) -> str:
    """One story from the grammar; story slots are drawn once so they stay consistent throughout."""
    girl = rng.random() < 0.5
    name = rng.choice(_GIRLS if girl else _BOYS)
    sub, pos = ("she", "her") if girl else ("he", "his")
    slots = _Slots({k: rng.choice(v) for k, v in _POOLS.items()})
    slots.update({f"{k}2": rng.choice(_POOLS[k]) for k in ("kind", "adj")})  # a second creature
    slots["spot2"] = rng.choice([x for x in _POOLS["spot"] if x != slots["spot"]])  # found elsewhere
    slots["kind"] = rng.choice([("girl" if girl else "boy")] * 4 + _POOLS["kind"])
    slots.update(name=name, friend=rng.choice([n for n in _GIRLS + _BOYS if n != name]), sub=sub, pos=pos,
                 Sub=sub.capitalize(), Pos=pos.capitalize())  # fmt: skip
    slots.rng = rng
    sentences = []
    for beat in [_OPENINGS, _INTROS, *rng.choice(_PLOTS).splitlines()]:
        sentences.append(rng.choice(beat.split("|")))
        if rng.random() < 0.3:  # fillers, so the plot is not a fixed-length script
            sentences.append(rng.choice(_FILLERS.split("|")))
    if rng.random() < 0.5:
        sentences.append("The end.")
    return " ".join(s.format_map(slots) for s in sentences)


def synthetic_corpus(n_chars: int, seed: int) -> str:
    """Deterministic English-like stories joined by ``"\\n\\n"``; whole stories, at least ``n_chars``.
    A private ``random.Random(seed)`` is used: the global random state is untouched."""
    rng, stories, total = random.Random(seed), [], 0
    while total < n_chars:
        stories.append(_story(rng))
        total += len(stories[-1]) + 2
    return "\n\n".join(stories)


def demo_texts(seed: int, calib_chars: int = 200_000, eval_chars: int = 60_000) -> tuple[str, str]:
    """``(calibration text, held-out evaluation text)``; seeds ``3s+1`` and ``3s+2`` while training
    uses ``3s``, so no two of the three texts share a random stream for any ``seed >= 0``."""
    return synthetic_corpus(calib_chars, 3 * seed + 1), synthetic_corpus(eval_chars, 3 * seed + 2)


def train_tokenizer(text: str, vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Byte-level BPE (lossless on any text) with LLaMA's special tokens, prepending ``<s>`` like LLaMA."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],  # ids 0, 1, 2 as in LLaMA
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: never an <unk>
        show_progress=False,
    )
    tok.train_from_iterator(text.split("\n\n"), trainer=trainer)
    # The perplexity protocol tokenizes a whole text once and, as with LLaMA, expects one leading <s>.
    bos = [("<s>", tok.token_to_id("<s>"))]
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=bos)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        clean_up_tokenization_spaces=False,  # else decode() rewrites " ." and round trips break
    )  # fmt: skip


def demo_config(vocab_size: int) -> LlamaConfig:
    """Every linear's in_features (128 or 384) is a multiple of 128, so g128 fits all of them."""
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2,  # GQA: k/v_proj are 128 -> 64, as in LLaMA-2/3
        max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip


@torch.inference_mode()
def window_nll(model: torch.nn.Module, ids: torch.Tensor, seq_len: int = SEQ_LEN) -> float:
    """Mean next-token NLL over non-overlapping ``seq_len`` windows of the token stream ``ids``."""
    n = ids.numel() // seq_len
    windows = ids[: n * seq_len].view(n, seq_len)
    was_training = model.training
    model.eval()
    total = 0.0
    for w in windows.split(16):
        logits = model(w).logits[:, :-1].float()
        total += F.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten(), reduction="sum").item()
    model.train(was_training)
    return total / (n * (seq_len - 1))


def _lr_factor(step: int, progress: float, warmup: int) -> float:
    """Linear warmup over ``warmup`` steps, then cosine from 1 to 0.1 over ``progress`` in [0, 1]."""
    return min(1.0, (step + 1) / warmup) * (0.1 + 0.45 * (1.0 + math.cos(math.pi * min(progress, 1.0))))


def _train(
    model: LlamaForCausalLM, ids: torch.Tensor, seconds: float, max_steps: int | None, seed: int,
    batch_size: int, lr: float,
) -> tuple[int, float]:  # fmt: skip
    """AdamW with warmup + cosine on random ``SEQ_LEN`` windows of ``ids``; returns (steps, last loss)."""
    gen = torch.Generator().manual_seed(seed)  # data order, independent of anything else drawing numbers
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    warmup = max(1, max_steps // 10) if max_steps is not None else 20
    step, loss_value, start = 0, float("nan"), time.monotonic()
    model.train()
    with tqdm(total=max_steps, desc="demo model", unit="step") as bar:
        while True:
            # With max_steps the schedule (and so the weights) depends on the step alone; otherwise it
            # follows the wall clock so that training ends, annealed, after ``seconds`` on any machine.
            progress = step / max_steps if max_steps is not None else (time.monotonic() - start) / seconds
            if progress >= 1.0:
                return step, loss_value
            for group in opt.param_groups:
                group["lr"] = lr * _lr_factor(step, progress, warmup)
            starts = torch.randint(0, ids.numel() - SEQ_LEN, (batch_size,), generator=gen).tolist()
            batch = torch.stack([ids[s : s + SEQ_LEN] for s in starts])
            logits = model(batch).logits[:, :-1]
            loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # early steps at lr 3e-3 can spike
            opt.step()
            step, loss_value = step + 1, loss.item()
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3f}")


def train_demo_model(
    train_seconds: float = 60.0, seed: int = 0, max_steps: int | None = None, *,
    corpus_chars: int = 1_500_000, batch_size: int = 16, lr: float = 3e-3, threads: int = 1,
    vocab_size: int = BYTE_VOCAB,
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast, dict[str, Any]]:  # fmt: skip
    """Build and train the demo model in memory; returns ``(model, tokenizer, demo)`` where ``demo``
    holds the ``calibration`` and held-out ``evaluation`` texts of :func:`demo_texts` and an ``info`` dict.

    ``max_steps`` given: exactly that many steps, ``train_seconds`` ignored, and the weights are a
    function of the arguments alone (bit-identical on one machine). Otherwise training stops after
    ``train_seconds`` of wall time. ``threads`` defaults to 1: this model's matrices are too small to
    gain from more, a fixed count keeps results independent of the core count, and oversubscribed
    OpenMP threads (other jobs on the cores) made steps 20x slower in our measurements.
    """
    if (max_steps is not None and max_steps < 1) or (max_steps is None and train_seconds <= 0):
        raise ConfigError(f"need max_steps >= 1 or train_seconds > 0, got {max_steps} and {train_seconds}")
    text = synthetic_corpus(corpus_chars, 3 * seed)
    # A BPE settles on a small sample; tokenizer training on the whole corpus costs time.
    tokenizer = train_tokenizer(text[:300_000], vocab_size)
    ids = torch.tensor(tokenizer(text).input_ids, dtype=torch.long)
    calib_text, eval_text = demo_texts(seed)
    eval_ids = torch.tensor(tokenizer(eval_text).input_ids, dtype=torch.long)
    log.info("demo corpus: %d chars, %d tokens, vocab %d", len(text), ids.numel(), len(tokenizer))

    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)  # restored below: the caller's setting is not ours to change
    try:
        torch.manual_seed(seed)  # weight init
        model = LlamaForCausalLM(demo_config(len(tokenizer))).float()
        initial_nll = window_nll(model, eval_ids)
        start = time.monotonic()
        steps, loss = _train(model, ids, train_seconds, max_steps, seed, batch_size, lr)
        seconds = time.monotonic() - start
        final_nll = window_nll(model, eval_ids)
    finally:
        torch.set_num_threads(old_threads)
    model.eval()
    info = {"seed": seed, "steps": steps, "train_seconds": round(seconds, 1), "final_train_loss": loss,
            "heldout_ppl_initial": math.exp(initial_nll), "heldout_ppl": math.exp(final_nll),
            "vocab_size": len(tokenizer)}  # fmt: skip
    log.info("demo model: %d steps in %.0f s, train loss %.3f, held-out ppl %.1f -> %.2f", steps, seconds,
             loss, info["heldout_ppl_initial"], info["heldout_ppl"])  # fmt: skip
    return model, tokenizer, {"calibration": calib_text, "evaluation": eval_text, "info": info}


def make_demo_model(
    out_dir: str | Path, train_seconds: float = 60.0, seed: int = 0, max_steps: int | None = None,
    **kwargs: Any,
) -> Path:  # fmt: skip
    """Train (:func:`train_demo_model`, which takes ``kwargs``) and save into ``out_dir``: the model
    (safetensors, float32), the tokenizer, and ``demo_texts.json`` (calibration, evaluation, info)."""
    model, tokenizer, demo = train_demo_model(train_seconds, seed, max_steps, **kwargs)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)  # safetensors is the default; float32 is the dtype it was built in
    tokenizer.save_pretrained(out_dir)
    (out_dir / DEMO_TEXTS_FILE).write_text(json.dumps(demo, indent=1), encoding="utf-8")
    log.info("demo model saved to %s", out_dir)
    return out_dir
