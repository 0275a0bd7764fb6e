"""Run an eval set through any generation engine and score it: avg@k, pass@k, lengths, truncation.

Why it exists: evaluation has to work the same for the embedded engine, SGLang servers and a plain HF model,
during training and from the ``eval`` tool. So it takes a generation callable of the rollout engine's shape,
``generate(prompts: list[list[int]], *, n, max_new_tokens, temperature, top_p, seed)``, returning either the
engine's ``RolloutResult`` (``response_ids`` and ``finish_reasons``, prompt-major: the n samples of prompt 0,
then of prompt 1 ...) or that list of response id lists. As in the paper, evaluation generates full rollouts:
the caller passes the run's full response budget, never the training horizon. Problems may be split over
data-parallel ranks (round-robin); the counts are gathered so every rank returns the same result.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch.distributed as dist

from megatron_opd.config.tree import EvalConfig
from megatron_opd.data.prompts import encode_prompts
from megatron_opd.eval.benchmarks import EvalSet, load_eval_set
from megatron_opd.eval.metrics import avg_at_k, default_ks, mean_pass_at_k
from megatron_opd.rollout.types import token_list

GenerateFn = Callable[..., Any]


@dataclass
class EvalResult:
    """Scores of one eval set; ``correct[i]`` counts problem i's correct samples out of ``n_samples``."""

    name: str
    n_samples: int
    correct: list[int]
    avg: float
    pass_at: dict[int, float]
    mean_response_length: float
    truncation_rate: float
    seconds: float
    examples: list[dict[str, Any]] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.avg

    def metrics(self, prefix: str = "eval") -> dict[str, float]:
        """Flat scalars for logging, e.g. ``eval/aime24/avg@16``, ``eval/aime24/pass@16``."""
        base = f"{prefix}/{self.name}"
        out = {f"{base}/avg@{self.n_samples}": self.avg}
        out.update({f"{base}/pass@{k}": v for k, v in self.pass_at.items()})
        out[f"{base}/response_length"] = self.mean_response_length
        out[f"{base}/truncation_rate"] = self.truncation_rate
        return out


def normalize_generation(out: Any, num_prompts: int, n: int) -> tuple[list[list[int]], list[str] | None]:
    """(response id lists prompt-major, finish reasons or None) from a ``RolloutResult`` or a list output."""
    if hasattr(out, "response_ids"):
        ids, reasons = list(out.response_ids), getattr(out, "finish_reasons", None)
    else:
        ids, reasons = list(out), None
        first = ids[0] if ids else None
        if isinstance(first, (list, tuple)) and first and isinstance(first[0], (list, tuple)):
            ids = [list(s) for per_prompt in ids for s in per_prompt]  # nested: [prompt][sample] -> flat
    if len(ids) != num_prompts * n:
        raise ValueError(
            f"the generate callable returned {len(ids)} responses for {num_prompts} prompts x n={n}"
        )
    return [token_list(r) for r in ids], (list(reasons) if reasons is not None else None)


def _cut_at_eos(ids: Sequence[int], eos_ids: set[int]) -> tuple[list[int], bool]:
    for i, t in enumerate(ids):
        if t in eos_ids:
            return list(ids[: i + 1]), True
    return list(ids), False


def _eos_ids(tokenizer: Any) -> set[int]:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        return set()
    return set(eos) if isinstance(eos, (list, tuple)) else {int(eos)}


def evaluate(
    eval_set: EvalSet,
    generate: GenerateFn,
    tokenizer: Any,
    *,
    n_samples: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    apply_chat_template: bool = True,
    prompts_per_call: int | None = None,
    pass_ks: Sequence[int] | None = None,
    num_examples: int = 2,
    dp_rank: int = 0,
    dp_size: int = 1,
    dp_group: dist.ProcessGroup | None = None,
) -> EvalResult:
    """Sample ``n_samples`` full responses per problem and score them with the set's checker.

    ``prompts_per_call`` bounds how many problems go to one ``generate`` call (None: all of this rank's).
    With ``dp_size > 1`` rank r takes problems r, r + dp_size, ...; ``dp_group`` gathers the counts.
    """
    t0 = time.perf_counter()
    mine = list(range(dp_rank, len(eval_set), dp_size))
    prompts = eval_set.prompts()
    _, prompt_ids = encode_prompts(
        [prompts[i] for i in mine], tokenizer, apply_chat_template=apply_chat_template
    )
    eos_ids = _eos_ids(tokenizer)
    chunk = prompts_per_call or max(1, len(mine))
    local: list[tuple[int, int, int, int]] = []  # (problem, correct, total length, truncated count)
    examples: list[dict[str, Any]] = []
    for c, start in enumerate(range(0, len(mine), chunk)):
        batch = prompt_ids[start : start + chunk]
        out = generate(
            batch,
            n=n_samples,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed + 7919 * c + 104729 * dp_rank,
        )
        responses, reasons = normalize_generation(out, len(batch), n_samples)
        for j, problem in enumerate(mine[start : start + chunk]):
            n_ok = length = truncated = 0
            for s in range(n_samples):
                idx = j * n_samples + s
                ids, stopped = _cut_at_eos(responses[idx], eos_ids)
                if reasons is not None:
                    stopped = reasons[idx] != "length"
                text = tokenizer.decode(ids, skip_special_tokens=True)
                ok = bool(eval_set.checker(text, eval_set.answers[problem]))
                n_ok += ok
                length += len(ids)
                truncated += not stopped
                if len(examples) < num_examples:
                    examples.append(
                        {
                            "problem": problem,
                            "response": text,
                            "answer": eval_set.answers[problem],
                            "correct": ok,
                        }
                    )
            local.append((problem, n_ok, length, truncated))
    if dp_size > 1:
        gathered: list[Any] = [None] * dp_size
        dist.all_gather_object(gathered, local, group=dp_group)
        local = [x for part in gathered for x in part]
    local.sort()
    if [p for p, *_ in local] != list(range(len(eval_set))):
        raise RuntimeError(f"eval set {eval_set.name}: gathered results do not cover every problem once")
    correct = [c for _, c, _, _ in local]
    total = n_samples * len(eval_set)
    ks = [k for k in (pass_ks or default_ks(n_samples)) if 1 <= k <= n_samples]
    return EvalResult(
        name=eval_set.name,
        n_samples=n_samples,
        correct=correct,
        avg=avg_at_k(correct, n_samples),
        pass_at={k: mean_pass_at_k(correct, n_samples, k) for k in ks},
        mean_response_length=sum(x[2] for x in local) / total,
        truncation_rate=sum(x[3] for x in local) / total,
        seconds=time.perf_counter() - t0,
        examples=examples,
    )


def evaluate_sets(
    cfg: EvalConfig,
    generate: GenerateFn,
    tokenizer: Any,
    *,
    max_response_length: int,
    seed: int = 0,
    apply_chat_template: bool = True,
    prompts_per_call: int | None = None,
    dp_rank: int = 0,
    dp_size: int = 1,
    dp_group: dist.ProcessGroup | None = None,
    progress: Callable[[str, float], None] | None = None,
) -> dict[str, EvalResult]:
    """Every set of ``cfg.datasets`` with the run's eval settings; full rollouts of ``max_response_length``
    tokens unless ``cfg.max_new_tokens`` says otherwise. ``progress(set name, seconds)`` runs after each set."""
    results = {}
    for spec in cfg.datasets:
        eval_set = load_eval_set(spec, max_problems=cfg.max_problems)
        results[eval_set.name] = evaluate(
            eval_set,
            generate,
            tokenizer,
            n_samples=cfg.n_samples,
            max_new_tokens=cfg.max_new_tokens or max_response_length,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            seed=seed,
            apply_chat_template=apply_chat_template,
            prompts_per_call=prompts_per_call,
            dp_rank=dp_rank,
            dp_size=dp_size,
            dp_group=dp_group,
        )
        if progress is not None:
            progress(eval_set.name, results[eval_set.name].seconds)
    return results
