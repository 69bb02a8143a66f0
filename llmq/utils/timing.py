"""Where a run's time goes: seconds accumulated per named stage (load, observe, hessian, solve, ...)."""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch


class StageTimes:
    """``with times("solve"): ...`` adds the block's wall time to ``times.seconds["solve"]``.

    Waits for queued CUDA work at both ends, so GPU time lands in the stage that queued it.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        sync = torch.cuda.is_available() and torch.cuda.is_initialized()
        if sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if sync:
                torch.cuda.synchronize()
            self.seconds[stage] += time.perf_counter() - start

    def as_dict(self, digits: int = 2) -> dict[str, float]:
        return {k: round(v, digits) for k, v in sorted(self.seconds.items())}


PROGRESS_LOGGER = "llmq.progress"  # one line per finished unit of a long run; the CLI shows it at any verbosity


class LayerProgress:
    """Says where a long run is, one log line per finished layer, wherever the output goes (a progress bar only
    draws on a terminal; a batch job's log file gets these lines): ``layer 4/30 done in 12.3 s (gptq loss 0.0123);
    about 5 min 10 s left``. The time left is the mean time of the layers done so far times the layers left."""

    def __init__(self, total: int, start: int = 0, what: str = "layer", enabled: bool = True,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.total, self.done_before, self.what, self.enabled, self.clock = total, start, what, enabled, clock
        self.started = self.last = clock()
        self.done = 0
        self.log = logging.getLogger(PROGRESS_LOGGER)

    def step(self, index: int, details: str = "") -> str:
        """Layer ``index`` (0-based) has finished: log its line and return it."""
        now = self.clock()
        took, self.last = now - self.last, now
        self.done += 1
        left = self.total - self.done_before - self.done
        line = f"{self.what} {index + 1}/{self.total} done in {took:.1f} s" + (f" ({details})" if details else "")
        if left > 0:
            line += f"; about {format_seconds((now - self.started) / self.done * left)} left"
        if self.enabled:
            self.log.info("%s", line)
        return line


def format_seconds(seconds: float) -> str:
    """``75`` -> ``1 min 15 s``; ``3725`` -> ``1 h 2 min``."""
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {s % 3600 // 60} min"
