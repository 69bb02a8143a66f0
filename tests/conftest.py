import pytest
import torch


@pytest.fixture(autouse=True)
def _offline_and_seeded(monkeypatch):
    """No test may reach the network (there is none here), and each starts from the same seed."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    torch.manual_seed(0)
