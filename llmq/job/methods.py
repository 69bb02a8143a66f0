"""Quantization methods, one function per decoder layer with the same signature.

A method receives a ``LayerJob`` (the layer, its true-sequential groups, and a way to observe the
inputs of chosen linears on the calibration data) and returns the quantized weight of every
linear it handled. It writes the dequantized weights back into the layer, so the pipeline can
compute the quantized layer's outputs as the next layer's inputs.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from llmq.algorithms.awq import can_fold, fold_scales, search_clip, search_scale
from llmq.algorithms.ggml import GgmlGrid
from llmq.algorithms.ggml_gptq import gptq_ggml, rtn_ggml
from llmq.algorithms.gptq import GPTQResult, HessianAccumulator, gptq_quantize
from llmq.algorithms.quant import QuantizedWeight, rtn_quantize
from llmq.algorithms.tune import tune_block
from llmq.arch import ScaleGroup
from llmq.arch.experts import LayerExperts
from llmq.config import QuantConfig
from llmq.errors import WeightError
from llmq.job.distributed import SINGLE, Ranks
from llmq.utils.timing import StageTimes

log = logging.getLogger(__name__)


@dataclass
class LayerJob:
    index: int
    prefix: str  # "model.layers.3." : prefix of this layer's module names in the model
    groups: tuple[dict[str, nn.Linear], ...]  # true-sequential groups of linears, by name in the layer
    cfg: QuantConfig
    # observe(modules, fn, windows=None): run the layer over the calibration inputs (the first
    # ``windows`` of them, or all), calling fn(name, x) with each listed module's input batch; stops
    # each batch early once all of them have run.
    observe: Callable[..., None]
    layer: nn.Module | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)  # the layer's keyword arguments (mask, rotary)
    scale_groups: tuple[ScaleGroup, ...] = ()
    batch_size: int = 8
    # AWQ search results: ``record(name, tensor)`` saves one; ``awq_state`` re-applies saved ones
    record: Callable[[str, torch.Tensor], None] = lambda name, tensor: None
    awq_state: dict[str, torch.Tensor] | None = None
    timer: StageTimes = field(default_factory=StageTimes)  # where the layer's time goes
    windows: int = 1  # calibration windows, of ``seqlen`` tokens each
    seqlen: int = 1
    experts: LayerExperts | None = None  # a mixture-of-experts layer's experts
    # note(key, value): JSON-able facts for the checkpoint's metadata (each expert's tokens and policy)
    note: Callable[[str, Any], None] = lambda key, value: None
    _policies: dict[str, str] | None = None
    _first_token: int = 0  # where this rank's windows start in the calibration stream
    _total_windows: int = 0  # calibration windows over all ranks
    # methods that tune against a teacher (``needs_teacher``) get the layer's inputs in the quantized model and
    # the FP layer's outputs on the FP model's inputs, both ``[windows, seqlen, hidden]``
    inputs: torch.Tensor | None = None
    targets: torch.Tensor | None = None
    # mixed precision: the settings of linears (by name in the layer) quantized at another width than ``cfg``'s
    widths: dict[str, QuantConfig] = field(default_factory=dict)
    # torch.distributed: this rank's place; ``observe`` sees only its windows, so statistics are summed across
    # ranks before they are used, and the solves are shared out (llmq.job.distributed)
    ranks: Ranks = SINGLE
    # what the layer's progress line says of it (llmq.utils.timing.LayerProgress): the methods' losses
    summary: dict[str, Any] = field(default_factory=dict)
    # GGUF runs (llmq.formats.gguf): the llama.cpp type each linear is rounded onto, by name in the layer
    ggml_types: dict[str, str] = field(default_factory=dict)

    def add_loss(self, what: str, loss: float) -> None:
        """Add ``loss`` to the layer's summary under ``what`` (summed over its linears)."""
        self.summary[what] = self.summary.get(what, 0.0) + float(loss)

    def cfg_for(self, linear: str) -> QuantConfig:
        """The settings ``linear`` is quantized with: its own width's in a mixed-precision run, else ``cfg``."""
        return self.widths.get(linear, self.cfg)

    def rtn(self, linear: str, W: torch.Tensor) -> QuantizedWeight | GgmlGrid:
        """Round ``linear``'s weights to nearest on its grid: its GGUF type's (llama.cpp's weighted scale
        search) in a GGUF run, else its width's."""
        ggml_type = self.ggml_types.get(linear)
        return rtn_ggml(W, ggml_type) if ggml_type else rtn_quantize(W, self.cfg_for(linear))

    def gptq(self, linear: str, W: torch.Tensor, H: torch.Tensor) -> GPTQResult:
        """GPTQ of ``linear``'s (possibly stacked) rows onto its grid, as :meth:`rtn` chooses it."""
        cfg, ggml_type = self.cfg_for(linear), self.ggml_types.get(linear)
        if ggml_type:
            return gptq_ggml(W, H, ggml_type, cfg.act_order, cfg.damp_percent, cfg.block_size)
        return gptq_quantize(W, H, cfg)

    def expert_policies(self) -> dict[str, str]:
        """Expert name -> where its calibration statistics come from: ``"routed"`` (its routed tokens),
        ``"all_tokens"`` (every token of the first windows pushed through it, see :meth:`fill_tokens`, then its
        routed tokens) or ``"rtn"`` (none: round to nearest).

        Counted once per layer (after the attention before it is quantized, so on the tokens that reach
        it): experts with at least ``cfg.expert_min_tokens`` tokens (default: their input width, below
        which a Hessian is singular) use their routed tokens; the others ``cfg.expert_policy``, except
        that ``"routed"`` with no token at all is ``"rtn"``. Logged, and noted for the metadata.
        """
        if self.experts is None:
            return {}
        if self._policies is None:
            counts = self.experts.count(self.observe)
            if self.ranks.active:  # every rank decides on the tokens of all of them
                total = self.ranks.sum_(torch.tensor(list(counts.values()), dtype=torch.int64,
                                                     device=self.ranks.device))
                counts = dict(zip(counts, total.tolist(), strict=True))
            self._policies, starved = {}, []
            for expert, n in counts.items():
                width = self.layer.get_submodule(self.experts.members[expert][0]).in_features
                if n >= (self.cfg.expert_min_tokens or width):
                    policy = "routed"
                else:
                    policy = "rtn" if n == 0 and self.cfg.expert_policy == "routed" else self.cfg.expert_policy
                    starved.append(f"{expert} ({n}: {policy})")
                self._policies[expert] = policy
                self.note(self.prefix + expert, {"tokens": n, "policy": policy})
            first, self._total_windows = self.ranks.place(self.windows)
            self._first_token = first * self.seqlen
            log.info("layer %d: tokens per expert %d to %d%s", self.index, min(counts.values()), max(counts.values()),
                     "; too few for " + ", ".join(starved) if starved else "")
            filled = [n for e, p in self._policies.items() if p == "all_tokens" for n in self.experts.members[e]]
            if filled:
                fills = {self.layer.get_submodule(n).in_features: self.fill_tokens([n]) for n in filled}
                log.info("layer %d: starved experts see every token of %s, then their routed tokens", self.index,
                         ", ".join(("every window" if fill is None else f"the first {fill // self.seqlen} windows")
                                   + f" ({width}-wide inputs)" for width, fill in sorted(fills.items())))
        return self._policies

    def fill_tokens(self, linears: list[str]) -> int | None:
        """How many of the first calibration tokens (whole windows, over all ranks) ``"all_tokens"`` experts see
        while ``linears`` are observed: ``cfg.expert_fill_tokens``, by default 16 times the widest of their input
        widths (Qwen3-30B-A3B: 64 windows of 512 for gate/up, 24 for down, whose Hessian is 768 wide); None: every
        window."""
        want = self.cfg.expert_fill_tokens or 16 * max(self.layer.get_submodule(n).in_features for n in linears)
        fill = -(-want // self.seqlen)
        return None if fill >= self._total_windows else fill * self.seqlen

    def policy_of(self, linear: str) -> str | None:
        """The expert policy of ``linear`` (None when it is not an expert's)."""
        if self.experts is None or linear not in self.experts.of:
            return None
        return self.expert_policies()[self.experts.of[linear]]

    def observe_statistics(self, modules: dict[str, nn.Linear], fn: Callable[[str, torch.Tensor], None],
                           windows: int | None = None,
                           common: Callable[[list[str], torch.Tensor], None] | None = None) -> None:
        """``observe`` for calibration statistics: an expert's inputs are those its policy names (its routed
        tokens, or with ``"all_tokens"`` every token of the first windows, then its routed tokens); ``"rtn"``
        experts are not observed. With ``common``, the first windows' tokens that several starved experts'
        gate/up all read may come once as ``common(those linears, x)`` instead of to each through ``fn``."""
        by_policy: dict[str, dict[str, nn.Linear]] = {"routed": {}, "all_tokens": {}, "rtn": {}}
        for name, module in modules.items():
            by_policy[self.policy_of(name) or "routed"][name] = module
        observing = self.experts.observing if self.experts is not None else lambda names: contextlib.nullcontext()

        def observe(modules: dict[str, nn.Linear]) -> None:  # from the experts' kept inputs where it can
            if windows is not None or self.experts is None or not self.experts.observe(modules, fn):
                self.observe(modules, fn, windows)
        if by_policy["routed"]:
            with observing(set(by_policy["routed"])):
                observe(by_policy["routed"])
        if by_policy["all_tokens"]:
            names = list(by_policy["all_tokens"])
            experts = {self.experts.of[n] for n in names}
            sink = (lambda x: common(names, x)) if common is not None else None
            with self.experts.every_token(experts, self.fill_tokens(names), self._first_token), \
                    observing(set(names)), self.experts.fill_shared(sink):
                observe(by_policy["all_tokens"])

    def expert_inputs_kept(self) -> contextlib.AbstractContextManager:
        """Within this context the experts' statistics are observed from their inputs computed once (see
        :meth:`LayerExperts.inputs_kept`): open it around one group of linears, which changes nothing before them."""
        return self.experts.inputs_kept(self.observe) if self.experts is not None else contextlib.nullcontext()


def check_finite(name: str, tensor: torch.Tensor, what: str = "weight") -> None:
    bad = (~torch.isfinite(tensor)).sum().item()
    if bad:
        raise WeightError(
            f"{what} of {name} has {bad} NaN/Inf value(s): the checkpoint is corrupt or comes from a "
            "diverged run; re-export it (or load it in float32 if fp16 overflowed) before quantizing"
        )


def write_back(module: nn.Linear, qw: QuantizedWeight) -> None:
    module.weight.data = qw.dequantize().to(module.weight.dtype).to(module.weight.device)


def rtn_layer(job: LayerJob) -> dict[str, QuantizedWeight]:
    """Round to nearest: needs no calibration data."""
    results = {}
    for group in job.groups:
        for name, module in group.items():
            check_finite(job.prefix + name, module.weight)
            with job.timer("solve"):
                results[name] = job.rtn(name, module.weight.data)
            write_back(module, results[name])
    return results


class SharedHessians:
    """One Hessian per distinct input: linears fed the same tensor (q/k/v, gate/up) share it.

    Sharing is decided when a linear is first seen, by storage identity with an input still alive: linears that
    share an input are called on one tensor object within one forward, and only weak references to the owners'
    latest inputs are kept, so a freed tensor's memory can never be mistaken for a shared input, and none is kept
    alive (an MoE layer's 128 expert down_proj inputs held for this took 805 MB for 8 x 512 tokens).
    """

    def __init__(self, modules: dict[str, nn.Linear], timer: StageTimes,
                 check: Callable[[str, torch.Tensor], None] = lambda name, H: None, exact: bool = False):
        self.modules, self.timer, self.check, self.exact = modules, timer, check, exact
        self.accs: dict[str, HessianAccumulator] = {}
        self.owner: dict[str, str] = {}  # linear -> the linear whose accumulator it uses
        self.last: dict[str, weakref.ref[torch.Tensor]] = {}
        self.done: dict[str, torch.Tensor] = {}  # owner -> H, while linears sharing it are being solved
        self.users: dict[str, int] = {}
        # inputs that several linears read besides their own (starved experts' first windows), summed once
        self.common: HessianAccumulator | None = None
        self.with_common: set[str] = set()

    def add(self, name: str, x: torch.Tensor) -> None:
        if name not in self.owner:
            alive = ((o, ref()) for o, ref in self.last.items())
            same = [o for o, prev in alive if prev is not None and prev.data_ptr() == x.data_ptr()
                    and prev.shape == x.shape and prev.stride() == x.stride()]
            self.owner[name] = same[0] if same else name
            self.users[self.owner[name]] = self.users.get(self.owner[name], 0) + 1
            if not same:
                self.accs[name] = self._accumulator(name)
        if self.owner[name] != name:
            return
        self.last[name] = weakref.ref(x)
        with self.timer("hessian"):
            self.accs[name].add(x)

    def add_common(self, names: list[str], x: torch.Tensor) -> None:
        """``x`` is read by every one of ``names`` besides its own inputs: summed once here, added to each one's sum
        before its Hessian is taken (``2/n sum x x^T`` is a sum over tokens, so the parts add)."""
        if self.common is None:
            self.common = self._accumulator(names[0])
        self.with_common.update(names)
        with self.timer("hessian"):
            self.common.add(x)

    def _add_common_to_owners(self) -> None:
        if self.common is None:
            return
        for owner in dict.fromkeys(self.owner[n] for n in sorted(self.with_common)):
            acc = self.accs[owner]
            acc.sum += self.common.sum
            acc.n_tokens += self.common.n_tokens
        self.common, self.with_common = None, set()

    def _accumulator(self, name: str) -> HessianAccumulator:
        module = self.modules[name]
        return HessianAccumulator(module.in_features, module.weight.device, exact=self.exact)

    def reduce(self, ranks: Ranks, names: list[str]) -> None:
        """Sum every accumulator across ranks (``names``: the group's observed linears, in order). A rank where a
        linear saw no token (an expert routed nothing from its windows) takes its sharing from the others'. Inputs
        added once for several linears (:meth:`add_common`) are first added to each one's own."""
        self._add_common_to_owners()
        if not ranks.active:
            return
        owners: dict[str, str] = {}
        for seen in ranks.gather_json({n: self.owner[n] for n in names if n in self.owner}):
            for name, owner in seen.items():
                if owners.setdefault(name, owner) != owner:
                    raise RuntimeError(f"ranks disagree on which linears share {name}'s input ({owners[name]} or "
                                       f"{owner})")
        for name in names:
            owner = owners.get(name, name)
            if name not in self.owner:
                self.owner[name] = owner
                self.users[owner] = self.users.get(owner, 0) + 1
            if owner == name and name not in self.accs:
                self.accs[name] = self._accumulator(name)
        for name in names:
            if self.owner[name] == name:
                acc = self.accs[name]
                with self.timer("hessian"):
                    ranks.sum_(acc.sum)
                acc.n_tokens = ranks.sum_int(acc.n_tokens)

    def hessian(self, name: str, users: int = 1) -> torch.Tensor:
        """``name``'s Hessian, for ``users`` of the linears sharing it; the accumulator is spent on first use and H
        dropped after its last user."""
        self.last.clear()
        owner = self.owner[name]
        if owner not in self.done:
            self.done[owner] = self.accs.pop(owner).hessian()
            self.check(owner, self.done[owner])
        H = self.done[owner]
        self.users[owner] -= users
        if not self.users[owner]:
            del self.done[owner]
        return H


HESSIAN_BYTES = 1 << 30  # Hessian sums gathered at once: a MoE group is observed in chunks of experts


def _chunks(job: LayerJob, group: dict[str, nn.Linear]) -> list[dict[str, nn.Linear]]:
    """``group`` in parts whose Hessians fit in ``HESSIAN_BYTES`` (an expert's linears stay together).

    Experts read the block's input in parallel, so an expert's inputs do not depend on the others being
    quantized already: observing them chunk by chunk changes no result. Qwen3-30B-A3B's 128 experts' gate/up
    Hessians are 2.1 GB at once, Qwen3-235B's 8.6 GB; a dense group is one part.
    """
    if job.experts is None or not any(n in job.experts.of for n in group):
        return [group]
    units: dict[str, dict[str, nn.Linear]] = {}
    for name, module in group.items():
        units.setdefault(job.experts.of.get(name, ""), {})[name] = module  # "": the shared expert's
    chunks: list[dict[str, nn.Linear]] = [{}]
    used = 0
    for unit in units.values():
        # linears of one expert in a group share their input; exact sums are float64
        size = (8 if job.cfg.exact_sums else 4) * next(iter(unit.values())).in_features ** 2
        if chunks[-1] and used + size > HESSIAN_BYTES:
            chunks.append({})
            used = 0
        chunks[-1].update(unit)
        used += size
    return chunks


def gptq_layer(job: LayerJob) -> dict[str, QuantizedWeight]:
    """GPTQ, group by group: each group's Hessians come from inputs through the quantized groups before it.

    In a mixture of experts each expert's Hessian is built from its routed tokens; experts with too
    few follow :meth:`LayerJob.expert_policies`.
    """
    groups = job.groups if job.cfg.true_sequential else ({k: v for g in job.groups for k, v in g.items()},)
    results = {}
    for g in groups:
        # a group's experts are observed chunk by chunk, from block inputs computed once for all chunks (in one
        # group with the attention, as without true-sequential, those of the FP attention, as one pass sees)
        with job.expert_inputs_kept():
            for group in _chunks(job, g):
                results.update(_gptq_group(job, group))
    return results


def _gptq_group(job: LayerJob, group: dict[str, nn.Linear]) -> dict[str, QuantizedWeight]:
    """GPTQ on the linears of ``group``, observed together."""
    for name, module in group.items():
        check_finite(job.prefix + name, module.weight)
    policy = {name: job.policy_of(name) for name in group}
    hessians = SharedHessians(group, job.timer, check=lambda name, H: check_finite(
        job.prefix + name, H, "calibration Hessian (inputs overflowed?)"), exact=job.cfg.exact_sums)
    with job.timer("observe"):
        job.observe_statistics(group, hessians.add, common=hessians.add_common)
    hessians.reduce(job.ranks, [name for name in group if policy[name] != "rtn"])
    done = {}
    for names in _joint_solves(job, group, policy, hessians):
        with job.timer("solve"):
            if policy[names[0]] == "rtn":
                solved = {names[0]: job.rtn(names[0], group[names[0]].weight.data)}
                log.info("layer %d %-22s RTN (no calibration tokens)", job.index, names[0])
            else:  # with several ranks, each solves its share of the rows, and they are gathered
                solved = _gptq_joint(job, {n: group[n] for n in names}, hessians)
        for name, qw in solved.items():
            if job.ranks.active and policy[name] != "rtn":
                with job.timer("share"):
                    qw = job.ranks.gather_weight(qw, group[name].out_features)
            done[name] = qw
            write_back(group[name], qw)
    return {name: done[name] for name in group}


JOINT_BYTES = 128 << 20  # float32 weight rows solved together at most (one H, one pass of the column loop)


def _joint_solves(job: LayerJob, group: dict[str, nn.Linear], policy: dict[str, str | None],
                  hessians: SharedHessians) -> list[list[str]]:
    """``group``'s linears in the order they are solved, those sharing a Hessian and their settings together (q/k/v,
    gate/up, the starved experts that all see every token), up to ``JOINT_BYTES`` of rows at a time; RTN ones alone.

    GPTQ solves each row on its own with the whole ``H^-1`` (so do the range searches), so stacking the rows of
    linears that share ``H`` changes no result; it runs the column loop once where it ran once per linear, which on
    the experts' small weights (768 x 2048) is mostly Python overhead.
    """
    solves: list[list[str]] = []
    open_: dict[tuple, tuple[list[str], int]] = {}  # (owner, settings) -> the solve being filled, its bytes
    for name, module in group.items():
        if policy[name] == "rtn":
            solves.append([name])
            continue
        key = (hessians.owner[name], job.cfg_for(name), job.ggml_types.get(name))
        size = 4 * module.weight.numel()
        joint, used = open_.get(key, (None, 0))
        if joint is None or used + size > JOINT_BYTES:
            joint, used = [], 0
            solves.append(joint)
        joint.append(name)
        open_[key] = (joint, used + size)
    return solves


def _gptq_joint(job: LayerJob, linears: dict[str, nn.Linear], hessians: SharedHessians
                ) -> dict[str, QuantizedWeight]:
    """GPTQ on the stacked rows (this rank's share of each) of linears sharing one Hessian and their settings."""
    names = list(linears)
    parts = [m.weight.data[job.ranks.rows(m.out_features)] for m in linears.values()]
    W = parts[0] if len(parts) == 1 else torch.cat(parts)
    # H passed inline: the solver frees it once it has H^-1
    res = job.gptq(names[0], W, hessians.hessian(names[0], users=len(names)))
    del W
    log.info("layer %d %-22s loss %.5g damp %.3g", job.index, " ".join(names), res.loss, res.damp)
    job.add_loss("GPTQ loss", res.loss)
    if len(names) == 1:
        return {names[0]: res.weight}
    bounds = itertools.pairwise(itertools.accumulate((p.shape[0] for p in parts), initial=0))
    return {n: res.weight.row_slice(a, b) for n, (a, b) in zip(names, bounds, strict=True)}


def _inspector(module: nn.Module, kwargs: dict[str, Any]) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> module(x)``; attention modules also get the layer's mask and rotary arguments."""
    takes_kwargs = not isinstance(module, nn.Linear) and "position_embeddings" in inspect.signature(
        module.forward).parameters
    return (lambda x: module(x, **kwargs)) if takes_kwargs else module


def _compared(layer: nn.Module, inspect: str | tuple[str, ...], kwargs: dict[str, Any],
              ) -> Callable[[torch.Tensor], torch.Tensor]:
    """What a scale search compares: the named module's output, or the sum of several modules' outputs when
    they read the same input in parallel (Cohere's attention and MLP, added to the residual together)."""
    names = (inspect,) if isinstance(inspect, str) else inspect
    fns = [_inspector(layer.get_submodule(name), kwargs) for name in names]
    if len(fns) == 1:
        return fns[0]
    return lambda x: sum(_first_output(fn(x)) for fn in fns)


def _first_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _gptq_rounding(x: torch.Tensor, cfg: QuantConfig) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``(W diag(s), s) -> GPTQ(W diag(s))`` with the Hessian of the scaled inputs, ``H / (s s^T)``."""
    acc = HessianAccumulator(x.shape[-1], x.device)
    for i in range(0, x.shape[0], 8):  # a few windows at a time: no float32 copy of all of x
        acc.add(x[i : i + 8])
    H = acc.hessian()

    def rounding(ws: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        s = s.to(H.device)
        return gptq_quantize(ws, H / (s[:, None] * s[None, :]), cfg).weight.dequantize()
    return rounding


def _gather_inputs(job: LayerJob, name: str, windows: int) -> torch.Tensor | None:
    """Module ``name``'s inputs on the first ``windows`` calibration windows (None when it saw no token there):
    ``[windows, seqlen, in]``, or ``[tokens, in]`` for an expert, which sees only its routed tokens. With several
    ranks, those of all ranks' windows among the first ``windows``, on every rank."""
    start, _ = job.ranks.place(job.windows)
    batches: list[torch.Tensor] = []
    job.observe_statistics({name: job.layer.get_submodule(name)}, lambda _, x: batches.append(x.clone()),
                           max(0, windows - start))
    return job.ranks.cat(torch.cat(batches) if batches else None)


def _stream_starts(job: LayerJob, names: list[str], first_window: int) -> dict[str, int]:
    """Where this rank's stream of each linear's input tokens starts in the stream over all ranks' windows: at its
    first window's first token, except for an expert's (its routed tokens, after every token of the first windows
    for an ``"all_tokens"`` one), counted in one more pass."""
    routed = [n for n in names if job.policy_of(n) in ("routed", "all_tokens")] if job.ranks.active else []
    seen = dict.fromkeys(routed, 0)

    def count(name: str, x: torch.Tensor) -> None:
        seen[name] += x.reshape(-1, x.shape[-1]).shape[0]
    if routed:
        job.observe_statistics({n: job.layer.get_submodule(n) for n in routed}, count)
    before = job.ranks.gather_json(seen)[: job.ranks.rank]
    return {n: sum(b[n] for b in before) if n in seen else first_window * job.seqlen for n in names}


def _sample_inputs(job: LayerJob, names: list[str], n_tokens: int) -> dict[str, torch.Tensor]:
    """Each named linear's inputs at ``n_tokens`` tokens evenly spaced over all calibration tokens
    (``x.reshape(-1, in)[::stride][:n_tokens]`` of all of them, over all ranks' windows), keeping only those
    tokens; an expert's stream is its routed tokens, and a linear that saw none is left out."""
    first_window, windows = job.ranks.place(job.windows)
    total = windows * job.seqlen
    keep = torch.arange(0, total, max(1, total // n_tokens))[:n_tokens]
    samples: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    seen = _stream_starts(job, names, first_window)

    def take(name: str, x: torch.Tensor) -> None:
        flat = x.reshape(-1, x.shape[-1])
        start = seen[name]
        seen[name] += flat.shape[0]
        idx = keep[(keep >= start) & (keep < seen[name])] - start
        samples[name].append(flat[idx.to(flat.device)].clone())
    job.observe_statistics({name: job.layer.get_submodule(name) for name in names}, take)
    gathered = {name: job.ranks.cat(torch.cat(xs) if xs else None) for name, xs in samples.items()}
    return {name: x for name, x in gathered.items() if x is not None and x.shape[0]}


def _search_scale(job: LayerJob, x: torch.Tensor, linears: list[nn.Linear], compared: Callable, cfg: QuantConfig,
                  quantize_fn: Callable | None) -> tuple[torch.Tensor, float]:
    """:func:`search_scale`, each rank trying its share of the grid on the same inputs; every rank picks the
    point one process would."""
    ranks = job.ranks

    def every_ranks(mine: dict[int, float]) -> dict[int, float]:
        return {int(i): float(loss) for part in ranks.gather_json({str(i): v for i, v in mine.items()})
                for i, loss in part.items()}
    return search_scale(x, linears, compared, cfg, cfg.awq_grid, cfg.awq_duo, quantize_fn, job.batch_size * job.seqlen,
                        candidates=range(ranks.rank, cfg.awq_grid, ranks.world), gather=every_ranks)


def apply_awq(job: LayerJob, gptq_rounding: bool = False) -> None:
    """AWQ (Lin et al., 2024): fold activation-aware scales into the layer, then clip each weight.

    Scales and clips come from the search or from ``job.awq_state``; either way they are recorded.
    With ``gptq_rounding`` the scale search rounds each candidate with GPTQ (on the Hessian of the
    scaled inputs) and there is no clipping: GPTQ picks its ranges with its own search, and AWQ's
    clips and RTN-chosen scales both made GPTQ worse (stories260K W3 g32: 8.11 with them against
    7.99 for GPTQ alone).
    """
    _fold_scales(job, gptq_rounding)
    if not gptq_rounding:
        _clip_weights(job)


def search_windows(cfg: QuantConfig, seqlen: int) -> int:
    """Calibration windows the scale search runs on: at most ``cfg.awq_max_tokens`` tokens' worth."""
    return max(1, cfg.awq_max_tokens // seqlen)


def awq_search_bytes(cfg: QuantConfig, windows: int, seqlen: int, widest_input: int, hidden: int,
                     itemsize: int) -> int:
    """Memory the scale search holds beside the activations: one linear's inputs on its windows (model
    dtype) and the float32 outputs they are compared on."""
    tokens = min(windows, search_windows(cfg, seqlen)) * seqlen
    return tokens * (widest_input * itemsize + hidden * 4)


def _fold_scales(job: LayerJob, gptq_rounding: bool) -> None:
    """Search (Sec. 3.2) or re-apply each scale group's ``s`` and fold it into the layer exactly.

    Groups go one at a time, each on its first linear's inputs over the first windows (at most
    ``cfg.awq_max_tokens`` tokens), gathered after the groups before it were folded: memory holds
    one linear's inputs, never all of them.
    """
    layer, state = job.layer, job.awq_state
    windows = search_windows(job.cfg, job.seqlen)
    quantized = {name for g in job.groups for name in g}
    for sg in job.scale_groups:
        if quantized.isdisjoint(sg.linears):  # every linear it feeds stays in full precision: keep their weights
            continue
        prev = layer.get_submodule(sg.prev)
        linears = [layer.get_submodule(name) for name in sg.linears]
        also = [layer.get_submodule(name) for name in sg.also]
        key = f"{job.prefix}{sg.prev}.awq_scale"
        rows = sg.prev_rows.span(prev.out_features) if sg.prev_rows else None
        # an expert without calibration statistics of its own keeps scale 1 (RTN)
        policy = job.policy_of(sg.input_of or sg.linears[0])
        if not can_fold(prev, linears, also, rows) or (state is not None and key not in state) or policy == "rtn":
            continue
        if state is not None:
            scales = state[key].to(linears[0].weight.device)
        else:
            x = _gather_inputs(job, sg.input_of or sg.linears[0], windows)
            if x is None:  # an expert routed no token in the search windows: scale 1
                continue
            compared = _compared(layer, sg.inspect, job.kwargs) if sg.inspect else linears[0]
            cfg = job.cfg_for(sg.linears[0])  # the linears one scale feeds read the same input: one width
            scales, loss = _search_scale(job, x, linears, compared, cfg, _gptq_rounding(x, cfg) if gptq_rounding
                                         else None)
            del x
            log.info("layer %d %s -> %s: scale loss %.5g", job.index, sg.prev, _short(sg.linears), loss)
        fold_scales(prev, linears, scales, also, rows, sg.norm_offset)
        job.record(key, scales.detach().cpu())


def _short(names: tuple[str, ...]) -> str:
    return ",".join(names) if len(names) <= 4 else f"{names[0]},...,{names[-1]} ({len(names)} linears)"


CLIP_TOKENS = 512  # tokens the clip search compares outputs on (AutoAWQ's n_sample_token)


def _clip_weights(job: LayerJob) -> None:
    """Clip each weight's range per group (searched, or re-applied from ``job.awq_state``).

    Skips q/k projections, as the reference: their own output error says little about the
    attention scores they feed; and linears with a partial last group.
    """
    state = job.awq_state
    clipped = [n for g in job.groups for n, m in g.items()
               if not n.endswith(("q_proj", "k_proj")) and (job.cfg_for(n).group_size < 0
                                                            or m.in_features % job.cfg_for(n).group_size == 0)
               and job.policy_of(n) != "rtn"]
    inputs = {}
    if state is None and clipped:
        inputs = _sample_inputs(job, clipped, CLIP_TOKENS)
        clipped = [n for n in clipped if n in inputs]
    for name in clipped:
        module = job.layer.get_submodule(name)
        key = f"{job.prefix}{name}.awq_clip"
        if state is not None:
            if key not in state:
                continue
            max_val = state[key].to(module.weight.device)
        else:
            rows = job.ranks.rows(module.out_features)  # rows are clipped independently: shared out across ranks
            with torch.no_grad():
                w = search_clip(module.weight.data[rows].float(), inputs[name], job.cfg_for(name),
                                n_tokens=CLIP_TOKENS)
            # clamping at the clipped weight's own group maxima reproduces the clip exactly
            gs = job.cfg_for(name).group_size
            max_val = w.reshape(w.shape[0], -1, gs if gs > 0 else w.shape[1]).abs().amax(dim=2)  # [out, groups]
            max_val = job.ranks.gather_rows(max_val, module.out_features)
        w = module.weight.data.float().reshape(module.out_features, max_val.shape[1], -1)  # [out, groups, gs]
        w = torch.clamp(w, -max_val[..., None], max_val[..., None])
        module.weight.data = w.reshape(module.out_features, -1).to(module.weight.dtype)
        job.record(key, max_val.detach().cpu())


def awq_layer(job: LayerJob) -> dict[str, QuantizedWeight]:
    """AWQ scales and clipping, then round to nearest."""
    with job.timer("awq_search"):
        apply_awq(job)
    return rtn_layer(job)


def awq_gptq_layer(job: LayerJob) -> dict[str, QuantizedWeight]:
    """AWQ scales searched for GPTQ rounding, then GPTQ."""
    with job.timer("awq_search"):
        apply_awq(job, gptq_rounding=True)
    return gptq_layer(job)


def _block_forward(job: LayerJob) -> Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor]:
    """``(weights, x) -> layer(x)`` with the named linears' weights replaced (``torch.func.functional_call``)."""
    def forward(weights: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        out = torch.func.functional_call(job.layer, {name + ".weight": w for name, w in weights.items()},
                                         (x,), job.kwargs)
        return _first_output(out)
    return forward


def tune_layer(job: LayerJob) -> dict[str, QuantizedWeight]:
    """Round to nearest (each group's range searched), then block-wise reconstruction
    (:func:`llmq.algorithms.tune.tune_block`) of the whole layer from its FP weights.

    A GPTQ start was tried and dropped: its weights sit on grid points, half a step from any rounding boundary,
    so the offsets barely move them (stories260K W3: no better than this RTN start, at twice the time)."""
    fp_weights = {name: m.weight.data.clone() for g in job.groups for name, m in g.items()}
    start = rtn_layer(job)
    if not start:  # every linear of the layer kept in full precision: nothing to tune
        return start
    frozen = [p for p in job.layer.parameters() if p.requires_grad]
    for p in frozen:  # only the tunable copies get gradients
        p.requires_grad_(False)
    try:
        with job.timer("tune"):
            res = tune_block(_block_forward(job), job.inputs, job.targets, start, fp_weights, job.cfg,
                             seed=job.cfg.tune_seed + job.index)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    log.info("layer %d: block output MSE %.5g -> %.5g%s", job.index, res.loss_before, res.loss_after,
             " (kept the start: tuning did not lower it)" if res.kept_start else "")
    job.note(f"tune_loss/{job.prefix.rstrip('.')}", {"before": res.loss_before, "after": res.loss_after})
    job.summary["block output MSE"] = f"{res.loss_before:.4g} -> {res.loss_after:.4g}"
    for name, qw in res.weights.items():
        write_back(job.layer.get_submodule(name), qw)
    return res.weights


tune_layer.needs_teacher = True  # type: ignore[attr-defined]

METHOD_FNS: dict[str, Callable[[LayerJob], dict[str, QuantizedWeight]]] = {
    "rtn": rtn_layer,
    "gptq": gptq_layer,
    "awq": awq_layer,
    "awq+gptq": awq_gptq_layer,
    "tune": tune_layer,
}


def needs_teacher(method: str) -> bool:
    """Whether ``method`` tunes against the FP layer's outputs (the pipeline then carries a second stream)."""
    return getattr(METHOD_FNS[method], "needs_teacher", False)
