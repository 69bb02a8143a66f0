"""Where a run's time goes: seconds accumulated per named stage (load, observe, hessian, solve, ...)."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
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
