"""Named points where a test can kill the process, to prove that a run survives a kill anywhere.

``LLMQ_KILL_AT=NAME`` sends SIGKILL to the process the first time it reaches ``kill_point(NAME)``;
``NAME@N`` the N-th time; with ``LLMQ_KILL_RANK=R`` only torch.distributed rank ``R`` (``RANK``) stops.
A timer cannot hit a point such as "half a spooled tensor written" reliably; a name can. Unset (always,
outside the tests), a point costs one environment lookup.
"""

from __future__ import annotations

import os
import signal
from collections import Counter
from collections.abc import Callable

_reached: Counter[str] = Counter()


def kill_point(name: str, flush: Callable[[], None] | None = None) -> None:
    """SIGKILL here if ``LLMQ_KILL_AT`` names this point (``flush`` first pushes buffered bytes to the OS,
    so the file is left torn on disk rather than merely unwritten)."""
    target = os.environ.get("LLMQ_KILL_AT")
    if not target:
        return
    want, _, nth = target.partition("@")
    if want != name or os.environ.get("LLMQ_KILL_RANK", os.environ.get("RANK", "0")) != os.environ.get("RANK", "0"):
        return
    _reached[name] += 1
    if _reached[name] == int(nth or 1):
        if flush is not None:
            flush()
        os.kill(os.getpid(), signal.SIGKILL)
