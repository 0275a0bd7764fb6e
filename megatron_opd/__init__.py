"""megatron-opd: on-policy distillation of LLMs on Megatron-core, made cheap by controlling the rollout horizon."""

from megatron_opd._warnings import silence_known_warnings

silence_known_warnings()  # before any submodule imports megatron.core

__version__ = "0.1.0"
