"""Data: ImageFolder and built-in digits sources, timm transforms, seeded datasets, resumable samplers."""
from .class_names import class_names_for
from .dataset import TransformedDataset, collate_skipping, sample_seed
from .loader import EpochSampler, ShardSampler, build_eval_loader, build_train_loader
from .sources import IMG_EXTENSIONS, BadImageError, DataError, DigitsSource, FolderSource, ImageSource, build_sources
from .transforms import build_eval_transform, build_train_transform, eval_crop

__all__ = [
    'class_names_for', 'TransformedDataset', 'collate_skipping', 'sample_seed', 'EpochSampler', 'ShardSampler',
    'build_eval_loader', 'build_train_loader', 'IMG_EXTENSIONS', 'BadImageError', 'DataError', 'DigitsSource',
    'FolderSource', 'ImageSource', 'build_eval_transform', 'build_train_transform', 'eval_crop', 'build_sources',
]

