"""The one config tree of megatron-opd: a dataclass per subsystem, gathered in ``OPDConfig``.

Why it exists: every knob of a run lives here once, with its docstring and its validation. YAML files and the
command line are generated from these classes (``config/loader.py``), and functions receive the section they
need, never the whole tree. Field names follow Megatron-LM where it has one (``tensor_model_parallel_size``,
``micro_batch_size``, ``global_batch_size``, ``lr``, ``clip_grad`` ...), so Megatron users find what they know.
Validation that needs two sections at once (for instance the batch sizes against the world size) lives in
``OPDConfig.__post_init__`` and ``OPDConfig.check_world_size``.

The sections are written in one module per part of a run, and gathered here (import them from here):
``model.py`` (ModelConfig), ``parallel.py`` (ParallelConfig), ``serving.py`` (RolloutConfig, TeacherConfig),
``objective.py`` (HorizonConfig, LossConfig, OptimizerConfig), ``run.py`` (TrainConfig, EvalConfig,
LoggingConfig, CheckpointConfig and OPDConfig).
"""

from megatron_opd.config.model import ModelConfig, ParamsDtype
from megatron_opd.config.objective import HorizonConfig, LossConfig, OptimizerConfig
from megatron_opd.config.parallel import ParallelConfig
from megatron_opd.config.run import CheckpointConfig, EvalConfig, LoggingConfig, OPDConfig, TrainConfig
from megatron_opd.config.serving import RolloutConfig, TeacherConfig

__all__ = [
    "CheckpointConfig",
    "EvalConfig",
    "HorizonConfig",
    "LoggingConfig",
    "LossConfig",
    "ModelConfig",
    "OPDConfig",
    "OptimizerConfig",
    "ParallelConfig",
    "ParamsDtype",
    "RolloutConfig",
    "TeacherConfig",
    "TrainConfig",
]
