"""The one place that touches private timm paths, so a timm refactor breaks one import, not the model."""
from timm.models._features import feature_take_indices

__all__ = ['feature_take_indices']
