"""Capture what each attention mixer of a model sees: the normed NHWC tokens that enter its ``attn`` module.

Attention maps are then recomputed from these tokens (:mod:`l2vit.analysis.attention_maps`). Hooking the mixer's
*input* rather than its internals keeps the analysis independent of how the mixers compute their output (fused
kernels, kv-first order, chunked scans, ...). For the mixers of :data:`SUPPORTED_MIXERS` the analysis recomputes
the weights itself from the mixer's ``qkv`` and ``num_heads``; for linear attention the feature-mapped queries and
keys are also taken from the mixer's ``q_probe`` / ``k_probe`` hook points when it fires them, so the maps follow
the mixer's own feature map. Any other mixer is analysed through its own ``attention_weights(x, queries)`` method
(rows of the token mixing it applies to its values); mixers without one, or whose method raises
``NotImplementedError`` for their configuration, are skipped with a warning.
"""
from __future__ import annotations

import math
import re
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    'AttentionInput', 'SUPPORTED_MIXERS', 'attention_blocks', 'block_label', 'capture_attention_inputs',
    'capture_module_inputs', 'block_stage', 'eval_mode', 'has_attention_rows', 'query_tokens', 'token_stride',
]

# mixers whose attention weights the analysis recomputes itself from (tokens, qkv); any other mixer with an
# ``attention_weights`` method is supported through that method
SUPPORTED_MIXERS = ('window', 'linear', 'softmax')


def has_attention_rows(mixer: nn.Module) -> bool:
    """Whether the analysis can form attention rows of ``mixer``: an exact path or an ``attention_weights`` method."""
    return getattr(mixer, 'mixer_name', None) in SUPPORTED_MIXERS or callable(getattr(mixer, 'attention_weights', None))


def block_label(name: str, kind: str, has_lcm: bool) -> str:
    """Short label for figures: ``'s2.b1 linear+LCM'`` for block ``'stages.2.blocks.1'``."""
    m = re.search(r'stages\.(\d+)\.blocks\.(\d+)', name)
    where = f's{m.group(1)}.b{m.group(2)}' if m else name
    return f'{where} {kind}{"+LCM" if has_lcm else ""}'


@dataclass
class AttentionInput:
    """One attention block's mixer and the tokens it received.

    Attributes:
        name: Block name in the model (``'stages.2.blocks.1'``); the mixer is ``<name>.attn``.
        kind: Registered mixer name: ``'window'`` (LWA), ``'linear'`` (LGA's attention), ``'softmax'`` or any other
            global mixer with an ``attention_weights`` method (``'flatten'``, ``'masa'``, ...).
        module: The mixer module (``block.attn``).
        tokens: Its input, the LayerNorm-ed tokens ``(B, H, W, C)`` (detached).
        stride: Input pixels per token at this block's stage.
        image_size: ``(height, width)`` of the input images.
        has_lcm: Whether the block has a Local Concentration Module after the mixer.
        stage: Stage index, when the name says it.
        block_input: The block's own input ``(B, H, W, C)`` (before its CPE and norm), for receptive fields.
        q_phi: Linear attention: feature-mapped queries ``(B, heads, H·W, d)`` seen at ``attn.q_probe``, or None
            (then φ = ReLU is applied to the recomputed queries).
        k_phi: The same for the keys (``attn.k_probe``).
        heads: Heads of the rows (default: ``module.num_heads``; FCViT's context has its own head count).
    """
    name: str
    kind: str
    module: nn.Module
    tokens: torch.Tensor
    stride: int
    image_size: tuple[int, int]
    has_lcm: bool
    stage: int | None = None
    block_input: torch.Tensor | None = None
    q_phi: torch.Tensor | None = None
    k_phi: torch.Tensor | None = None
    heads: int | None = None

    @property
    def grid_size(self) -> tuple[int, int]:
        """Token grid ``(H, W)``."""
        return int(self.tokens.shape[1]), int(self.tokens.shape[2])

    @property
    def num_heads(self) -> int:
        return int(self.heads if self.heads is not None else self.module.num_heads)

    @property
    def is_global(self) -> bool:
        """True for rows over all tokens (every mixer but window attention), False for window attention."""
        return self.kind != 'window'

    @property
    def label(self) -> str:
        """Short label for figures: ``'s2.b1 linear+LCM'``."""
        return block_label(self.name, self.kind, self.has_lcm)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for the duration (BatchNorm statistics, no dropout), then restore its mode."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def attention_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, block)`` of every module whose ``attn`` child is a registered token mixer, in model order."""
    return [
        (name, module) for name, module in model.named_modules()
        if isinstance(getattr(module, 'attn', None), nn.Module) and hasattr(module.attn, 'mixer_name')
    ]


def block_stage(name: str) -> int | None:
    """Stage index in a block name (``'stages.2.blocks.1'`` → 2), or None."""
    m = re.search(r'stages\.(\d+)\.', name + '.')
    return int(m.group(1)) if m else None


def token_stride(model: nn.Module, stage: int | None, image_size: tuple[int, int], grid: tuple[int, int]) -> int:
    """Input pixels per token of a stage (``feature_info``'s reduction, else the power of two nearest image/grid)."""
    info = getattr(model, 'feature_info', None)
    if stage is not None and isinstance(info, list) and stage < len(info) and 'reduction' in info[stage]:
        return int(info[stage]['reduction'])
    # every L²ViT stride is a power of two; padding makes image / grid slightly smaller than it
    return 2 ** round(math.log2(image_size[0] / grid[0]))


def _run_with_hooks(
        model: nn.Module,
        images: torch.Tensor,
        input_names: Iterable[str],
        output_names: Iterable[str] = (),
        forward: str = 'forward_features',
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    inputs: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}
    handles = []

    def pre_hook(name: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            inputs[name] = args[0].detach()
        return hook

    def post_hook(name: str):
        def hook(_module: nn.Module, _args: tuple, out: torch.Tensor) -> None:
            outputs[name] = out.detach()
        return hook

    try:
        for name in input_names:
            handles.append(model.get_submodule(name).register_forward_pre_hook(pre_hook(name)))
        for name in output_names:
            handles.append(model.get_submodule(name).register_forward_hook(post_hook(name)))
        with torch.no_grad(), eval_mode(model):
            getattr(model, forward)(images)
    finally:
        for h in handles:
            h.remove()
    return inputs, outputs


def capture_module_inputs(
        model: nn.Module,
        images: torch.Tensor,
        names: Iterable[str],
        forward: str = 'forward_features',
) -> dict[str, torch.Tensor]:
    """Run ``model`` on ``images`` (no grad, eval mode) and return the first positional input of each named module.

    Args:
        model: The model.
        images: Image batch ``(B, C, H, W)``, normalised as the model expects.
        names: Module names (``model.get_submodule`` paths).
        forward: Model method to run (``'forward_features'`` skips the classifier).
    """
    return _run_with_hooks(model, images, names, (), forward)[0]


def _probe(out: torch.Tensor | None, x: torch.Tensor, heads: int) -> torch.Tensor | None:
    """A probe's output if it has the expected ``(B, heads, H·W, d)`` layout, else None (recompute instead)."""
    B, H, W, _ = x.shape
    if isinstance(out, torch.Tensor) and out.dim() == 4 and tuple(out.shape[:3]) == (B, heads, H * W):
        return out
    return None


def capture_attention_inputs(
        model: nn.Module,
        images: torch.Tensor,
        blocks: Sequence[str] | None = None,
) -> list[AttentionInput]:
    """Capture the input tokens of every attention mixer of ``model`` whose rows the analysis can form.

    Args:
        model: An L²ViT-style model (blocks with a registered ``attn`` mixer).
        images: Image batch ``(B, C, H, W)``, normalised as the model expects.
        blocks: Block names to capture (default: all attention blocks). Unknown names raise a ``ValueError``.

    Returns:
        One :class:`AttentionInput` per block, in model order. Blocks whose mixer is neither one of
        :data:`SUPPORTED_MIXERS` nor has an ``attention_weights`` method, and blocks whose ``attention_weights``
        raises ``NotImplementedError`` (checked on one query row), are skipped with a warning.
    """
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError(f'expected an image batch tensor (B, C, H, W), got {getattr(images, "shape", type(images))}')
    found = attention_blocks(model)
    if not found:
        raise ValueError(f'{type(model).__name__} has no attention blocks (modules with a registered `attn` mixer)')
    by_name = dict(found)
    if blocks is not None:
        unknown = [b for b in blocks if b not in by_name]
        if unknown:
            raise ValueError(f'unknown attention block(s) {unknown}; the model has {list(by_name)}')
        found = [(b, by_name[b]) for b in by_name if b in set(blocks)]
    skipped = [n for n, b in found if not has_attention_rows(b.attn)]
    if skipped:
        warnings.warn(f'no attention maps for mixer(s) {sorted({by_name[n].attn.mixer_name for n in skipped})} '
                      f'(blocks {skipped}): neither one of {SUPPORTED_MIXERS} nor with an attention_weights method',
                      stacklevel=2)
    found = [(n, b) for n, b in found if has_attention_rows(b.attn)]
    names = [n for n, _ in found]
    probes = [f'{n}.attn.{p}' for n, b in found if b.attn.mixer_name == 'linear'
              for p in ('q_probe', 'k_probe') if isinstance(getattr(b.attn, p, None), nn.Module)]
    tokens, probed = _run_with_hooks(model, images, names + [f'{n}.attn' for n in names], probes)
    image_size = (int(images.shape[-2]), int(images.shape[-1]))
    out = []
    for name, block in found:
        x = tokens[f'{name}.attn']
        heads = None
        if block.attn.mixer_name not in SUPPORTED_MIXERS:
            try:
                heads = _row_heads(block.attn, x)
            except NotImplementedError as e:
                warnings.warn(f'no attention maps for block {name} ({block.attn.mixer_name}): {e}', stacklevel=2)
                continue
        stage = block_stage(name)
        out.append(AttentionInput(
            name=name,
            kind=block.attn.mixer_name,
            module=block.attn,
            tokens=x,
            stride=token_stride(model, stage, image_size, (x.shape[1], x.shape[2])),
            image_size=image_size,
            has_lcm=getattr(block, 'local_mp', None) is not None,
            stage=stage,
            block_input=tokens[name],
            q_phi=_probe(probed.get(f'{name}.attn.q_probe'), x, getattr(block.attn, 'num_heads', 0)),
            k_phi=_probe(probed.get(f'{name}.attn.k_probe'), x, getattr(block.attn, 'num_heads', 0)),
            heads=heads,
        ))
    return out


def _row_heads(mixer: nn.Module, tokens: torch.Tensor) -> int:
    """Heads of ``mixer.attention_weights`` rows, from one query row of the first image (raises what it raises)."""
    first = torch.zeros(1, dtype=torch.long, device=tokens.device)
    with torch.no_grad(), eval_mode(mixer):
        rows = mixer.attention_weights(tokens[:1], first)
    n = tokens.shape[1] * tokens.shape[2]
    if rows.dim() != 4 or rows.shape[0] != 1 or rows.shape[2] != 1 or rows.shape[3] != n:
        raise ValueError(f'{type(mixer).__name__}.attention_weights returned shape {tuple(rows.shape)} for one query '
                         f'of one {tokens.shape[1]}x{tokens.shape[2]} map; expected (1, heads, 1, {n})')
    return int(rows.shape[1])


def query_tokens(
        points: Sequence[tuple[float, float]],
        grid_size: tuple[int, int],
        stride: int,
        image_size: tuple[int, int],
) -> list[tuple[int, int]]:
    """Token ``(row, col)`` under each query point given as image fractions ``(y, x)`` in ``[0, 1]``.

    ``(0.5, 0.5)`` is the image centre. The point is placed at pixel ``fraction × (size - 1)`` and mapped to the
    token of the given stride that covers it.
    """
    out = []
    for point in points:
        if len(point) != 2 or not all(0. <= float(v) <= 1. for v in point):
            raise ValueError(f'query points are (y, x) fractions of the image size in [0, 1], got {point}')
        fy, fx = (float(v) for v in point)
        row = min(int(fy * (image_size[0] - 1) // stride), grid_size[0] - 1)
        col = min(int(fx * (image_size[1] - 1) // stride), grid_size[1] - 1)
        out.append((row, col))
    return out
