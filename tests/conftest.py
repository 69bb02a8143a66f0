import os

import pytest
import torch

WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))  # pytest-xdist's processes (pyproject.toml: -n 2)
if WORKERS > 1:
    # The cores are shared out: each worker computes on its share, and so do the processes its tests start (the
    # CLI, torchrun ranks). Two workers of one thread beat one of two: most tests multiply small matrices, which
    # a second thread barely speeds up.
    CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    THREADS = max(1, CORES // WORKERS)
    os.environ["OMP_NUM_THREADS"] = str(THREADS)
    torch.set_num_threads(THREADS)

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


REPORT = "llmq_report"


@pytest.fixture
def report(request):
    """Tables a test wants shown: printed in the terminal summary even when output is captured. They travel
    with the test's report (``user_properties``), which pytest-xdist's workers send to the main process."""
    return lambda text: request.node.user_properties.append((REPORT, text))


def pytest_collection_modifyitems(items):
    """The slow tests first: pytest-xdist hands tests out in this order, so the longest start early and the
    workers finish together rather than one waiting on the other's last long test."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # a stable sort: file order otherwise


def pytest_terminal_summary(terminalreporter):
    for reports in terminalreporter.stats.values():
        for rep in reports:
            if getattr(rep, "when", None) != "call":
                continue
            for key, table in getattr(rep, "user_properties", ()):
                if key == REPORT:
                    terminalreporter.write_line("")
                    for line in table.splitlines():
                        terminalreporter.write_line(line)
