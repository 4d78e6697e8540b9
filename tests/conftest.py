"""Shared test setup: every test starts from the same seed, with l2vit's models registered."""
import pytest
import torch

import l2vit  # noqa: F401 (registers the models with timm)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
