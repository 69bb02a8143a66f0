"""Mixed precision to a budget of effective bits per weight.

The unit of allocation is a true-sequential group of one layer (q/k/v, o, gate/up, down; an MoE layer's
experts' gate/up, their down): linears that read the same input, which serving engines fuse into one kernel
(vLLM requires the same width on every part of a fused linear) and whose statistics are gathered together.

Sensitivity (:func:`layer_sensitivity`): each unit is quantized alone at each candidate width, the rest of its
layer in full precision, on the FP model's calibration inputs; its sensitivity at that width is the squared
error it adds to the layer's output, summed over tokens. The residual stream carries each layer's output
error on to the model's output, where sensitivities of different layers add up (the additive model that HAWQ
and llama.cpp's k-quant mixtures rely on too); but the later layers read that error and amplify or damp it,
more for early layers than for late ones. So each layer's error at the run's own width
(:func:`probed`) is also carried through the FP layers after it, and the layer's sensitivities
are scaled by the ratio of what reaches the final hidden state (per token over its mean square, what the final
RMSNorm divides by) to what left the layer: one gain per layer, on a few windows.

Allocation (:func:`allocate`): the widths minimising the summed sensitivity with the total storage (codes,
scales, zeros and g_idx, :func:`llmq.formats.pack.gptq_storage_bits`) within the budget: a multiple-choice knapsack,
solved greedily along each unit's lower convex hull of (bits, error) from the cheapest widths up, the upgrade
that removes the most error per bit first.
"""

from __future__ import annotations

import dataclasses
import heapq
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch.nn as nn

from llmq.config import QuantConfig, Width
from llmq.errors import ConfigError
from llmq.formats.pack import gptq_storage_bits
from llmq.job.methods import METHOD_FNS, LayerJob

T = TypeVar("T")
Shapes = dict[str, tuple[int, int]]  # full linear name -> (out_features, in_features)


@dataclass
class Unit:
    """Linears that take one width together, what each candidate width costs them, and what it loses."""

    linears: tuple[str, ...]  # full module names
    weights: int  # how many weights they hold
    costs: dict[Width, int]  # storage bits of all the unit's linears at each width it can take
    errors: dict[Width, float] = dataclasses.field(default_factory=dict)  # sensitivity at each width


def unit_costs(shapes: Shapes, widths: tuple[Width, ...]) -> dict[Width, int]:
    """The storage bits of linears ``shapes`` at each width whose groups divide every one's input (the GPTQ
    layout refuses a partial last group)."""
    return {w: sum(gptq_storage_bits(k, n, w.bits, w.group_size) for n, k in shapes.values())
            for w in widths if all(w.group_size < 0 or k % w.group_size == 0 for _, k in shapes.values())}


def check_budget(units: list[Unit], cfg: QuantConfig) -> float:
    """The budget in bits for ``units`` (``cfg.bits_per_weight`` times their weights), or a ConfigError naming
    the unit no candidate width fits, or the least budget the candidates allow."""
    weights = 0
    for unit in units:
        if not unit.costs:
            raise ConfigError(f"no width of mixed_widths ({', '.join(cfg.mixed_widths)}) fits {', '.join(unit.linears)}"
                              ": their input features are not a multiple of any candidate group size; add one "
                              "that divides them (or 1 group per row, e.g. 4g-1)")
        weights += unit.weights
    least = sum(min(u.costs.values()) for u in units)
    if least > cfg.bits_per_weight * weights:
        raise ConfigError(f"bits_per_weight={cfg.bits_per_weight} is below what the narrowest candidate widths take "
                          f"({least / weights:.3f} bits per weight, scales and zeros counted): raise it, or add "
                          "narrower widths to mixed_widths")
    return cfg.bits_per_weight * weights


def floor_bits(units: list[Unit], budget_bits: float) -> int:
    """The most bits a width can have and still be every unit's at once within ``budget_bits`` (each unit at its
    cheapest width of that many bits); the narrowest candidates' bits when none can.

    The allocation takes no width below it: the budget left above the floor goes to the most sensitive units, and
    no unit is narrowed below what the whole model could have uniformly to pay for another's upgrade. The additive
    proxy prices such trades too cheaply: on llmq-tiny-llama at W3 g64's bits (3.39), with 2/3/4/8 g128 as
    candidates it put layer 2's gate/up at 2 bits to widen other groups and reached 122.450 on held-out C4, against
    122.155 with the floor (3 bits) and 122.387 for the naive first-layers baseline (``eval/ppl_table.py --only
    mixed``, one AVX512 EPYC; :func:`layer_sensitivity`'s squared error grows faster than additively once
    quantized layers feed each other)."""
    present = sorted({w.bits for u in units for w in u.costs}, reverse=True)
    for bits in present:
        cheapest = [min((c for w, c in u.costs.items() if w.bits == bits), default=None) for u in units]
        if None not in cheapest and sum(cheapest) <= budget_bits:
            return bits
    return present[-1]


def linear_shapes(linears: dict[str, nn.Linear], prefix: str = "") -> Shapes:
    """A group's ``{prefix + name: (out, in)}``: what :func:`make_units` takes."""
    return {prefix + name: (m.out_features, m.in_features) for name, m in linears.items()}


def make_units(groups: list[Shapes], widths: tuple[Width, ...]) -> list[Unit]:
    """One unit per group of linears (full name -> (out, in)), with its costs at each width it can take."""
    return [Unit(tuple(shapes), sum(n * k for n, k in shapes.values()), unit_costs(shapes, widths))
            for shapes in groups]


def probed(job: LayerJob, run: Callable[[], T]) -> T:
    """``run()``'s result with ``job``'s groups quantized at ``job.cfg``'s width (by GPTQ, or RTN when the run's
    method is RTN), their FP weights restored after it."""
    probe = METHOD_FNS["rtn" if job.cfg.method == "rtn" else "gptq"]
    fp = {name: module.weight.data for group in job.groups for name, module in group.items()}
    probe(dataclasses.replace(job, widths={}))
    result = run()
    for group in job.groups:
        for name, module in group.items():
            module.weight.data = fp[name]
    return result


def layer_sensitivity(job: LayerJob, widths: list[tuple[Width, ...]], layer_error: Callable[[], float],
                      ) -> list[dict[Width, float]]:
    """For each of ``job``'s groups, ``layer_error()`` with only that group quantized at each of its ``widths``
    (:func:`probed`).

    The layer's weights are full precision on entry and on return."""
    return [{width: probed(dataclasses.replace(job, groups=(group,), cfg=job.cfg.at(width)), layer_error)
             for width in candidates} for group, candidates in zip(job.groups, widths, strict=True)]


def allocate(units: list[Unit], budget_bits: float) -> list[Width]:
    """Each unit's width: the least summed error whose total cost is within ``budget_bits`` (greedy along the
    convex hull: start every unit at its cheapest width, then take the upgrade with the most error removed per
    bit that still fits, until none does). Ties go to the earlier unit and the narrower width: deterministic."""
    choice = [min(u.costs, key=lambda w, u=u: (u.costs[w], u.errors[w], w)) for u in units]
    used = sum(u.costs[c] for u, c in zip(units, choice, strict=True))
    heap: list[tuple[float, int, Width]] = []

    def push(i: int) -> None:
        unit, cur = units[i], choice[i]
        best = None
        for w in sorted(unit.costs):
            extra, gain = unit.costs[w] - unit.costs[cur], unit.errors[cur] - unit.errors[w]
            if extra > 0 and gain > 0 and used + extra <= budget_bits and (best is None or gain / extra > best[0]):
                best = (gain / extra, w)
        if best is not None:
            heapq.heappush(heap, (-best[0], i, best[1]))

    for i in range(len(units)):
        push(i)
    while heap:
        _, i, w = heapq.heappop(heap)
        extra = units[i].costs[w] - units[i].costs[choice[i]]
        if extra > 0 and used + extra <= budget_bits:
            used += extra
            choice[i] = w
        push(i)  # the next step up from its new width, or a smaller one that still fits
    return choice


def widths_table(widths: dict[str, str]) -> str:
    """A markdown table of linears' widths (full name -> e.g. "3g128"): a row per layer (the name up to its
    first number), a column per linear in it; an MoE layer's experts share a column (``experts.*.down_proj``)."""
    rows: dict[str, dict[str, set[str]]] = {}
    for name, width in widths.items():
        parts = name.split(".")
        depth = next((i + 1 for i, part in enumerate(parts) if part.isdigit()), len(parts) - 1)
        linear = re.sub(r"\.\d+\.", ".*.", "." + ".".join(parts[depth:]) + ".")[1:-1]
        rows.setdefault(".".join(parts[:depth]), {}).setdefault(linear, set()).add(width)
    columns = list(dict.fromkeys(c for row in rows.values() for c in row))
    lines = ["| layer | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {layer} | " + " | ".join("/".join(sorted(row.get(c, ()))) for c in columns) + " |"
              for layer, row in rows.items()]
    return "\n".join(lines)


def format_allocation(units: list[Unit], choice: list[Width]) -> str:
    """The allocation as a table, and its effective bits per weight."""
    total = sum(u.costs[w] for u, w in zip(units, choice, strict=True))
    table = widths_table({name: str(w) for u, w in zip(units, choice, strict=True) for name in u.linears})
    return table + f"\neffective bits per weight {total / sum(u.weights for u in units):.4f}"
