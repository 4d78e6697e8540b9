"""Engine tests: one torch thread, restored afterwards; one shared finished tiny run."""
from pathlib import Path

import pytest
import torch

from tests.helpers import torch_threads

from .synthetic import train_tiny_run


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):  # tiny models: see tests.helpers.torch_threads
        yield


@pytest.fixture(scope='session')
def tiny_run(tmp_path_factory) -> tuple[Path, Path]:
    """``(run_dir, data_dir)`` of one finished tiny training run, shared by the tests that only read it."""
    threads = torch.get_num_threads()
    try:
        return train_tiny_run(tmp_path_factory.mktemp('tiny_run'))
    finally:
        torch.set_num_threads(threads)
