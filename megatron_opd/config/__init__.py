"""The config tree (``tree.py``) and its YAML/command-line loader (``loader.py``)."""

from megatron_opd.config.base import ConfigError
from megatron_opd.config.loader import build_parser, config_from_dict, dump_yaml, load_yaml, parse_config
from megatron_opd.config.tree import (
    CheckpointConfig,
    EvalConfig,
    HorizonConfig,
    LoggingConfig,
    LossConfig,
    ModelConfig,
    OPDConfig,
    OptimizerConfig,
    ParallelConfig,
    RolloutConfig,
    TeacherConfig,
    TrainConfig,
)

__all__ = [
    "CheckpointConfig",
    "ConfigError",
    "EvalConfig",
    "HorizonConfig",
    "LoggingConfig",
    "LossConfig",
    "ModelConfig",
    "OPDConfig",
    "OptimizerConfig",
    "ParallelConfig",
    "RolloutConfig",
    "TeacherConfig",
    "TrainConfig",
    "build_parser",
    "config_from_dict",
    "dump_yaml",
    "load_yaml",
    "parse_config",
]
