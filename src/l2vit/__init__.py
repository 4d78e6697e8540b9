"""l2vit: L²ViT (The Linear Attention Resurrection in Vision Transformer) as timm-native PyTorch models.

``import l2vit`` registers ``l2vit_tiny``, ``l2vit_small``, ``l2vit_base``, ``l2vit_base_384`` and ``test_l2vit``
with timm, so ``timm.create_model('l2vit_tiny')`` works afterwards.
"""
from timm import create_model, list_models

from .models import CheckpointError, L2ViT, checkpoint_filter_fn, load_checkpoint_file
from .version import __version__

__all__ = [
    'L2ViT', 'checkpoint_filter_fn', 'load_checkpoint_file', 'CheckpointError', 'create_model', 'list_models',
    '__version__',
]
