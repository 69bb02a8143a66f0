import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run on CPU tensors through Triton's interpreter; read when triton first compiles a kernel
    # module, so it is set before any test imports one.
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _offline_and_seeded(monkeypatch):
    """No test may reach the network (there is none here), and each starts from the same seed."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    torch.manual_seed(0)


_TABLES: list[str] = []


@pytest.fixture
def report():
    """Tables a test wants shown: printed in the terminal summary even when output is captured."""
    return _TABLES.append


def pytest_terminal_summary(terminalreporter):
    for table in _TABLES:
        terminalreporter.write_line("")
        for line in table.splitlines():
            terminalreporter.write_line(line)
