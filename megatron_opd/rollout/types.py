"""What a rollout engine returns: the one result type every backend (embedded, SGLang) fills the same way.

Why it exists: the trainer, the teacher scorer and the loss read rollouts without knowing which engine made them, so
the layout, the types and the meaning of each field (especially which distribution ``logprobs`` come from) are
fixed here. Per-token fields are per-sequence CPU tensors, made once per response as it arrives (in the rollout
phase), so the hand-over to the training ranks copies tensors and never walks per-token Python objects.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from megatron_opd.utils.errors import OPDError

__all__ = ["RolloutResult", "RolloutError", "token_list"]


def check_generate_args(n: int, max_new_tokens: int) -> None:
    """The argument checks every ``RolloutEngine.generate`` shares."""
    if n < 1 or max_new_tokens < 1:
        raise ValueError(f"need n >= 1 and max_new_tokens >= 1, got n={n}, max_new_tokens={max_new_tokens}")


def token_list(ids: Sequence[int] | torch.Tensor | np.ndarray) -> list[int]:
    """Token ids as a list of Python ints, from a list or a 1-D tensor/array (for JSON payloads, tokenizers,
    set lookups: a 0-d tensor hashes by identity, so ``list(tensor)`` must never reach those)."""
    return ids.tolist() if isinstance(ids, torch.Tensor | np.ndarray) else list(ids)


class RolloutError(OPDError, RuntimeError):
    """A rollout or scoring batch could not be completed; no partial batch is ever returned."""


def check_per_token(name: str, i: int, x: Any, n: int, dtype: torch.dtype, width: int | None = None) -> None:
    """Raise RolloutError unless sample ``i``'s ``name`` covers its ``n`` tokens: a tensor of ``dtype`` shaped
    [n] (``width`` None) or [n, width], or (hand-built results in tests and tools) a list of ``n`` entries."""
    if isinstance(x, torch.Tensor):
        if width is not None and x.dim() != 2:
            raise RolloutError(f"sample {i}: {name} is {x.dtype} {tuple(x.shape)}, expected {dtype} ({n}, K)")
        want = (n,) if width is None else (n, width)
        if x.dtype != dtype or tuple(x.shape) != want:
            raise RolloutError(f"sample {i}: {name} is {x.dtype} {tuple(x.shape)}, expected {dtype} {want}")
    elif len(x) != n:
        raise RolloutError(f"sample {i}: {len(x)} {name} for {n} response tokens")


@dataclass
class RolloutResult:
    """One entry per sample. Prompts are repeated ``n`` times, grouped by prompt: sample ``i`` belongs to prompt
    ``i // n`` of the call (``prompt_index[i]``), so a group's samples are contiguous.

    Types (what every engine returns; ``validate`` also accepts lists for the per-token fields):
    ``prompt_ids[i]``: list[int] (prompts are small and reused). ``response_ids[i]``: int64 CPU tensor [T_i].
    ``logprobs[i]``: float32 CPU tensor [T_i]. ``topk_ids[i]``: int64 CPU tensor [T_i, K], or ``topk_ids`` None.
    ``finish_reasons[i]``: str.

    ``logprobs[i][t]`` is the engine's log p(response_ids[i][t] | prefix) under the model's own temperature-1
    distribution (log-softmax of the raw logits over the tokenizer's vocabulary), whatever temperature/top-p the
    token was sampled with: it is the quantity the trainer's logprobs must match (Eq. 1's student term).
    ``finish_reasons[i]`` is "stop" (an EOS/stop token was sampled; it is the last response token) or "length"
    (cut at ``max_new_tokens``, the horizon). ``topk_ids[i][t]`` are the student's K most likely token ids at that
    position (temperature-1), when asked (``topk > 0``), else None.
    """

    prompt_index: list[int]
    prompt_ids: list[list[int]]
    response_ids: list[torch.Tensor]
    logprobs: list[torch.Tensor]
    finish_reasons: list[str]
    topk_ids: list[torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.response_ids)

    def prompts(self, start: int, stop: int) -> RolloutResult:
        """The samples of the call's prompts [start, stop), their ``prompt_index`` counted from ``start``.

        Samples are grouped by prompt in call order, so they are one contiguous run (the lists share the
        per-sample tensors, nothing is copied)."""
        rows = [i for i, p in enumerate(self.prompt_index) if start <= p < stop]
        if rows and rows != list(range(rows[0], rows[-1] + 1)):
            raise RolloutError("rollout samples are not grouped by prompt in call order")
        sl = slice(rows[0], rows[-1] + 1) if rows else slice(0, 0)
        return RolloutResult(
            prompt_index=[p - start for p in self.prompt_index[sl]],
            prompt_ids=self.prompt_ids[sl],
            response_ids=self.response_ids[sl],
            logprobs=self.logprobs[sl],
            finish_reasons=self.finish_reasons[sl],
            topk_ids=None if self.topk_ids is None else self.topk_ids[sl],
        )

    def validate(self) -> None:
        """Raise RolloutError if the per-sample fields disagree in length, shape or dtype (a corrupted batch)."""
        n = len(self.response_ids)
        lists = [self.prompt_index, self.prompt_ids, self.logprobs, self.finish_reasons]
        if self.topk_ids is not None:
            lists.append(self.topk_ids)
        if any(len(x) != n for x in lists):
            raise RolloutError("rollout result lists have different numbers of samples")
        K = next(
            (x.shape[-1] for x in self.topk_ids or [] if isinstance(x, torch.Tensor) and x.dim() == 2), 0
        )
        for i in range(n):
            T = len(self.response_ids[i])
            check_per_token("response_ids", i, self.response_ids[i], T, torch.long)
            check_per_token("logprobs", i, self.logprobs[i], T, torch.float32)
            if self.topk_ids is not None:
                check_per_token("top-K ids", i, self.topk_ids[i], T, torch.long, K)
            if self.finish_reasons[i] not in ("stop", "length"):
                raise RolloutError(f"sample {i}: unknown finish reason {self.finish_reasons[i]!r}")
