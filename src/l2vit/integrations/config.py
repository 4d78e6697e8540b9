"""Recipes of ``l2vit det`` and ``l2vit seg``: typed dataclass trees read from YAML plus dotted-key overrides.

The YAML mechanics (``base:`` inheritance, unknown-key and type errors naming the key, ``section.key=value``
overrides parsed as YAML) are the training engine's; only the trees are defined here. Defaults are the official
recipes (spec §6.2 and §6.4): Mask R-CNN 1x on L²ViT-T for detection, UperNet 160k on L²ViT-T for segmentation.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..engine.config import ConfigError, apply_overrides, config_to_dict, dataclass_from_dict, read_yaml_config

__all__ = [
    'OptimSection', 'SchedSection', 'RunSection', 'DetModelConfig', 'DetDataConfig', 'DetAugConfig', 'DetConfig',
    'SegModelConfig', 'SegOptimSection', 'SegSchedSection', 'SegDataConfig', 'SegAugConfig', 'SegTestConfig', 'SegConfig', 'load_dense_config',
    'dense_config_from_dict', 'dense_config_to_dict', 'ConfigError',
]


@dataclass
class OptimSection:
    """AdamW (timm ``create_optimizer_v2``); the official recipes decay every parameter, norms and biases too."""
    opt: str = 'adamw'
    lr: float = 1e-4
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    decay_norm_and_bias: bool = True  # False: timm's rule (no decay on 1-D parameters and biases)
    clip_grad: float | None = None  # max gradient norm; None: no clipping (official)


@dataclass
class SchedSection:
    """Per-iteration learning rate: linear warm-up (mmcv: factor ``1 - (1 - it/warmup_iters)(1 - warmup_ratio)``
    on the regular lr), then step decay or poly decay."""
    policy: str = 'step'  # step | poly
    milestones: list[int] = field(default_factory=lambda: [8, 11])  # step: epochs (det) or iterations (seg)
    gamma: float = 0.1  # step: factor at each milestone
    power: float = 1.0  # poly: exponent
    min_lr: float = 0.0  # poly: final lr
    warmup_iters: int = 500
    warmup_ratio: float = 0.001


@dataclass
class RunSection:
    """Checkpointing, logging and run-wide switches shared by both tasks."""
    keep_last: int = 2  # evaluation-interval checkpoints kept besides the best one
    recovery_interval: int = 0  # iterations between mid-interval recovery checkpoints (0: none)
    log_interval: int = 50  # iterations between log lines
    tensorboard: bool = False
    draw: int = 4  # validation images drawn as PNG at each evaluation (0: none)
    find_unused_parameters: bool = False  # DDP option for models with branches unused in some steps
    keep_freed_memory: bool = True  # CPU runs on glibc: reuse large freed blocks (faster steps, more resident memory)


@dataclass
class DetModelConfig:
    """Detector and backbone."""
    detector: str = 'mask_rcnn'  # mask_rcnn | retinanet
    backbone: str = 'l2vit_tiny'
    drop_path_rate: float = 0.1
    window_size: int | None = None  # None: the backbone's own; the official detection code always uses 7
    frozen_stages: int = -1
    norm_eval: bool = False
    pretrained: str | None = None  # ImageNet weights: official .pth, converted dir, our run / checkpoint
    pretrained_ema: bool = False  # the official recipe loads the raw 'model' weights
    fpn_channels: int = 256
    test_size: int = 800  # test-time shorter side
    max_size: int = 1333  # test-time longer-side cap
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm.create_model arguments
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra torchvision detector arguments


@dataclass
class DetDataConfig:
    """A COCO-format dataset: annotation json + image folder per split, relative to ``root``."""
    root: str | None = None
    train_ann: str = 'annotations/instances_train2017.json'
    train_images: str = 'train2017'
    val_ann: str = 'annotations/instances_val2017.json'
    val_images: str = 'val2017'
    skip_empty: bool = True  # training: leave out images without usable annotations (mmdet filter_empty_gt)
    num_workers: int = 2


@dataclass
class DetAugConfig:
    """Training augmentation (see :mod:`l2vit.integrations.det_transforms`)."""
    hflip: float = 0.5
    policy: str = 'detr'  # detr | multiscale | single
    scales: list[int] = field(default_factory=lambda: list(range(480, 801, 32)))
    max_size: int = 1333
    crop_scales: list[int] = field(default_factory=lambda: [400, 500, 600])
    crop_size: tuple[int, int] = (384, 600)


@dataclass
class DetConfig:
    """A detection recipe; the default is Mask R-CNN 1x on L²ViT-T (batch per process; official 8 GPUs × 2)."""
    model: DetModelConfig = field(default_factory=DetModelConfig)
    data: DetDataConfig = field(default_factory=DetDataConfig)
    aug: DetAugConfig = field(default_factory=DetAugConfig)
    optim: OptimSection = field(default_factory=OptimSection)
    sched: SchedSection = field(default_factory=SchedSection)
    run: RunSection = field(default_factory=RunSection)
    epochs: int = 12
    batch_size: int = 2
    eval_interval: int = 1  # epochs between evaluations (the last epoch is always evaluated)
    max_iters: int | None = None  # stop after this many iterations (short runs; the schedule keeps its epochs)
    seed: int = 0
    device: str = 'auto'
    amp: str = 'none'  # none | bf16 | fp16 (the official recipe trains in fp32)
    threads: int | None = None
    output: str = 'runs/det'

    def validate(self) -> DetConfig:
        _common_checks(self)
        m, a = self.model, self.aug
        _check([
            (m.detector in ('mask_rcnn', 'retinanet'), f"model.detector must be mask_rcnn or retinanet, got "
                                                       f"'{m.detector}'"),
            (self.epochs >= 1, 'epochs must be >= 1'),
            (self.eval_interval >= 1, 'eval_interval must be >= 1'),
            (a.policy in ('detr', 'multiscale', 'single'), f"aug.policy must be detr, multiscale or single, got "
                                                            f"'{a.policy}'"),
            (bool(a.scales) and all(s > 0 for s in a.scales), 'aug.scales must list positive sizes'),
            (0 < a.crop_size[0] <= a.crop_size[1], 'aug.crop_size must be (min, max) with 0 < min <= max'),
            (all(ms > 0 for ms in self.sched.milestones), f'sched.milestones (epochs) must be positive, got '
                                                           f'{self.sched.milestones}'),
        ])
        return self


@dataclass
class SegModelConfig:
    """UperNet and backbone."""
    backbone: str = 'l2vit_tiny'
    drop_path_rate: float = 0.3
    window_size: int | None = None
    frozen_stages: int = -1
    norm_eval: bool = False
    pretrained: str | None = None
    pretrained_ema: bool = False
    num_classes: int = 150
    channels: int = 512
    pool_scales: list[int] = field(default_factory=lambda: [1, 2, 3, 6])
    dropout: float = 0.1
    aux_channels: int = 256
    aux_weight: float = 0.4  # 0 removes the auxiliary head
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class SegDataConfig:
    """Image and mask folders per split (ADE20K layout by default), relative to ``root``."""
    root: str | None = None
    train_images: str = 'images/training'
    train_masks: str = 'annotations/training'
    val_images: str = 'images/validation'
    val_masks: str = 'annotations/validation'
    mask_suffix: str = '.png'
    reduce_zero_label: bool = True
    ignore_index: int = 255
    class_names: list[str] | None = None  # None: ADE20K's names for 150 classes, else 'class <i>'
    mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    std: tuple[float, float, float] = (58.395, 57.12, 57.375)
    num_workers: int = 2


@dataclass
class SegAugConfig:
    """Training augmentation (see :mod:`l2vit.integrations.seg_data`)."""
    scale: tuple[int, int] = (2048, 512)
    ratio_range: tuple[float, float] = (0.5, 2.0)
    crop_size: tuple[int, int] = (512, 512)
    cat_max_ratio: float = 0.75
    hflip: float = 0.5
    photometric: bool = True


@dataclass
class SegTestConfig:
    """Inference: whole image (the official setting) or sliding window, after a keep-ratio rescale."""
    mode: str = 'whole'  # whole | slide
    scale: tuple[int, int] | None = (2048, 512)  # None: original size
    crop_size: tuple[int, int] = (512, 512)  # slide
    stride: tuple[int, int] = (341, 341)  # slide


# Sections with other defaults for segmentation are subclasses, not default factories: a recipe that sets one key
# of a section gets the section's class defaults for the others.
@dataclass
class SegOptimSection(OptimSection):
    """AdamW of the UperNet recipe: lr 6e-5, weight decay 0.01."""
    lr: float = 6e-5
    weight_decay: float = 0.01


@dataclass
class SegSchedSection(SchedSection):
    """Poly decay (power 1) to 0 by iteration, linear warm-up 1500 iterations from 1e-6."""
    policy: str = 'poly'
    milestones: list[int] = field(default_factory=list)  # step policy only: iterations
    warmup_iters: int = 1500
    warmup_ratio: float = 1e-6


@dataclass
class SegConfig:
    """A segmentation recipe; the default is UperNet 160k on L²ViT-T (batch per process; official 8 GPUs × 2)."""
    model: SegModelConfig = field(default_factory=SegModelConfig)
    data: SegDataConfig = field(default_factory=SegDataConfig)
    aug: SegAugConfig = field(default_factory=SegAugConfig)
    test: SegTestConfig = field(default_factory=SegTestConfig)
    optim: SegOptimSection = field(default_factory=SegOptimSection)
    sched: SegSchedSection = field(default_factory=SegSchedSection)
    run: RunSection = field(default_factory=RunSection)
    iters: int = 160000
    batch_size: int = 2
    eval_interval: int = 16000  # iterations between evaluations and checkpoints (the last one always)
    max_iters: int | None = None  # stop after this many iterations (short runs; the schedule keeps its length)
    seed: int = 0
    device: str = 'auto'
    amp: str = 'none'
    threads: int | None = None
    output: str = 'runs/seg'

    def validate(self) -> SegConfig:
        _common_checks(self)
        t = self.test
        _check([
            (self.iters >= 1, 'iters must be >= 1'),
            (self.eval_interval >= 1, 'eval_interval must be >= 1'),
            (self.model.num_classes >= 1, 'model.num_classes must be >= 1'),
            (t.mode in ('whole', 'slide'), f"test.mode must be whole or slide, got '{t.mode}'"),
            (min(self.aug.crop_size) >= 32, 'aug.crop_size must be at least 32 x 32'),
            (self.data.class_names is None or len(self.data.class_names) == self.model.num_classes,
             'data.class_names must list model.num_classes names'),
        ])
        return self


def _check(checks: list[tuple[bool, str]]) -> None:
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def _common_checks(cfg: DetConfig | SegConfig) -> None:
    s = cfg.sched
    _check([
        (cfg.batch_size >= 1, 'batch_size must be >= 1'),
        (cfg.amp in ('none', 'bf16', 'fp16'), f"amp must be none, bf16 or fp16, got '{cfg.amp}'"),
        (s.policy in ('step', 'poly'), f"sched.policy must be step or poly, got '{s.policy}'"),
        (s.warmup_iters >= 0 and 0 < s.warmup_ratio <= 1, 'sched.warmup_iters must be >= 0 and warmup_ratio in (0, 1]'),
        (cfg.optim.lr > 0, 'optim.lr must be > 0'),
        (cfg.run.keep_last >= 1, 'run.keep_last must be >= 1'),
        (cfg.run.log_interval >= 1, 'run.log_interval must be >= 1'),
        (cfg.run.recovery_interval >= 0, 'run.recovery_interval must be >= 0'),
        (cfg.threads is None or cfg.threads >= 1, 'threads must be >= 1'),
        (cfg.model.frozen_stages >= -1, 'model.frozen_stages must be >= -1'),
    ])


_TASKS = {'det': DetConfig, 'seg': SegConfig}


def dense_config_from_dict(task: str, data: dict[str, Any]) -> DetConfig | SegConfig:
    """Build and validate the ``task`` (``'det'`` / ``'seg'``) config from a (partial) nested dict."""
    if task not in _TASKS:
        raise ValueError(f"task must be 'det' or 'seg', got '{task}'")
    data = dict(data)
    declared = data.pop('task', task)
    if declared != task:
        raise ConfigError(f"this is a '{declared}' recipe, not a '{task}' one")
    return dataclass_from_dict(_TASKS[task], data).validate()


def dense_config_to_dict(cfg: DetConfig | SegConfig) -> dict[str, Any]:
    """The config as a plain dict (with ``task``), as stored in checkpoints and ``config.yaml``."""
    task = 'det' if isinstance(cfg, DetConfig) else 'seg'
    return {'task': task, **config_to_dict(cfg)}  # type: ignore[arg-type]


def load_dense_config(task: str, path: str | os.PathLike | None = None,
                      overrides: dict[str, Any] | None = None) -> DetConfig | SegConfig:
    """Read a YAML recipe (``base:`` chains allowed; None: the defaults) and apply dotted-key overrides."""
    data = read_yaml_config(Path(path)) if path is not None else {}
    return dense_config_from_dict(task, apply_overrides(data, overrides or {}))

