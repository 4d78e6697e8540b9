"""Training configuration: a typed dataclass tree, read from YAML and command-line overrides, stored as a plain dict.

A recipe is a YAML file whose sections mirror :class:`TrainConfig` (``model``, ``data``, ``aug``, ...). A file may
start from another with ``base: other.yaml`` (path relative to the file), then override any key. Overrides on the
command line use dotted keys (``optim.lr=1e-3``, values parsed as YAML). Unknown keys and values of the wrong type
are errors that name the key and what was expected. The defaults are the paper's ImageNet-1K recipe (spec §5.1).
"""
from __future__ import annotations

import copy
import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

__all__ = [
    'ModelConfig', 'FinetuneConfig', 'DataConfig', 'AugConfig', 'OptimConfig', 'SchedConfig', 'EmaConfig',
    'CheckpointConfig', 'LogConfig', 'TrainConfig', 'ConfigError', 'load_config', 'config_from_dict',
    'config_to_dict', 'apply_overrides', 'collect_overrides', 'parse_override', 'config_diff', 'dataclass_from_dict', 'read_yaml_config',
]

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class ConfigError(ValueError):
    """A configuration file or override is invalid: unknown key, wrong type or impossible value."""


@dataclass
class ModelConfig:
    """Which network to train."""
    name: str = 'l2vit_tiny'  # any timm model name; l2vit_tiny / _small / _base / _base_384, test_l2vit
    num_classes: int | None = None  # None: the number of classes of the training data
    drop_path_rate: float = 0.1  # max stochastic depth (spec: B 0.3; T/S not published)
    drop_rate: float = 0.0  # dropout before the classifier
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm.create_model arguments (dims, depths, ...)
    grad_checkpointing: bool = False  # trade compute for activation memory
    sync_bn: bool = False  # SyncBatchNorm under DDP on CUDA (the official recipe keeps per-GPU BatchNorm)


@dataclass
class FinetuneConfig:
    """Initial weights for fine-tuning (spec §5.3); None trains from scratch."""
    checkpoint: str | None = None  # our run/checkpoint dir, a converted dir, an official .pth, or .safetensors
    use_ema: bool = False  # take EMA weights when the source has both (the official fine-tuning takes 'model')
    head_class_map: str | None = None  # text file of class indices (one per line) to slice the classifier rows


@dataclass
class DataConfig:
    """Where the images come from and how they are read (augmentation is in :class:`AugConfig`)."""
    data_dir: str | None = None  # ImageFolder root with train/ and val/ class folders; None: built-in digits
    train_split: str = 'train'
    val_split: str = 'val'
    input_size: int = 224
    crop_pct: float | None = None  # eval crop; None: 0.875 center crop below 384 px, direct resize at >= 384
    interpolation: str = 'bicubic'  # eval resize interpolation
    mean: tuple[float, ...] = _IMAGENET_MEAN
    std: tuple[float, ...] = _IMAGENET_STD
    num_workers: int = 8  # data loader processes per training process
    pin_memory: bool = True
    val_batch_size: int | None = None  # None: 1.5 x batch_size, as the official code
    val_fraction: float = 0.2  # built-in digits only: share of each class held out for validation


@dataclass
class AugConfig:
    """Training augmentation (timm create_transform, Mixup/CutMix)."""
    auto_augment: str | None = 'rand-m9-mstd0.5-inc1'
    scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area range
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    vflip: float = 0.0
    color_jitter: float | None = 0.4  # ignored by timm when auto_augment is set
    interpolation: str = 'bicubic'  # train crop interpolation
    reprob: float = 0.25  # random erasing probability
    remode: str = 'pixel'
    recount: int = 1
    mixup: float = 0.8  # mixup alpha (0 disables)
    cutmix: float = 1.0  # cutmix alpha (0 disables)
    cutmix_minmax: tuple[float, float] | None = None
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = 'batch'
    smoothing: float = 0.1  # label smoothing


@dataclass
class OptimConfig:
    """Optimizer (timm create_optimizer_v2) and gradient handling."""
    opt: str = 'adamw'
    lr: float = 4e-3  # absolute peak learning rate (no batch-size scaling rule)
    weight_decay: float = 0.05
    betas: tuple[float, float] | None = None  # None: the optimizer's default (AdamW: 0.9, 0.999 as official)
    eps: float | None = None  # None: the optimizer's default (AdamW: 1e-8 as official)
    momentum: float = 0.9  # SGD-like optimizers only
    fused: bool | None = None  # torch's fused step (Adam/AdamW/SGD, CPU and CUDA); None: wherever it exists
    decay_temperature: bool = True  # official: the per-head attention temperatures are decayed like weights
    no_weight_decay: list[str] = field(default_factory=list)  # extra name patterns exempt from weight decay
    layer_decay: float | None = None  # layer-wise lr decay (not used by the paper)
    clip_grad: float | None = None  # None: no clipping (official)
    clip_mode: str = 'norm'  # norm | value | agc
    update_freq: int = 4  # gradient accumulation: micro-batches per optimizer step (official: 8 GPUs x 128 x 4)


@dataclass
class SchedConfig:
    """Per-iteration learning-rate schedule (timm create_scheduler_v2): linear warm-up, then decay."""
    sched: str = 'cosine'
    warmup_epochs: float = 20
    warmup_lr: float = 0.0  # lr at the first step of warm-up
    min_lr: float = 1e-6


@dataclass
class EmaConfig:
    """Exponential moving average of the weights (timm ModelEmaV3), updated after every optimizer step."""
    enabled: bool = True
    decay: float = 0.9999
    warmup: bool = False  # timm's decay warm-up (useful for short runs)
    eval: bool = True  # evaluate the EMA weights every evaluation epoch and keep the best-EMA checkpoint


@dataclass
class CheckpointConfig:
    """What is saved and kept."""
    keep_last: int = 2  # epoch checkpoints kept besides best and best-EMA
    save_interval: int = 1  # epochs between epoch checkpoints (the last epoch is always saved)
    recovery_interval: int = 0  # optimizer steps between mid-epoch recovery checkpoints (0: none)


@dataclass
class LogConfig:
    """Console, file and event logging."""
    interval: int = 50  # steps between log lines
    progress: str = 'auto'  # bar | log | none | auto (bar when stderr is a terminal, else log lines)
    tensorboard: bool = False  # also write TensorBoard scalars to <output>/tensorboard
    step_events: bool = False  # write every step's loss to events.jsonl (else only at log intervals)
    plot: bool = True  # learning_curve.png after every evaluation


@dataclass
class TrainConfig:
    """A complete training recipe. Defaults: ImageNet-1K from scratch, spec §5.1 (batch is per process)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    data: DataConfig = field(default_factory=DataConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    epochs: int = 300
    batch_size: int = 128  # per process; global batch = batch_size x processes x optim.update_freq
    eval_interval: int = 1  # epochs between evaluations (the last epoch is always evaluated)
    seed: int = 0
    device: str = 'auto'  # auto | cpu | cuda | cuda:N
    amp: str = 'none'  # none | bf16 | fp16 (autocast; the paper trains in fp32)
    deterministic: bool = False  # torch.use_deterministic_algorithms (slower on CUDA)
    threads: int | None = None  # CPU threads per process for torch ops (None: torch's default)
    keep_freed_memory: bool = True  # CPU runs on glibc: reuse large freed blocks (faster steps, more resident memory)
    output: str = 'runs/train'  # the run directory

    def validate(self) -> TrainConfig:
        """Check values that types alone cannot; returns ``self``."""
        checks = [
            (self.epochs >= 1, 'epochs must be >= 1'),
            (self.batch_size >= 1, 'batch_size must be >= 1'),
            (self.eval_interval >= 1, 'eval_interval must be >= 1'),
            (self.optim.update_freq >= 1, 'optim.update_freq must be >= 1'),
            (self.amp in ('none', 'bf16', 'fp16'), f"amp must be none, bf16 or fp16, got '{self.amp}'"),
            (self.log.progress in ('auto', 'bar', 'log', 'none'),
             f"log.progress must be auto, bar, log or none, got '{self.log.progress}'"),
            (self.log.interval >= 1, 'log.interval must be >= 1'),
            (self.checkpoint.keep_last >= 1, 'checkpoint.keep_last must be >= 1'),
            (self.checkpoint.save_interval >= 1, 'checkpoint.save_interval must be >= 1'),
            (self.checkpoint.recovery_interval >= 0, 'checkpoint.recovery_interval must be >= 0'),
            (0 <= self.sched.warmup_epochs < self.epochs or self.sched.warmup_epochs == 0,
             f'sched.warmup_epochs ({self.sched.warmup_epochs}) must be smaller than epochs ({self.epochs})'),
            (self.data.input_size >= 32, f'data.input_size must be >= 32, got {self.data.input_size}'),
            (0 < self.data.val_fraction < 1, 'data.val_fraction must be between 0 and 1'),
            (len(self.data.mean) == len(self.data.std), 'data.mean and data.std must have the same length'),
            (self.data.num_workers >= 0, 'data.num_workers must be >= 0'),
            (self.threads is None or self.threads >= 1, 'threads must be >= 1'),
            (not (self.aug.mixup > 0 or self.aug.cutmix > 0) or self.batch_size % 2 == 0,
             'batch_size must be even when mixup/cutmix is on (timm Mixup pairs each image with another)'),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        return self


def _type_name(tp: Any) -> str:
    return getattr(tp, '__name__', None) or str(tp).replace('typing.', '')


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert YAML forms (lists for tuples, ints for floats)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f'{key}: expected {" or ".join(_type_name(a) for a in args)}, got {value!r}')
    if tp is Any:
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f'{key}: expected a list, got {value!r}')
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f'{key}: expected {len(args)} values, got {len(value)} ({value!r})')
            return tuple(_coerce(v, a, f'{key}[{i}]') for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        out = [_coerce(v, item, f'{key}[{i}]') for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f'{key}: expected a mapping, got {value!r}')
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f'{key}: expected true or false, got {value!r}')
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f'{key}: expected an integer, got {value!r}')
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f'{key}: expected a number, got {value!r}')
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f'{key}: expected a string, got {value!r}')
        return value
    raise ConfigError(f'{key}: unsupported type {_type_name(tp)}')


def dataclass_from_dict(cls: type, data: dict[str, Any], prefix: str = '') -> Any:
    """Build config dataclass ``cls`` from a nested dict, coercing values to the annotated types.

    Unknown keys and values of the wrong type raise a :class:`ConfigError` naming the dotted key.
    """
    if not isinstance(data, dict):
        raise ConfigError(f'{prefix.rstrip(".") or "config"}: expected a mapping, got {data!r}')
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f'unknown config key(s) {", ".join(prefix + k for k in unknown)}; '
                          f'valid keys{" in " + prefix.rstrip(".") if prefix else ""}: {", ".join(names)}')
    kwargs = {}
    for name in names:
        if name not in data:
            continue
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = dataclass_from_dict(tp, data[name] or {}, f'{prefix}{name}.')
        else:
            kwargs[name] = _coerce(data[name], tp, prefix + name)
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    """Build and validate a :class:`TrainConfig` from a (possibly partial) nested dict."""
    return dataclass_from_dict(TrainConfig, data).validate()


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """The config as a plain dict of str / int / float / bool / None / lists / dicts (tuples become lists)."""
    def plain(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v
    return plain(dataclasses.asdict(cfg))


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != 'kwargs':
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def read_yaml_config(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML config file, merging the file named by its ``base:`` key (recursively) underneath it."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f'config files include each other in a loop: {" -> ".join(map(str, seen + (path,)))}')
    if not path.is_file():
        raise ConfigError(f'config file not found: {path}')
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f'{path} is not valid YAML: {e}') from e
    if not isinstance(data, dict):
        raise ConfigError(f'{path}: expected a mapping of config sections at the top level')
    base = data.pop('base', None)
    if base is not None:
        data = _merge(read_yaml_config(path.parent / base, seen + (path,)), data)
    return data


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``'optim.lr=1e-3'`` into ``('optim.lr', 0.001)``; the value is parsed as YAML."""
    key, sep, raw = text.partition('=')
    if not sep or not key.strip():
        raise ConfigError(f"override must look like section.key=value, got '{text}'")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{text}': value is not valid YAML: {e}") from e
    # YAML reads 1e-3 as a string (it wants 1.0e-3); accept the usual float spellings
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    return key.strip(), value


def collect_overrides(args: Any, flag_keys: dict[str, str], texts: list[str]) -> dict[str, Any]:
    """Dotted-key overrides from a command line: each attribute of ``args`` named in ``flag_keys`` that is not None
    (``{'batch_size': 'batch_size', 'lr': 'optim.lr', ...}``), then every ``KEY=VALUE`` of ``texts`` (``--set``)."""
    out: dict[str, Any] = {}
    for flag, key in flag_keys.items():
        value = getattr(args, flag, None)
        if value is not None:
            out[key] = value
    for text in texts:
        key, value = parse_override(text)
        out[key] = value
    return out


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Set dotted keys (``{'optim.lr': 1e-3}``) in a nested config dict; returns a new dict (``data`` is unchanged)."""
    out = copy.deepcopy(data)
    for dotted, value in overrides.items():
        node = out
        *parents, leaf = dotted.split('.')
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{dotted}': '{p}' is not a config section")
        node[leaf] = value
    return out


def load_config(path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read a YAML recipe (or the defaults when ``path`` is None) and apply dotted-key overrides.

    Raises:
        ConfigError: for a missing or malformed file, an unknown key or a value of the wrong type.
    """
    data = read_yaml_config(Path(path)) if path is not None else {}
    return config_from_dict(apply_overrides(data, overrides or {}))


def config_diff(a: dict[str, Any], b: dict[str, Any], prefix: str = '') -> list[str]:
    """Dotted keys whose values differ between two config dicts (for resume warnings)."""
    keys = sorted(set(a) | set(b))
    out = []
    for k in keys:
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict) and k != 'kwargs':
            out += config_diff(va, vb, f'{prefix}{k}.')
        elif va != vb:
            out.append(f'{prefix}{k}: {va!r} -> {vb!r}')
    return out
