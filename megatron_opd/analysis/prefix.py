"""Prefix continuation: the student finishes teacher-written prefixes of ratio rho (the paper's Fig. 9/10).

Why it exists: TOPD might work only because teacher-like prefixes steer the student onto good paths. This
separates that effect from learning: the teacher writes the first ceil(rho * T) tokens, the (untrained or
distilled) student continues to at most T tokens in total, and the completed responses are scored. A
teacher prefix that already ended (EOS) is kept as the whole response.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from megatron_opd.rollout.engine import RolloutEngine
from megatron_opd.rollout.types import token_list


@dataclass
class Continuations:
    """Completed responses for one ratio; sample i answers prompt ``prompt_index[i]``."""

    ratio: float
    prefix_tokens: int
    prompt_index: list[int]
    prefix_ids: list[list[int]]
    response_ids: list[list[int]]
    """Teacher prefix followed by the student's continuation."""


def continue_teacher_prefixes(
    teacher_engine: RolloutEngine,
    student_engine: RolloutEngine,
    prompts: list[list[int]],
    *,
    ratio: float,
    max_new_tokens: int,
    n: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
) -> Continuations:
    """``n`` teacher prefixes of ceil(ratio * max_new_tokens) tokens per prompt, each finished by the student."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    H = math.ceil(ratio * max_new_tokens - 1e-9)
    index = [i for i in range(len(prompts)) for _ in range(n)]
    if H == 0:
        prefixes: list[list[int]] = [[] for _ in index]
        stopped = [False] * len(index)
    else:
        ro = teacher_engine.generate(
            prompts, n=n, max_new_tokens=H, temperature=temperature, top_p=top_p, seed=seed
        )
        prefixes = [token_list(r) for r in ro.response_ids]
        stopped = [f == "stop" for f in ro.finish_reasons]
    todo = [k for k in range(len(index)) if not stopped[k] and len(prefixes[k]) < max_new_tokens]
    responses = [list(p) for p in prefixes]
    if todo and H < max_new_tokens:
        cont = student_engine.generate(
            [list(prompts[index[k]]) + prefixes[k] for k in todo],
            n=1,
            max_new_tokens=max_new_tokens - H,
            temperature=temperature,
            top_p=top_p,
            seed=seed + 1,
        )
        for k, r in zip(todo, cont.response_ids):
            responses[k] += token_list(r)
    return Continuations(ratio, H, index, prefixes, responses)


def continuation_accuracy(
    teacher_engine: RolloutEngine,
    student_engine: RolloutEngine,
    prompts: list[list[int]],
    is_correct: Callable[[int, list[int]], bool],
    *,
    ratios: Sequence[float],
    max_new_tokens: int,
    n: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
) -> dict[float, float]:
    """Mean of ``is_correct(prompt_index, response_ids)`` over all continuations, for each ratio."""
    out = {}
    for r in ratios:
        c = continue_teacher_prefixes(
            teacher_engine,
            student_engine,
            prompts,
            ratio=r,
            max_new_tokens=max_new_tokens,
            n=n,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
        )
        out[r] = sum(is_correct(i, resp) for i, resp in zip(c.prompt_index, c.response_ids)) / len(
            c.response_ids
        )
    return out
