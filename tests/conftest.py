"""Shared test set-up: deterministic, CPU-friendly defaults for every test."""

from __future__ import annotations

import os

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _deterministic_torch() -> None:
    torch.manual_seed(0)
    if "TM_TEST_THREADS" in os.environ:  # tests/test_cpu_matrix.py: equality tests at another thread count
        torch.set_num_threads(int(os.environ["TM_TEST_THREADS"]))
