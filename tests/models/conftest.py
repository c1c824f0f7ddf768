"""Settings every models test runs under."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def deterministic_single_thread():
    """Deterministic algorithms, as the training stages use; one intra-op thread because these
    tiny convs gain nothing from more and OpenMP threads stall badly when cores are busy."""
    previous_deterministic = torch.are_deterministic_algorithms_enabled()
    previous_threads = torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    yield
    torch.use_deterministic_algorithms(previous_deterministic)
    torch.set_num_threads(previous_threads)
