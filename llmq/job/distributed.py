"""Data-parallel calibration over torch.distributed ranks (``torchrun --nproc-per-node N -m llmq quantize ...``).

Layer by layer the natural split is the calibration windows: each rank runs the current layer on its contiguous
share of them, the statistics (Hessian sums and token counts) are summed across ranks, each linear's solve is
split by output rows (GPTQ solves rows independently, each with the whole ``H^-1``) and the rows gathered, and
every rank propagates its own windows. AWQ's scale search runs on the same search windows on every rank (their
inputs gathered), each rank trying its share of the grid, and the losses are gathered, so every rank picks what
one process would; its clip search is split by output rows like GPTQ's solve. Rank 0 alone writes the checkpoint
and the resume state; the next layer's inputs are gathered to it in window order, so a saved state has one
process's layout (the number of ranks is part of the resume environment all the same: it changes the Hessians'
last bits).

Sums run in rank order on every rank (gather, then add), so a run's bytes do not depend on timing; they differ
from a one-process run's in the last bits of the Hessians (its batches are summed in another order). With one
process (no ``WORLD_SIZE``, or 1) nothing here communicates and nothing changes.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from llmq.algorithms.quant import QuantizedWeight
from llmq.config import QuantConfig
from llmq.errors import ConfigError, LlmqError

log = logging.getLogger(__name__)

T = TypeVar("T")
# what the ranks share out so far: block tuning and the mixed-precision pass run in one process
DISTRIBUTED_METHODS = ("rtn", "gptq", "awq", "awq+gptq")
SUM_CHUNK = 1 << 24  # elements of a tensor gathered at once to be summed (64 MB of float32 per rank)


class RankLostError(LlmqError):
    """Another rank died or was killed: this one cannot go on."""


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job: ``rank`` of ``world`` (0 of 1 without torch.distributed)."""

    rank: int = 0
    world: int = 1
    device: str = "cpu"  # where the small tensors of the collectives live (NCCL takes CUDA tensors only)

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def writes(self) -> bool:
        """Whether this rank writes the checkpoint and the resume state (rank 0)."""
        return self.rank == 0

    def windows(self, n: int, rank: int | None = None) -> slice:
        """The contiguous share of ``n`` windows of ``rank`` (default: this one); the first ``n % world`` ranks
        take one more."""
        rank = self.rank if rank is None else rank
        base, extra = divmod(n, self.world)
        start = rank * base + min(rank, extra)
        return slice(start, start + base + (rank < extra))

    def rows(self, n: int) -> slice:
        """This rank's share of a weight's ``n`` output rows: GPTQ solves rows independently (each with the
        whole ``H^-1``), so every linear's solve is split evenly across ranks."""
        return self.windows(n)

    def gather_rows(self, part: torch.Tensor, n: int) -> torch.Tensor:
        """The ``[n, ...]`` tensor whose :meth:`rows` share each rank holds as ``part``, on every rank."""
        if not self.active:
            return part
        padded = _padded(part, self.rows_of(n, 0))
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        _collective(dist.all_gather, parts, padded)
        return torch.cat([p[: self.rows_of(n, r)] for r, p in enumerate(parts)])

    def place(self, local: int) -> tuple[int, int]:
        """``(start, total)``: where this rank's ``local`` windows start among all ranks' and how many there are."""
        counts = [local] if not self.active else self.gather_json(local)
        return sum(counts[: self.rank]), sum(counts)

    def cat(self, t: torch.Tensor | None) -> torch.Tensor | None:
        """Every rank's ``t`` concatenated along dim 0 in rank order, on every rank; a rank with nothing passes
        None (or 0 rows). None when every rank passed None."""
        if not self.active:
            return t
        shapes = self.gather_json(None if t is None else [list(t.shape), str(t.dtype).removeprefix("torch.")])
        known = [s for s in shapes if s is not None]
        if not known:
            return None
        shape, dtype = known[0]
        rows = [0 if s is None else s[0][0] for s in shapes]
        if t is None:
            t = torch.empty((0, *shape[1:]), dtype=getattr(torch, dtype), device=self.device)
        padded = _padded(t, max(rows))
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        _collective(dist.all_gather, parts, padded)
        return torch.cat([p[:n] for p, n in zip(parts, rows, strict=True)])

    def rows_of(self, n: int, rank: int) -> int:
        share = self.windows(n, rank)
        return share.stop - share.start

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` replaced in place by its sum over ranks, added in rank order (the same bits on every rank)."""
        if not self.active:
            return t
        flat = t.view(-1)
        for i in range(0, flat.numel(), SUM_CHUNK):
            part = flat[i : i + SUM_CHUNK].contiguous()
            gathered = [torch.empty_like(part) for _ in range(self.world)]
            _collective(dist.all_gather, gathered, part)
            total = gathered[0]
            for other in gathered[1:]:
                total += other
            flat[i : i + SUM_CHUNK] = total
        return t

    def sum_int(self, value: int) -> int:
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        _collective(dist.all_reduce, t)
        return int(t.item())

    def share_json(self, value: Any) -> Any:
        """Rank 0's JSON-able ``value`` on every rank (no pickle crosses the wire)."""
        if not self.active:
            return value
        data = json.dumps(value).encode() if self.rank == 0 else b""
        size = torch.tensor([len(data)], dtype=torch.int64, device=self.device)
        _collective(dist.broadcast, size, 0)
        buf = (torch.frombuffer(bytearray(data), dtype=torch.uint8).to(self.device) if self.rank == 0 else
               torch.empty(int(size.item()), dtype=torch.uint8, device=self.device))
        _collective(dist.broadcast, buf, 0)
        return json.loads(bytes(buf.cpu().tolist()).decode())

    def gather_json(self, value: Any) -> list[Any]:
        """Every rank's JSON-able ``value``, in rank order, on every rank."""
        if not self.active:
            return [value]
        data = json.dumps(value).encode()
        sizes = [torch.zeros(1, dtype=torch.int64, device=self.device) for _ in range(self.world)]
        _collective(dist.all_gather, sizes, torch.tensor([len(data)], dtype=torch.int64, device=self.device))
        lengths = [int(n.item()) for n in sizes]
        mine = torch.zeros(max(lengths), dtype=torch.uint8)
        mine[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else mine[:0]
        parts = [torch.empty(max(lengths), dtype=torch.uint8, device=self.device) for _ in range(self.world)]
        _collective(dist.all_gather, parts, mine.to(self.device))
        return [json.loads(bytes(p[:n].cpu().tolist()).decode()) for p, n in zip(parts, lengths, strict=True)]

    def gather_weight(self, part: QuantizedWeight, n: int) -> QuantizedWeight:
        """The whole quantized weight from each rank's :meth:`rows` of it (``g_idx`` is the same on all)."""
        if not self.active:
            return part
        whole = copy.copy(part)
        for name in ("code_bytes", "scales", "zeros"):
            setattr(whole, name, self.gather_rows(getattr(part, name), n))
        return whole

    def gather_windows(self, t: torch.Tensor, total: int) -> torch.Tensor | None:
        """Every rank's windows (its rows of ``t``, ``[windows, ...]``) on rank 0, in window order (None
        elsewhere); ``total`` is the number of windows over all ranks."""
        if not self.active:
            return t
        padded = _padded(t, self.rows_of(total, 0))
        parts = [torch.empty_like(padded) for _ in range(self.world)] if self.rank == 0 else None
        _collective(dist.gather, padded, parts, 0)
        if self.rank != 0:
            return None
        return torch.cat([p[: self.rows_of(total, r)] for r, p in enumerate(parts)])

    def barrier(self) -> None:
        if self.active:
            _collective(dist.barrier)


SINGLE = Ranks()


def _padded(t: torch.Tensor, rows: int) -> torch.Tensor:
    """``t`` ``[<= rows, ...]`` zero-padded to ``rows`` rows: the gathers take equal sizes from every rank (rank 0's
    share is the largest)."""
    padded = torch.zeros((rows, *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    return padded


def check_distributed(cfg: QuantConfig, ranks: Ranks) -> None:
    """Refuse, before any calibration, what several ranks cannot run yet."""
    if not ranks.active:
        return
    if cfg.method not in DISTRIBUTED_METHODS:
        raise ConfigError(f"--method {cfg.method} does not run under torch.distributed yet (only "
                          f"{', '.join(DISTRIBUTED_METHODS)}): run it in one process, without torchrun")
    if cfg.bits_per_weight is not None:
        raise ConfigError("--bits-per-weight does not run under torch.distributed yet: run it in one process, "
                          "without torchrun")
    if cfg.e2e_steps:
        raise ConfigError("--e2e-steps does not run under torch.distributed: the end-to-end phase holds the whole "
                          "model in one process; run it without torchrun")


# how a dead peer shows in gloo's RuntimeErrors (e.g. "gloo/transport/tcp/pair.cc: Connection closed by peer ...
# typically caused by a remote worker crashing"); NCCL raises DistBackendError
_PEER_LOST = ("connection closed by peer", "connection reset by peer", "broken pipe", "remote worker", "timed out",
              "/transport/")


def is_peer_lost(e: BaseException) -> bool:
    """Whether a collective's error says another rank is gone (not a misuse such as mismatched shapes)."""
    return isinstance(e, dist.DistBackendError) or any(s in str(e).lower() for s in _PEER_LOST)


def _collective(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)``, a lost peer reported as what it is rather than as a socket error; any other error as itself."""
    try:
        return fn(*args)
    except RuntimeError as e:
        if not is_peer_lost(e):
            raise
        rank = dist.get_rank() if dist.is_initialized() else "?"
        raise RankLostError(
            f"rank {rank} lost contact with the other ranks ({e}); one died or was killed. The resume "
            "state rank 0 committed is intact: run the same command again to continue from the last finished layer"
        ) from e


def ranks_from_env(device: torch.device) -> Ranks:
    """The job torchrun started (``WORLD_SIZE``, ``RANK``, ``MASTER_ADDR``...), joined with gloo on CPU and NCCL on
    CUDA; one process without them."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    small = str(rank_device(device)) if dist.get_backend() == "nccl" else "cpu"
    ranks = Ranks(dist.get_rank(), dist.get_world_size(), small)
    log.info("rank %d of %d (%s)", ranks.rank, ranks.world, dist.get_backend())
    return ranks


def rank_device(device: torch.device) -> torch.device:
    """Each rank's own GPU (``LOCAL_RANK``) when the job runs on CUDA."""
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device
