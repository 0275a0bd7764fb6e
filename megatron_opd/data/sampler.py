"""The epoch-wise, resumable prompt sampler: which prompts form global batch k, on every rank alike.

Why it exists: exact resume needs the data order to be a pure function of (seed, epoch, position). Each epoch
is a fresh permutation of the dataset drawn from ``seed`` and the epoch number; global batch j of the epoch is
permutation[j*B : (j+1)*B]. The state is three integers, so a run killed after any step and resumed from its
checkpoint sees exactly the batches an uninterrupted run would: no prompt lost, none seen twice in an epoch.
Every data-parallel rank builds the same sampler and takes its contiguous shard of each batch (``shard``).
When the dataset size is not a multiple of B, the last ``N mod B`` prompts of each epoch's permutation are left
out of that epoch (a different few each epoch), as Megatron's and slime's samplers do; no batch is ragged.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from megatron_opd.utils.seeding import derive_seed

T = TypeVar("T")


def shard(items: Sequence[T], dp_rank: int, dp_size: int) -> list[T]:
    """The contiguous ``dp_rank``-th of ``dp_size`` equal parts of ``items`` (its length must divide evenly)."""
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank {dp_rank} is not in [0, {dp_size})")
    if len(items) % dp_size:
        raise ValueError(
            f"{len(items)} items cannot be split evenly over {dp_size} data-parallel ranks; "
            "make the global batch (prompts x samples per prompt) a multiple of the data-parallel size"
        )
    per = len(items) // dp_size
    return list(items[dp_rank * per : (dp_rank + 1) * per])


@dataclass(frozen=True)
class PromptBatch:
    """Global batch ``step`` (0-based over the run): dataset ``indices`` in order, the same on every rank."""

    step: int
    epoch: int
    batch_in_epoch: int
    indices: list[int]

    def local_indices(self, dp_rank: int, dp_size: int) -> list[int]:
        """This data-parallel rank's prompts when prompts (not rollouts) are split over ranks."""
        return shard(self.indices, dp_rank, dp_size)


class PromptSampler:
    """Deterministic epoch-wise sampling of global batches of ``global_batch_size`` prompt indices.

    ``epochs=None`` samples forever (the loop stops at ``train_steps``). Iterating yields ``PromptBatch``es;
    ``state_dict`` taken after a batch was consumed resumes at the next one.
    """

    def __init__(
        self,
        num_examples: int,
        global_batch_size: int,
        *,
        seed: int,
        epochs: int | None = None,
        shuffle: bool = True,
    ) -> None:
        if global_batch_size < 1:
            raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}")
        if num_examples < global_batch_size:
            raise ValueError(
                f"the dataset has {num_examples} prompts, fewer than one global batch ({global_batch_size}); "
                "lower train.global_batch_size or use a larger dataset"
            )
        if epochs is not None and epochs < 1:
            raise ValueError(f"epochs must be >= 1 or None, got {epochs}")
        self.num_examples = num_examples
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.epochs = epochs
        self.shuffle = shuffle
        self.epoch = 0
        self.batch_in_epoch = 0
        self._perm: list[int] | None = None
        self._perm_epoch = -1

    @property
    def steps_per_epoch(self) -> int:
        return self.num_examples // self.global_batch_size

    @property
    def total_steps(self) -> int | None:
        """Batches in the whole run, or None when sampling forever."""
        return None if self.epochs is None else self.epochs * self.steps_per_epoch

    @property
    def step(self) -> int:
        """How many batches were consumed so far (the index of the next one)."""
        return self.epoch * self.steps_per_epoch + self.batch_in_epoch

    def permutation(self, epoch: int) -> list[int]:
        """The data order of ``epoch``: a pure function of (seed, epoch)."""
        if not self.shuffle:
            return list(range(self.num_examples))
        g = torch.Generator().manual_seed(derive_seed(self.seed, epoch))
        return torch.randperm(self.num_examples, generator=g).tolist()

    def exhausted(self) -> bool:
        return self.epochs is not None and self.epoch >= self.epochs

    def next_batch(self) -> PromptBatch:
        """The next global batch; raises ``StopIteration`` after the last epoch."""
        if self.exhausted():
            raise StopIteration
        if self._perm_epoch != self.epoch:
            self._perm, self._perm_epoch = self.permutation(self.epoch), self.epoch
        assert self._perm is not None
        b = self.global_batch_size
        start = self.batch_in_epoch * b
        batch = PromptBatch(self.step, self.epoch, self.batch_in_epoch, self._perm[start : start + b])
        self.batch_in_epoch += 1
        if self.batch_in_epoch == self.steps_per_epoch:
            self.epoch += 1
            self.batch_in_epoch = 0
        return batch

    def __iter__(self) -> Iterator[PromptBatch]:
        while not self.exhausted():
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "consumed_prompts": self.step * self.global_batch_size,
            "num_examples": self.num_examples,
            "global_batch_size": self.global_batch_size,
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume exactly; refuses a state from a different dataset size or batch size (the order would differ)."""
        for key in ("num_examples", "global_batch_size"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"cannot resume the prompt sampler: the checkpoint has {key}={state[key]}, this run has "
                    f"{getattr(self, key)}; the data order would not match"
                )
        self.seed = int(state["seed"])
        self.shuffle = bool(state.get("shuffle", True))
        self.epoch = int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])
        self._perm, self._perm_epoch = None, -1
