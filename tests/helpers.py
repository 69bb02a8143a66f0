"""Helpers shared by the tests: locating ``../shared``, tiny random models of each architecture."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED = Path(os.environ.get("LLMQ_SHARED") or Path(__file__).resolve().parents[2] / "shared")


def shared_path(*parts: str) -> Path:
    """A file under ``../shared``; fails (never skips) the test when it is missing."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.fail(
            f"{path} not found: these tests need the project's shared/ folder beside the checkout "
            "(or LLMQ_SHARED pointing at it)"
        )
    return path
