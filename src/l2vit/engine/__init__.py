"""Training engine: config, trainer, evaluation, checkpoints, weights loading, distributed helpers."""
from .checkpoint import CheckpointManager, find_resume_checkpoint, read_checkpoint
from .config import ConfigError, TrainConfig, config_from_dict, config_to_dict, load_config
from .evaluate import evaluate
from .optim import build_optimizer, build_scheduler, no_weight_decay_patterns
from .run import RunDirError, StopRequest, prepare_run_dir, run_exit_code
from .train import NonFiniteLossError, Updater
from .trainer import Trainer, TrainResult
from .weights import InferenceModel, build_inference_model, load_finetune_weights

__all__ = [
    'CheckpointManager', 'find_resume_checkpoint', 'read_checkpoint', 'ConfigError', 'TrainConfig',
    'config_from_dict', 'config_to_dict', 'load_config', 'evaluate', 'build_optimizer', 'build_scheduler',
    'no_weight_decay_patterns', 'NonFiniteLossError', 'Updater', 'RunDirError', 'StopRequest', 'prepare_run_dir',
    'run_exit_code', 'Trainer', 'TrainResult',
    'InferenceModel', 'build_inference_model', 'load_finetune_weights',
]
