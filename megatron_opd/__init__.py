"""megatron-opd: on-policy distillation of LLMs on Megatron-core, made cheap by controlling the rollout horizon."""

__version__ = "0.1.0"
