"""Analysis tests run tiny models: one intra-op thread is faster for them and immune to busy neighbours."""
import pytest
import torch


@pytest.fixture(scope='package', autouse=True)
def _one_thread():
    # tensors of a few hundred elements gain nothing from a second thread, and its spin-waiting costs up to 30x
    # when other processes share the CPUs
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
