"""Does half precision change the answers? Top-1 agreement and logit error of bf16/fp16 against fp32 on real photos.

The images are real photographs: the files of a folder, or by default crops of the two photos that scikit-learn
ships (``load_sample_images``: a temple in China and a flower), so the check needs no download. Weights are random
unless a checkpoint is given; a random model's logits are nearly tied (top-2 margins of a few hundredths), so next to
plain agreement the report gives the agreement on *decisive* images, those whose fp32 top-2 margin exceeds twice the
largest logit error, which is what a trained model's predictions look like.
"""
from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .runner import DTYPES, create_model

__all__ = ['PrecisionReport', 'sample_photos', 'precision_check']

_IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.webp')


@dataclass
class PrecisionReport:
    """Half-precision logits against fp32 logits of the same model and images.

    Attributes:
        model: Model name.
        dtype: ``'bf16'`` or ``'fp16'``.
        cast: ``'autocast'`` or ``'model'``.
        images: Number of images.
        top1_agreement: Fraction of images whose top-1 class is the same.
        decisive_images: Images whose fp32 top-2 margin exceeds twice the largest logit error.
        decisive_agreement: Top-1 agreement on those (None if there are none).
        max_abs_error: Largest absolute logit difference.
        mean_abs_error: Mean absolute logit difference.
        rel_error: ``max_abs_error / max |fp32 logit|``.
        median_margin: Median fp32 top-2 margin.
        weights: ``'random'`` or the checkpoint path.
        freeze: The half-precision model ran compiled with frozen weights
            (:func:`l2vit.export.compile_for_inference`).
    """
    model: str
    dtype: str
    cast: str
    images: int
    top1_agreement: float
    decisive_images: int
    decisive_agreement: float | None
    max_abs_error: float
    mean_abs_error: float
    rel_error: float
    median_margin: float
    weights: str
    freeze: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def sample_photos(n: int = 64, size: int = 224, folder: str | Path | None = None, seed: int = 0) -> torch.Tensor:
    """``n`` real photos as a uint8 ``(n, 3, size, size)`` batch: random resized crops (with flips) of the images in
    ``folder``, or of scikit-learn's two sample photos when ``folder`` is None."""
    import numpy as np
    from PIL import Image
    from torchvision.transforms import v2 as T
    if folder is not None:
        files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
        if not files:
            raise FileNotFoundError(f'no images ({", ".join(_IMAGE_SUFFIXES)}) in {folder}')
        photos = [np.asarray(Image.open(p).convert('RGB')) for p in files]
    else:
        from sklearn.datasets import load_sample_images
        photos = list(load_sample_images().images)
    scale = (0.08, 1.0) if len(photos) >= n else (0.04, 0.5)  # few photos: smaller crops, more distinct views
    crop = T.Compose([T.RandomResizedCrop(size, scale=scale, antialias=True), T.RandomHorizontalFlip()])
    torch.manual_seed(seed)
    return torch.stack([crop(torch.as_tensor(np.array(photos[i % len(photos)])).permute(2, 0, 1)) for i in range(n)])


@torch.inference_mode()
def precision_check(
        model_name: str = 'l2vit_tiny',
        dtype: str = 'bf16',
        cast: str = 'autocast',
        images: torch.Tensor | None = None,
        checkpoint: str | None = None,
        device: str = 'cpu',
        batch_size: int = 16,
        freeze: bool = False,
) -> PrecisionReport:
    """Compare ``model_name``'s logits in ``dtype`` (via ``cast``) with its fp32 logits on real photos.

    Args:
        model_name: timm model name.
        dtype: ``'bf16'`` or ``'fp16'``.
        cast: ``'autocast'`` or ``'model'`` (weights and input cast to ``dtype``).
        images: uint8 ``(N, 3, H, W)`` photos (default: :func:`sample_photos`).
        checkpoint: Weights file for the model (default: random weights, see the module notes).
        device: Where to run.
        batch_size: Images per forward pass.
        freeze: Run the half-precision model compiled with frozen weights
            (:func:`l2vit.export.compile_for_inference`), the fastest CPU path.
    """
    if dtype not in ('bf16', 'fp16'):
        raise ValueError(f"dtype must be 'bf16' or 'fp16', got '{dtype}'")
    images = sample_photos() if images is None else images
    kwargs = {}
    if checkpoint:
        kwargs = dict(pretrained=True, pretrained_cfg_overlay=dict(file=str(checkpoint)))
    torch.manual_seed(0)
    model = create_model(model_name, images.shape[-2], images.shape[-1], **kwargs).to(device).eval()
    cfg = model.pretrained_cfg
    mean = torch.tensor(cfg.get('mean', (0.485, 0.456, 0.406)), device=device).view(1, 3, 1, 1)
    std = torch.tensor(cfg.get('std', (0.229, 0.224, 0.225)), device=device).view(1, 3, 1, 1)
    half = DTYPES[dtype]
    half_model = model
    if cast == 'model':
        half_model = create_model(model_name, images.shape[-2], images.shape[-1]).to(device).eval()
        half_model.load_state_dict(model.state_dict())
        half_model = half_model.to(half)
    if freeze:
        from ..export import compile_for_inference
        half_model = compile_for_inference(half_model)
    ref, out = [], []
    for chunk in images.split(batch_size):
        x = (chunk.to(device).float() / 255 - mean) / std
        ref.append(model(x).float())
        if cast == 'autocast':
            ctx = torch.autocast(torch.device(device).type, dtype=half)
            x_half = x
        else:
            ctx = contextlib.nullcontext()
            x_half = x.to(half)
        with ctx:
            out.append(half_model(x_half).float())
    ref, out = torch.cat(ref), torch.cat(out)
    err = (out - ref).abs()
    top2 = ref.topk(2, dim=-1).values
    margin = top2[:, 0] - top2[:, 1]
    agree = out.argmax(-1) == ref.argmax(-1)
    decisive = margin > 2 * err.max()
    return PrecisionReport(
        model=model_name,
        dtype=dtype,
        cast=cast,
        images=len(ref),
        top1_agreement=agree.float().mean().item(),
        decisive_images=int(decisive.sum()),
        decisive_agreement=agree[decisive].float().mean().item() if decisive.any() else None,
        max_abs_error=err.max().item(),
        mean_abs_error=err.mean().item(),
        rel_error=(err.max() / ref.abs().max()).item(),
        median_margin=margin.median().item(),
        weights=str(checkpoint) if checkpoint else 'random',
        freeze=freeze,
    )
