"""L²ViT models, registered with timm on import."""
from ._weights import CheckpointError, check_checkpoint_file, load_checkpoint_file
from .l2vit import *  # noqa: F401,F403 (registers the entrypoints with timm)
from .l2vit import L2ViT, L2ViTBlock, L2ViTStage, checkpoint_filter_fn
