"""Analysis tests run tiny models: one intra-op thread is faster for them and immune to busy neighbours."""
import pytest

from tests.helpers import torch_threads


@pytest.fixture(scope='package', autouse=True)
def _one_thread():
    with torch_threads(1):  # tiny models: see tests.helpers.torch_threads
        yield
