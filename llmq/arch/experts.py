"""Mixture-of-experts experts as plain linears, so calibration hooks see each expert's routed tokens.

transformers 5 stores a layer's experts as fused 3-D parameters (``gate_up_proj [E, 2I, H]``,
``down_proj [E, H, I]``); checkpoints on disk hold one tensor per expert. ``split_experts`` swaps each
fused module for an :class:`ExpertLinears`: one :class:`Expert` (three ``nn.Linear``) per expert, named
as on disk, with the fused module's forward (same routing, routing weights applied after ``down``).
Works on the meta device too (the streaming reader then fills the linears from the per-expert tensors).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn as nn

from llmq.arch.spec import ArchSpec, ExpertNames
from llmq.errors import UnsupportedArchitectureError


class Expert(nn.Module):
    """One expert's gated MLP, ``down(act(gate(x)) * up(x))``, its linears named as in checkpoints."""

    def __init__(self, names: ExpertNames, hidden: int, inter: int, act: Callable[[torch.Tensor], torch.Tensor],
                 dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.names = names
        self.act = act
        for name, (n_in, n_out) in ((names.gate, (hidden, inter)), (names.up, (hidden, inter)),
                                    (names.down, (inter, hidden))):
            self.add_module(name, nn.Linear(n_in, n_out, bias=False, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor, down: bool = True) -> torch.Tensor | None:
        """The expert's output; with ``down=False`` only gate and up run (their inputs observed, nothing returned).
        Weights held in another dtype than ``x``'s run on copies in its dtype, made for this call only."""
        gate, up, down_ = (self.get_submodule(n) for n in (self.names.gate, self.names.up, self.names.down))
        with _weights_in(x.dtype, (gate, up, down_) if down else (gate, up)):
            if not down:
                gate(x)
                up(x)
                return None
            return down_(self.act(gate(x)) * up(x))


@contextlib.contextmanager
def _weights_in(dtype: torch.dtype, linears: tuple[nn.Module, ...]) -> Iterator[None]:
    """Within this context ``linears``' weights are copies in ``dtype``; the stored tensors are put back after, as
    they were. A bf16 model's experts computing in float32 (``llmq.utils.device.compute_in`` leaves them) are thus cast
    one expert at a time, not a whole layer's at once (Qwen3-30B-A3B: 2.4 GB of float32 a layer against 1.2)."""
    held = [(m.weight, m.weight.data) for m in linears  # not a packed kernel's (a loaded checkpoint's) codes
            if isinstance(m, nn.Linear) and m.weight.is_floating_point() and m.weight.dtype != dtype]
    for weight, data in held:
        weight.data = data.to(dtype)
    try:
        yield
    finally:
        for weight, data in held:
            weight.data = data


def experts_of(layer: nn.Module) -> list[ExpertLinears]:
    """The :class:`ExpertLinears` modules in ``layer`` (whose experts cast their weights on use)."""
    return [m for m in layer.modules() if isinstance(m, ExpertLinears)]


class ExpertLinears(nn.ModuleList):
    """Drop-in for transformers' fused experts: ``forward(hidden [T, H], top_k_index [T, k], top_k_weights [T, k])``.

    Each expert runs on the tokens routed to it, its output scaled by their routing weights and summed
    per token, as the fused module. Experts in ``every_token`` (set only while calibration statistics are
    gathered) run on every one of the first ``fill_tokens`` tokens of the calibration stream (None: all of
    them), and on their routed tokens after, so their linears' hooks see those; only the routed tokens' rows
    reach the output, which therefore does not change. ``position`` is where the next call's tokens start in
    that stream.
    """

    def __init__(self, experts: list[Expert]):
        super().__init__(experts)
        self.every_token: frozenset[int] = frozenset()
        self.fill_tokens: int | None = 0
        self.position = 0
        # while statistics are observed (LayerExperts.observing): the experts whose linears are, and whether a down is
        # among them; the others do not run, nor down when none is observed, and the output is not computed
        self.observed: frozenset[int] | None = None
        self.observe_down = True
        # while only gate/up are observed (no down): where the every_token experts' common rows go, once per call,
        # instead of into each expert's linears (LayerExperts.fill_shared); each then sees its routed rows after them
        self.fill_sink: Callable[[torch.Tensor], None] | None = None

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
                ) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        n = hidden_states.shape[0]
        # this call's leading tokens the every_token experts take
        fill = n if self.fill_tokens is None else min(max(self.fill_tokens - self.position, 0), n)
        self.position += n
        hit = torch.bincount(top_k_index.flatten(), minlength=len(self))[: len(self)]
        filled = self.every_token if fill else frozenset()
        # the filled experts' common rows, summed once for all of them: only their gate/up's statistics are taken
        sink = self.fill_sink if self.fill_tokens is not None and not self.observe_down else None
        if sink is not None and filled & self.observed:
            sink(hidden_states[:fill])
        for e in sorted(set(hit.nonzero().flatten().tolist()) | filled):
            if self.observed is not None and e not in self.observed:
                continue
            token_idx, pos = torch.where(top_k_index == e)  # token_idx ascending: a token picks an expert once
            back = None  # the rows of the expert's output that are its routed tokens' (None: all of them, in order)
            if e not in filled:
                x = hidden_states[token_idx]
            elif sink is not None:  # the common rows went to the sink: its routed
                # rows after them (maybe none; the call still tells its gate and up apart from other experts)
                self[e](hidden_states[token_idx[token_idx >= fill]], down=False)
                continue
            elif self.fill_tokens is None:  # every token of every call: one input object for all of them, whose
                # statistics are the same and are summed once (llmq.job.methods.SharedHessians tells them by identity)
                x, back = hidden_states, token_idx
            else:  # the first ``fill`` tokens, then the routed ones after them: a tensor of its own for each expert,
                # even when it is every token, since a later call gives each its own rows (sharing must not join
                # two experts' statistics then)
                later = token_idx[token_idx >= fill]
                x = torch.cat([hidden_states[:fill], hidden_states[later]])
                back = torch.cat([token_idx[: token_idx.numel() - later.numel()],
                                  torch.arange(fill, fill + later.numel(), device=token_idx.device)])
            if self.observed is not None:  # statistics only: the hooks take the inputs, the output is never used
                self[e](x, down=self.observe_down)
                continue
            y = self[e](x)
            y = y if back is None else y[back]
            out.index_add_(0, token_idx, (y * top_k_weights[token_idx, pos, None]).to(out.dtype))
        return out


def _fused_to_linears(fused: nn.Module, names: ExpertNames) -> ExpertLinears:
    gate_up, down = getattr(fused, "gate_up_proj", None), getattr(fused, "down_proj", None)
    if not isinstance(gate_up, torch.Tensor) or not isinstance(down, torch.Tensor) or gate_up.dim() != 3:
        raise UnsupportedArchitectureError(
            f"{type(fused).__name__} is not transformers' fused experts layout (gate_up_proj [E, 2I, H], down_proj "
            "[E, H, I]); the table's MoE entry does not match this model")
    if any(getattr(fused, b, None) is not None for b in ("gate_up_proj_bias", "down_proj_bias")):
        raise UnsupportedArchitectureError(f"{type(fused).__name__} has expert biases, which llmq does not support")
    n_experts, two_inter, hidden = gate_up.shape
    inter = two_inter // 2
    experts = []
    for e in range(n_experts):
        expert = Expert(names, hidden, inter, fused.act_fn, gate_up.dtype, gate_up.device)
        if gate_up.device.type != "meta":
            with torch.no_grad():  # transformers' order: gate rows first, then up (``.chunk(2, dim=-1)``)
                expert.get_submodule(names.gate).weight.copy_(gate_up[e, :inter])
                expert.get_submodule(names.up).weight.copy_(gate_up[e, inter:])
                expert.get_submodule(names.down).weight.copy_(down[e])
        experts.append(expert)
    return ExpertLinears(experts)


def split_experts(model: nn.Module, spec: ArchSpec) -> int:
    """Replace the fused experts of every sparse layer by :class:`ExpertLinears`; returns how many were split.

    Idempotent. Sparse layers come from the model's config (``spec.moe.sparse``); a sparse layer
    whose MoE block is missing is an error naming the mismatch.
    """
    if spec.moe is None:
        return 0
    m, split = spec.moe, 0
    for index, layer in enumerate(model.get_submodule(spec.layers)):
        if not spec.is_sparse(model.config, index):
            continue
        path = f"{m.block}.{m.experts}"
        try:
            fused = layer.get_submodule(path)
        except AttributeError:
            raise UnsupportedArchitectureError(
                f"layer {index} should be sparse by the model's config but has no {path}: the table's MoE entry "
                "and the model disagree") from None
        if isinstance(fused, ExpertLinears):
            continue
        setattr(layer.get_submodule(m.block), m.experts, _fused_to_linears(fused, m.names))
        split += 1
    return split


class LayerExperts:
    """The experts of one decoder layer, as the quantization methods see them (names relative to the layer).

    ``members[expert]`` are the expert's linears; :meth:`count` runs the router on the calibration
    inputs and returns the tokens routed to each expert; :meth:`every_token` makes chosen experts see
    every token of the first windows while their statistics are gathered.
    """

    def __init__(self, layer: nn.Module, spec: ArchSpec, config: Any, index: int):
        m = spec.moe
        self.module_name = f"{m.block}.{m.experts}"
        self.module: ExpertLinears = layer.get_submodule(self.module_name)
        self.members = {e: [f"{e}.{n}" for n in (m.names.gate, m.names.up, m.names.down)]
                        for e in spec.experts(config)}
        self.of = {linear: e for e, linears in self.members.items() for linear in linears}
        self.downs = {f"{e}.{m.names.down}" for e in self.members}
        self.index = {e: i for i, e in enumerate(self.members)}  # expert name -> its place in ``module``
        self._keeping: Callable[..., None] | None = None  # the layer's observe, within inputs_kept
        self._kept: list[tuple[tuple, dict]] | None = None  # the experts module's arguments, batch by batch

    def _calls(self, observe: Callable[..., None], fn: Callable[..., None]) -> None:
        """``fn(*args, **kwargs)`` with the experts module's arguments of each calibration batch: one pass of the
        layer up to the experts, or within :meth:`inputs_kept` the arguments kept from the first such pass."""
        def one_pass(fn: Callable[..., None]) -> None:
            handle = self.module.register_forward_pre_hook(lambda module, args, kwargs: fn(*args, **kwargs),
                                                           with_kwargs=True)  # before observe's, which stops the pass
            try:
                observe({self.module_name: self.module}, lambda name, x: None)
            finally:
                handle.remove()
        if self._keeping is None:
            one_pass(fn)
            return
        if self._kept is None:
            kept: list[tuple[tuple, dict]] = []
            one_pass(lambda *args, **kwargs: kept.append((args, kwargs)))
            self._kept = kept
        for args, kwargs in self._kept:
            fn(*args, **kwargs)

    def count(self, observe: Callable[..., None]) -> dict[str, int]:
        """Tokens the router sends to each expert over all calibration windows (one pass up to the experts)."""
        counts = torch.zeros(len(self.module), dtype=torch.int64)

        def add(hidden: torch.Tensor, top_k_index: torch.Tensor, *rest: Any, **kwargs: Any) -> None:
            counts.add_(torch.bincount(top_k_index.flatten().cpu(), minlength=len(self.module))[: len(self.module)])
        self._calls(observe, add)
        return dict(zip(self.members, counts.tolist(), strict=True))

    @contextlib.contextmanager
    def inputs_kept(self, observe: Callable[..., None]) -> Iterator[None]:
        """Within this context the experts module's inputs (the block's hidden states after its router, the
        routing) are computed once, on first use, and kept: :meth:`observe` then starts every pass at the experts.
        Valid while nothing before the experts changes (attention, norms, router; an AWQ fold), so it spans one
        group of experts' linears: Qwen3-30B-A3B's gate/up group took six passes through the attention, each 2.5
        TFLOP at 128 x 512 tokens. Costs the block's inputs in the compute dtype (537 MB there in float32)."""
        self._keeping = observe
        try:
            yield
        finally:
            self._keeping, self._kept = None, None

    def observe(self, modules: dict[str, nn.Module], fn: Callable[[str, torch.Tensor], None]) -> bool:
        """Within :meth:`inputs_kept`, observe ``modules`` (experts' linears only) over every calibration window
        from the kept inputs, as the layer's ``observe`` does; False (nothing done) when that does not apply."""
        if self._keeping is None or not modules or any(name not in self.of for name in modules):
            return False
        handles = [m.register_forward_pre_hook(lambda module, args, name=name: fn(name, args[0]))
                   for name, m in modules.items()]
        try:
            with torch.no_grad():
                self._calls(self._keeping, self.module)
        finally:
            for h in handles:
                h.remove()
        return True

    @contextlib.contextmanager
    def observing(self, linears: set[str]) -> Iterator[None]:
        """Within this context, a forward that gathers the statistics of ``linears`` runs only the experts among
        them, and their ``down`` only when one is listed: a chunk of Qwen3-30B-A3B's experts' gate/up ran all 128
        experts whole before. The layer's output is then wrong, which an observing forward never uses."""
        experts = {self.of[n] for n in linears if n in self.of}
        if not experts:
            yield
            return
        m = self.module
        m.observed, m.observe_down = frozenset(self.index[e] for e in experts), bool(self.downs & set(linears))
        try:
            yield
        finally:
            m.observed, m.observe_down = None, True

    @contextlib.contextmanager
    def every_token(self, experts: set[str], fill_tokens: int | None = None, position: int = 0) -> Iterator[None]:
        """Within this context ``experts`` see every one of the first ``fill_tokens`` calibration tokens (None: all
        of them), and their routed tokens after them; this process's first token is ``position`` in that stream."""
        m = self.module
        m.every_token, m.fill_tokens, m.position = frozenset(self.index[e] for e in experts), fill_tokens, position
        try:
            yield
        finally:
            m.every_token, m.fill_tokens, m.position = frozenset(), 0, 0

    @contextlib.contextmanager
    def fill_shared(self, sink: Callable[[torch.Tensor], None] | None) -> Iterator[None]:
        """Within this context, while only the gate/up of ``every_token`` experts filled for part of the stream are
        observed, the rows every one of them reads go to ``sink`` once per call, and each expert's linears see only
        their routed rows after them: the caller adds the sink's statistics to each one's (Qwen3-30B-A3B: 66
        starved experts summed the same 32,768-token Gram matrix, and ran gate/up over it, each on its own)."""
        self.module.fill_sink = sink
        try:
            yield
        finally:
            self.module.fill_sink = None
