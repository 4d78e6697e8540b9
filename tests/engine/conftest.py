"""Engine tests: one torch thread, restored afterwards; one shared finished tiny run."""
from pathlib import Path

import pytest
import torch

from .synthetic import train_tiny_run


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread (as the recipes here ask): tiny models run many times slower with two threads on a busy
    machine; the previous setting comes back afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope='session')
def tiny_run(tmp_path_factory) -> tuple[Path, Path]:
    """``(run_dir, data_dir)`` of one finished tiny training run, shared by the tests that only read it."""
    threads = torch.get_num_threads()
    try:
        return train_tiny_run(tmp_path_factory.mktemp('tiny_run'))
    finally:
        torch.set_num_threads(threads)
