"""The README's and the docs' runnable examples run, so they cannot drift from the code.

A code block is runnable when the line right before its fence is ``<!-- example: run -->``. Python blocks are
executed in a fresh namespace, bash blocks with ``bash -e``, each in its own empty working folder, offline. The
examples name the small shared models and texts by placeholder paths (``path/to/llmq-tiny-llama``, ...) that are
replaced here with the files in ``../shared`` (or ``$LLMQ_SHARED``); each must run in seconds on them.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import shared_path

ROOT = Path(__file__).resolve().parents[1]
MARK = "<!-- example: run -->"
SOURCES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
PLACEHOLDERS = {  # the literal in an example -> the file under ../shared it stands for
    "path/to/llmq-tiny-llama": ("assets", "llmq-tiny-llama"),
    "path/to/llmq-tiny-moe": ("assets", "llmq-tiny-moe"),
    "path/to/c4.jsonl": ("assets", "c4-sample", "c4_train_00000_first1000.jsonl"),
    "path/to/stories.txt": ("assets", "tinystories-text", "tinystories_sample.cs336.txt"),
}
LANGUAGES = ("python", "bash")


def runnable_blocks(path: Path) -> list[tuple[int, str, str]]:
    """``(line of the fence, language, code)`` of every block marked runnable in ``path``. A marker not followed
    by a python or bash fence, or a fence never closed, gives the language ``None`` and the problem as the code."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks = []
    for i, line in enumerate(lines):
        if line.strip() != MARK:
            continue
        fence = re.match(r"^(`{3,}|~{3,})\s*(\w+)?\s*$", lines[i + 1] if i + 1 < len(lines) else "")
        if fence is None or fence.group(2) not in LANGUAGES:
            blocks.append((i + 2, None, f"the marker on line {i + 1} is not right before a ```python or ```bash fence"))
            continue
        end = next((j for j in range(i + 2, len(lines)) if lines[j].strip() == fence.group(1)), None)
        if end is None:
            blocks.append((i + 2, None, f"the fence on line {i + 2} is never closed"))
            continue
        blocks.append((i + 2, fence.group(2), "\n".join(lines[i + 2:end]) + "\n"))
    return blocks


def examples() -> list:
    """One test per distinct block: a block repeated word for word (the README's quickstart in the docs) runs once."""
    seen, params = set(), []
    for path in SOURCES:
        for line, language, code in runnable_blocks(path):
            if (language, code) in seen:
                continue
            seen.add((language, code))
            params.append(pytest.param(path, line, language, code, id=f"{path.relative_to(ROOT).as_posix()}:{line}"))
    return params


EXAMPLES = examples()


def test_the_readme_and_the_docs_have_runnable_examples():
    where = {p.values[0].name for p in EXAMPLES}
    assert "README.md" in where and len(EXAMPLES) >= 10, f"only {len(EXAMPLES)} runnable examples"
    assert {p.values[2] for p in EXAMPLES} >= set(LANGUAGES)


def with_shared_files(code: str) -> str:
    for placeholder, parts in PLACEHOLDERS.items():
        if placeholder in code:
            code = code.replace(placeholder, str(shared_path(*parts)))
    unknown = sorted(set(re.findall(r"path/to/[\w./-]+", code)))
    assert not unknown, f"placeholders with no shared file behind them: {unknown} (known: {sorted(PLACEHOLDERS)})"
    return code


def llmq_on_path(folder: Path) -> dict[str, str]:
    """An environment whose ``llmq`` is this checkout's (not whatever copy is installed)."""
    folder.mkdir()
    script = folder / "llmq"
    script.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m llmq "$@"\n')
    script.chmod(0o755)
    python_path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PATH": f"{folder}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": python_path}


@pytest.mark.parametrize("path, line, language, code", EXAMPLES)
def test_example_runs(path, line, language, code, tmp_path, monkeypatch):
    where = f"{path.relative_to(ROOT)}:{line}"
    assert language is not None, f"{where}: {code}"
    code = with_shared_files(code)
    work = tmp_path / "work"
    work.mkdir()
    if language == "python":
        monkeypatch.chdir(work)
        monkeypatch.syspath_prepend(str(ROOT))
        exec(compile(code, where, "exec"), {"__name__": "__example__"})
        return
    env = llmq_on_path(tmp_path / "bin")
    done = subprocess.run(["bash", "-e", "-c", code], cwd=work, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, (f"{where} failed (exit {done.returncode})\n--- stdout\n{done.stdout[-4000:]}"
                                  f"\n--- stderr\n{done.stderr[-4000:]}")
