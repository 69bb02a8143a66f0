"""The work folder of a streaming run: a lock, an atomically committed state, and the final rename.

A run writes into ``.<out>.partial`` beside its output. After each unit of work the state
(``progress.json``) is replaced atomically and the folder fsynced, so a kill at any moment leaves
either the previous state or the next one. A state is resumed only when it was made by the same
settings (else the run is refused, or discarded with ``overwrite``) and in the same environment
(llmq and torch versions, device kind, dtype, batch size: anything that changes the bytes);
otherwise the run says why and starts afresh. Two runs on one output are refused by a lock.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmq.errors import CheckpointError
from llmq.utils.killpoints import kill_point

log = logging.getLogger(__name__)

PROGRESS_FILE = "progress.json"
LOCK_FILE = ".lock"


def fsync_dir(path: Path) -> None:
    """Make renames and unlinks inside ``path`` durable (a file's own fsync does not cover its name)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class WorkFolder:
    """``with WorkFolder(out) as work``: the locked staging folder of the run that writes ``out``."""

    def __init__(self, out: Path):
        self.out = out
        self.path = out.parent / f".{out.name}.partial"
        self._lock = None
        self.settings: str | None = None  # set by load(): what every committed state is stamped with
        self.environment: dict[str, Any] | None = None

    def __enter__(self) -> WorkFolder:
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.path / LOCK_FILE, "w")  # noqa: SIM115 (held until the run ends)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise CheckpointError(f"another llmq run is writing {self.out} "
                                  f"(it holds {self.path}/{LOCK_FILE})") from None
        return self

    def __exit__(self, *exc: object) -> None:
        if self._lock is not None:
            self._lock.close()

    def load(self, settings: str, environment: dict[str, Any], overwrite: bool,
             needed: Callable[[dict[str, Any]], list[str]]) -> dict[str, Any] | None:
        """The committed state to resume from, or None (the folder is then emptied for a fresh start).

        ``needed(state)`` lists the files the state relies on; if one is gone (the run was killed
        while laying out its final files) the run starts again.
        """
        self.settings, self.environment = settings, environment
        progress = self.path / PROGRESS_FILE
        state = json.loads(progress.read_text()) if progress.is_file() else None
        if state is not None and state.get("settings", settings) != settings:
            if not overwrite:
                raise CheckpointError(f"{self.path} holds an unfinished run with other settings or inputs: run the "
                                      "same command again to resume it, or pass --overwrite to discard it")
            state = None
        if state is not None and state.get("environment") != environment:
            was = state.get("environment") or {}
            diff = ", ".join(f"{k} {was.get(k)} -> {v}" for k, v in environment.items() if was.get(k) != v)
            log.warning("%s was started in another environment (%s): resuming would not give the bytes of an "
                        "uninterrupted run, starting afresh", self.path, diff or "older llmq")
            state = None
        if state is not None and not all((self.path / f).is_file() for f in needed(state)):
            log.warning("%s was interrupted while writing its final files: starting it again", self.path)
            state = None
        if state is None:
            self.clear()
        else:
            log.info("resuming %s at layer %d", self.out, state["next_layer"])
        return state

    def clear(self, keep: Callable[[Path], bool] = lambda p: False) -> None:
        """Remove everything but the lock (and what ``keep`` spares)."""
        for p in self.path.iterdir():
            if p.name != LOCK_FILE and not keep(p):
                shutil.rmtree(p) if p.is_dir() else p.unlink()

    def commit(self, state: dict[str, Any]) -> None:
        """Replace the state atomically and durably: a kill leaves either the old state or the new one.

        The state is stamped with the settings and environment given to :meth:`load`."""
        tmp = self.path / (PROGRESS_FILE + ".tmp")
        with open(tmp, "w") as f:
            f.write(json.dumps({"settings": self.settings, "environment": self.environment, **state}))
            f.flush()
            os.fsync(f.fileno())
        kill_point("commit.written")
        tmp.replace(self.path / PROGRESS_FILE)
        kill_point("commit.renamed")
        fsync_dir(self.path)

    def finish(self, scratch: Callable[[Path], bool]) -> Path:
        """Drop the state, then the ``scratch`` files, and rename the folder to the output.

        The state goes first: a run killed from here on starts again from scratch (and gives the
        same bytes); the output name appears only when everything under it is complete.
        """
        (self.path / PROGRESS_FILE).unlink(missing_ok=True)
        fsync_dir(self.path)
        kill_point("finish.state_removed")
        self.clear(keep=lambda p: not scratch(p))
        (self.path / LOCK_FILE).unlink(missing_ok=True)
        if self.out.exists():
            shutil.rmtree(self.out) if self.out.is_dir() else self.out.unlink()
        self.path.rename(self.out)
        fsync_dir(self.out.parent)
        return self.out
