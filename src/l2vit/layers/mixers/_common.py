"""Small helpers shared by the related-work mixers: argument checks and official state-dict selection.

Nothing here computes attention; each mixer file owns its own maths.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = ['autocast_device', 'check_divisible', 'select_official', 'merge_q_kv', 'conv1x1_to_linear', 'query_index']


def autocast_device(x: torch.Tensor) -> str:
    """The device type whose autocast is active for ``x`` ('' when none is, or while FX traces the mixer).

    Mixers run their attention core in float32 when this is non-empty: their normalisers, powers and un-normalised
    sums (up to N·|v|) under- or overflow in float16. Call it only under ``if not torch.jit.is_scripting()``.
    """
    if isinstance(x, torch.fx.Proxy):
        return ''
    device_type = x.device.type
    try:
        return device_type if torch.is_autocast_enabled(device_type) else ''
    except RuntimeError:  # device types without autocast (e.g. 'meta', used to count MACs) cannot have it on
        return ''


def check_divisible(value: int, divisor: int, what: str, by: str) -> None:
    """Raise a ``ValueError`` unless ``value`` is a positive multiple of ``divisor``."""
    if divisor < 1 or value < 1 or value % divisor:
        raise ValueError(f'{what} ({value}) must be a positive multiple of {by} ({divisor})')


def select_official(state_dict: Mapping[str, torch.Tensor], prefix: str, mixer: str) -> dict[str, torch.Tensor]:
    """Entries of ``state_dict`` under ``prefix`` with the prefix stripped (all entries when ``prefix`` is empty).

    Args:
        state_dict: An official module-level state dict, or a whole official model state dict.
        prefix: Prefix of the mixer inside a model state dict, e.g. ``'layers.0.blocks.1.attn.'``.
        mixer: Mixer name for the error message.
    """
    if not isinstance(state_dict, Mapping):
        raise ValueError(f'expected a state dict (a mapping of names to tensors), got {type(state_dict).__name__}')
    if prefix and not prefix.endswith('.'):
        prefix = prefix + '.'
    out = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not out:
        raise ValueError(f'no {mixer} entries under prefix {prefix!r}; the state dict has e.g. '
                         f'{sorted(state_dict)[:6]}')
    for k, v in out.items():
        if not isinstance(v, torch.Tensor):
            raise ValueError(f'state dict entry {prefix + k!r} is a {type(v).__name__}, expected a tensor')
    return out


def merge_q_kv(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Merge the PVT-style ``q`` + ``kv`` projections into one ``qkv`` projection (rows q, k, v), in place."""
    if 'q.weight' not in sd:
        return sd
    if 'kv.weight' not in sd:
        raise ValueError("state dict has 'q.weight' but no 'kv.weight' (PVT-style layout needs both)")
    sd['qkv.weight'] = torch.cat([sd.pop('q.weight'), sd.pop('kv.weight')], dim=0)
    if 'q.bias' in sd or 'kv.bias' in sd:
        if not ('q.bias' in sd and 'kv.bias' in sd):
            raise ValueError("state dict has only one of 'q.bias' / 'kv.bias'")
        sd['qkv.bias'] = torch.cat([sd.pop('q.bias'), sd.pop('kv.bias')], dim=0)
    if any(k.startswith(('sr.', 'norm.')) for k in sd):
        raise ValueError('the official module was built with sr_ratio > 1 (it has sr.* / norm.* entries); '
                         'no released model uses that path and this mixer does not implement it')
    return sd


def conv1x1_to_linear(sd: dict[str, torch.Tensor], names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Reshape the ``(out, in, 1, 1)`` weights of official 1×1 convolutions to ``nn.Linear``'s ``(out, in)``."""
    for name in names:
        w = sd.get(name + '.weight')
        if w is not None and w.dim() == 4:
            if w.shape[2:] != (1, 1):
                raise ValueError(f'{name}.weight has shape {tuple(w.shape)}, expected a 1x1 convolution')
            sd[name + '.weight'] = w.flatten(1)
    return sd


def query_index(queries: torch.Tensor | None, num_tokens: int, device: torch.device) -> torch.Tensor:
    """The query tokens of an ``attention_weights`` call: ``queries`` checked and as int64, or all tokens if None.

    Every global mixer's ``attention_weights(x, queries)`` takes flat (row-major) token indices; this is the shared
    check.

    Args:
        queries: 1-D integer tensor of indices in ``[0, num_tokens)``, or None.
        num_tokens: Tokens of the map (``H·W``).
        device: Device of the returned index.
    """
    if queries is None:
        return torch.arange(num_tokens, device=device)
    if not isinstance(queries, torch.Tensor) or queries.dim() != 1 or queries.is_floating_point() \
            or queries.is_complex() or queries.dtype == torch.bool:
        raise ValueError(f'queries must be a 1-D integer tensor of flat token indices, got '
                         f'{getattr(queries, "shape", type(queries).__name__)} of {getattr(queries, "dtype", "-")}')
    if queries.numel() and (int(queries.min()) < 0 or int(queries.max()) >= num_tokens):
        raise ValueError(f'query indices must lie in [0, {num_tokens}) (the H·W tokens), got '
                         f'{int(queries.min())}..{int(queries.max())}')
    return queries.to(device=device, dtype=torch.long)
