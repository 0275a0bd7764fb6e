"""The ``parallel`` section of the config tree: how the student is split over ranks.

Why it exists: Megatron's model-parallel sizes and the data-parallel size they leave, with the checks that need
only this section (``config/tree.py`` gathers every section; the checks against batch sizes are in
``OPDConfig``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from megatron_opd.config.base import ConfigError, check_range, fail


@dataclass(kw_only=True)
class ParallelConfig:
    """How the student is split over ranks (Megatron's model-parallel groups)."""

    tensor_model_parallel_size: int = 1
    """Tensor-parallel size (splits heads, MLP and vocabulary)."""
    pipeline_model_parallel_size: int = 1
    """Pipeline-parallel size (splits layers into stages)."""
    virtual_pipeline_model_parallel_size: int | None = None
    """Model chunks per pipeline stage for the interleaved schedule; None disables interleaving."""
    context_parallel_size: int = 1
    """Context-parallel size (splits the sequence across ranks in attention)."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism for norms and dropout; needs tensor_model_parallel_size > 1."""
    data_parallel_size: int | None = None
    """Data-parallel size; None derives it as world_size / (TP * PP * CP). Checked against the world size."""
    distributed_backend: Literal["auto", "nccl", "gloo"] = "auto"
    """torch.distributed backend: 'auto' is NCCL with CUDA and gloo without."""
    distributed_timeout_minutes: int = 30
    """Timeout of collective operations."""

    def __post_init__(self) -> None:
        for key in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size"):
            check_range(f"parallel.{key}", getattr(self, key), 1)
        check_range("parallel.data_parallel_size", self.data_parallel_size, 1)
        check_range(
            "parallel.virtual_pipeline_model_parallel_size", self.virtual_pipeline_model_parallel_size, 1
        )
        if self.virtual_pipeline_model_parallel_size is not None and self.pipeline_model_parallel_size < 2:
            fail(
                "parallel.virtual_pipeline_model_parallel_size",
                self.virtual_pipeline_model_parallel_size,
                "None unless pipeline_model_parallel_size > 1",
            )
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            fail("parallel.sequence_parallel", True, "false when tensor_model_parallel_size is 1")
        check_range("parallel.distributed_timeout_minutes", self.distributed_timeout_minutes, 1)

    @property
    def model_parallel_size(self) -> int:
        return (
            self.tensor_model_parallel_size * self.pipeline_model_parallel_size * self.context_parallel_size
        )

    def resolve_data_parallel_size(self, world_size: int) -> int:
        """DP size for ``world_size`` ranks; fails with the arithmetic spelled out if the layout does not fit."""
        mp = self.model_parallel_size
        if world_size % mp:
            raise ConfigError(
                f"world size {world_size} is not divisible by tensor_model_parallel_size "
                f"({self.tensor_model_parallel_size}) x pipeline_model_parallel_size "
                f"({self.pipeline_model_parallel_size}) x context_parallel_size ({self.context_parallel_size}) = {mp}; "
                "launch a multiple of that many processes or change the parallel sizes"
            )
        dp = world_size // mp
        if self.data_parallel_size is not None and self.data_parallel_size != dp:
            raise ConfigError(
                f"config key 'parallel.data_parallel_size': got {self.data_parallel_size}, but world size "
                f"{world_size} / (TP*PP*CP = {mp}) gives {dp}; set it to {dp} or leave it unset"
            )
        return dp
