"""Evaluation split over 2 data-parallel gloo ranks equals the single-process evaluation, on every rank."""

from __future__ import annotations

import pytest

from megatron_opd.utils.spawn import run_on_ranks

pytestmark = pytest.mark.distributed


class _Engine:
    """Right on sample s of a problem when s < (first operand mod 3): a pure function of the prompt."""

    def __init__(self, tok):
        self.tok, self.prompts_seen = tok, 0

    def __call__(self, prompts, *, n, max_new_tokens, temperature, top_p, seed):
        from megatron_opd.toy.addition import AdditionProblem

        self.prompts_seen += len(prompts)
        out = []
        for ids in prompts:
            text = self.tok.decode(ids)
            a, b = (int("".join(part[1::2])) for part in text.rstrip(":").split("+"))
            p = AdditionProblem(a, b, 2)
            for s in range(n):
                good = s < a % 3
                out.append(
                    self.tok(p.teacher_response() if good else "=000")["input_ids"] + [self.tok.eos_token_id]
                )
        return out


def _worker(rank: int, world: int) -> dict:
    import torch.distributed as dist

    from megatron_opd.eval.benchmarks import EvalSet
    from megatron_opd.eval.checkers import get_checker
    from megatron_opd.eval.evaluator import evaluate
    from megatron_opd.toy.addition import alphabet, make_problems
    from megatron_opd.toy.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer(alphabet(2))
    probs = make_problems(7, 2, seed=3)  # 7 problems: ranks get 4 and 3
    es = EvalSet("toy", [p.prompt for p in probs], [p.answer for p in probs], get_checker("toy_addition"))
    engine = _Engine(tok)
    split = evaluate(
        es,
        engine,
        tok,
        n_samples=3,
        max_new_tokens=40,
        dp_rank=rank,
        dp_size=world,
        dp_group=dist.group.WORLD,
    )
    whole = evaluate(es, _Engine(tok), tok, n_samples=3, max_new_tokens=40)
    return {
        "split": (split.correct, split.avg, split.pass_at, split.mean_response_length),
        "whole": (whole.correct, whole.avg, whole.pass_at, whole.mean_response_length),
        "seen": engine.prompts_seen,
    }


def test_dp_split_matches_single_process():
    r0, r1 = run_on_ranks(_worker, 2, timeout_s=300)
    assert r0["split"] == r1["split"] == r0["whole"]
    assert (r0["seen"], r1["seen"]) == (4, 3)
    assert sum(r0["whole"][0]) > 0
