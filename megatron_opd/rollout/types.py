"""What a rollout engine returns: the one result type every backend (embedded, SGLang) fills the same way.

Why it exists: the trainer, the teacher scorer and the loss read rollouts without knowing which engine made them, so
the layout and the meaning of each field (especially which distribution ``logprobs`` come from) are fixed here.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_opd.utils.errors import OPDError

__all__ = ["RolloutResult", "RolloutError"]


def check_generate_args(n: int, max_new_tokens: int) -> None:
    """The argument checks every ``RolloutEngine.generate`` shares."""
    if n < 1 or max_new_tokens < 1:
        raise ValueError(f"need n >= 1 and max_new_tokens >= 1, got n={n}, max_new_tokens={max_new_tokens}")


class RolloutError(OPDError, RuntimeError):
    """A rollout or scoring batch could not be completed; no partial batch is ever returned."""


@dataclass
class RolloutResult:
    """One entry per sample. Prompts are repeated ``n`` times, grouped by prompt: sample ``i`` belongs to prompt
    ``i // n`` of the call (``prompt_index[i]``), so a group's samples are contiguous.

    ``logprobs[i][t]`` is the engine's log p(response_ids[i][t] | prefix) under the model's own temperature-1
    distribution (log-softmax of the raw logits over the tokenizer's vocabulary), whatever temperature/top-p the
    token was sampled with: it is the quantity the trainer's logprobs must match (Eq. 1's student term).
    ``finish_reasons[i]`` is "stop" (an EOS/stop token was sampled; it is the last response token) or "length"
    (cut at ``max_new_tokens``, the horizon). ``topk_ids[i][t]`` are the student's K most likely token ids at that
    position (temperature-1), when asked (``topk > 0``), else None.
    """

    prompt_index: list[int]
    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    logprobs: list[list[float]]
    finish_reasons: list[str]
    topk_ids: list[list[list[int]]] | None = None

    def __len__(self) -> int:
        return len(self.response_ids)

    def validate(self) -> None:
        """Raise RolloutError if the per-sample lists disagree in length (a corrupted batch)."""
        n = len(self.response_ids)
        lists = [self.prompt_index, self.prompt_ids, self.logprobs, self.finish_reasons]
        if self.topk_ids is not None:
            lists.append(self.topk_ids)
        if any(len(x) != n for x in lists):
            raise RolloutError("rollout result lists have different numbers of samples")
        for i in range(n):
            if len(self.logprobs[i]) != len(self.response_ids[i]):
                raise RolloutError(
                    f"sample {i}: {len(self.logprobs[i])} logprobs for {len(self.response_ids[i])} tokens"
                )
            if self.topk_ids is not None and len(self.topk_ids[i]) != len(self.response_ids[i]):
                raise RolloutError(f"sample {i}: top-K ids do not cover every response token")
            if self.finish_reasons[i] not in ("stop", "length"):
                raise RolloutError(f"sample {i}: unknown finish reason {self.finish_reasons[i]!r}")
