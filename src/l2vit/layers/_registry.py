"""Registry of token mixers (attention variants) that an L²ViT block can use.

A mixer is an ``nn.Module`` class that maps ``(B, H, W, C)`` tokens to the same shape. It is registered under a short
name together with whether it is *local* (windowed, like LWA) or *global* (mixes all tokens, like LGA). The block
uses that flag to pick its default post-attention module: a second CPE after local mixers, the Local Concentration
Module after global ones (spec §2.5/§2.6).

Adding a mixer is one file in ``l2vit/layers/mixers/`` with ``@register_mixer('name', local=...)`` on the class,
plus one import line in ``l2vit/layers/mixers/__init__.py``.
"""
from __future__ import annotations

from typing import Callable, TypeVar

from torch import nn

__all__ = ['register_mixer', 'get_mixer', 'list_mixers', 'create_mixer', 'is_local_mixer']

_MIXERS: dict[str, type[nn.Module]] = {}
_ModT = TypeVar('_ModT', bound=type)


def register_mixer(name: str, *, local: bool) -> Callable[[_ModT], _ModT]:
    """Class decorator registering a token mixer under ``name``.

    Args:
        name: Registry name used in ``block_pattern`` (lower case, no spaces).
        local: True for windowed mixers (LWA-like), False for global ones (LGA-like).
    """
    def _register(cls: _ModT) -> _ModT:
        if name in _MIXERS and _MIXERS[name] is not cls:
            raise ValueError(f"mixer name '{name}' is already registered to {_MIXERS[name].__qualname__}")
        cls.mixer_name = name
        cls.is_local = local
        _MIXERS[name] = cls
        return cls
    return _register


def list_mixers() -> list[str]:
    """Names of all registered mixers, sorted."""
    return sorted(_MIXERS)


def get_mixer(name: str) -> type[nn.Module]:
    """Return the mixer class registered under ``name``; unknown names raise a ``ValueError`` listing the options."""
    try:
        return _MIXERS[name]
    except KeyError:
        raise ValueError(f"unknown token mixer '{name}'; expected one of {list_mixers()}") from None


def is_local_mixer(name: str) -> bool:
    """Whether the mixer registered under ``name`` is windowed (local)."""
    return bool(get_mixer(name).is_local)


def create_mixer(name: str, dim: int, num_heads: int, **kwargs) -> nn.Module:
    """Instantiate mixer ``name`` with the shared signature ``(dim, num_heads, **kwargs)``."""
    return get_mixer(name)(dim, num_heads, **kwargs)
