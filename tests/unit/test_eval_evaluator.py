"""The evaluator on a scripted engine: counts, avg@k / pass@k, lengths, truncation, output shapes, chunking."""

from dataclasses import dataclass

import pytest

from megatron_opd.config import EvalConfig
from megatron_opd.eval.benchmarks import EvalSet
from megatron_opd.eval.checkers import get_checker
from megatron_opd.eval.evaluator import evaluate, evaluate_sets, normalize_generation
from megatron_opd.eval.metrics import pass_at_k
from megatron_opd.toy.addition import AdditionProblem, alphabet, make_problems
from megatron_opd.toy.tokenizer import build_char_tokenizer

N = 4
MAX_NEW = 40


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer(alphabet(2))


@pytest.fixture(scope="module")
def problems():
    return make_problems(10, 2, seed=0)


def parse(prompt: str) -> AdditionProblem:
    a = int("".join(prompt.split("+")[0][1::2]))
    b = int("".join(prompt.split("+")[1][1::2]))
    return AdditionProblem(a, b, 2)


def n_correct(p: AdditionProblem) -> int:
    return p.a % (N + 1)  # a known, varied number of right samples per problem: 0..N


class ScriptedEngine:
    """Answers from the prompt: sample s is the right trace when s < n_correct, else a wrong answer that is
    cut at MAX_NEW tokens (no EOS) on odd samples. A real function of its inputs, so the counts are known."""

    def __init__(self, tok, shape="flat"):
        self.tok, self.shape, self.calls = tok, shape, []

    def __call__(self, prompts, *, n, max_new_tokens, temperature, top_p, seed):
        self.calls.append((len(prompts), n, max_new_tokens, temperature, top_p, seed))
        eos = self.tok.eos_token_id
        out, reasons = [], []
        for ids in prompts:
            p = parse(self.tok.decode(ids))
            group = []
            for s in range(n):
                if s < n_correct(p):
                    group.append(self.tok(p.teacher_response())["input_ids"] + [eos])
                    reasons.append("stop")
                elif s % 2:
                    group.append((self.tok("=9;")["input_ids"] * max_new_tokens)[:max_new_tokens])
                    reasons.append("length")
                else:
                    group.append(self.tok("=999")["input_ids"] + [eos, 5, 5])  # tokens after EOS are ignored
                    reasons.append("stop")
            out.append(group)
        if self.shape == "nested":
            return out
        flat = [r for g in out for r in g]
        if self.shape == "result":
            return RolloutLike(flat, reasons)
        return flat


@dataclass
class RolloutLike:
    response_ids: list
    finish_reasons: list


def toy_set(problems):
    return EvalSet(
        "toy", [p.prompt for p in problems], [p.answer for p in problems], get_checker("toy_addition")
    )


@pytest.mark.parametrize("shape", ["flat", "nested", "result"])
@pytest.mark.parametrize("per_call", [None, 3])
def test_scores_match_the_script(tok, problems, shape, per_call):
    engine = ScriptedEngine(tok, shape)
    r = evaluate(
        toy_set(problems),
        engine,
        tok,
        n_samples=N,
        max_new_tokens=MAX_NEW,
        temperature=0.7,
        seed=11,
        prompts_per_call=per_call,
    )
    expect = [min(n_correct(p), N) for p in problems]
    assert r.correct == expect
    assert r.avg == pytest.approx(sum(expect) / (N * len(problems)), abs=1e-12)
    assert r.pass_at[N] == pytest.approx(sum(c > 0 for c in expect) / len(problems), abs=1e-12)
    assert r.pass_at[2] == pytest.approx(sum(pass_at_k(N, c, 2) for c in expect) / len(problems), abs=1e-12)
    n_trunc = sum(sum(1 for s in range(c, N) if s % 2) for c in expect)
    assert r.truncation_rate == pytest.approx(n_trunc / (N * len(problems)), abs=1e-12)
    trace_len = len(problems[0].teacher_response()) + 1
    total = sum(c * trace_len + sum(MAX_NEW if s % 2 else 5 for s in range(c, N)) for c in expect)
    assert r.mean_response_length == pytest.approx(total / (N * len(problems)), abs=1e-12)
    # every call got the full budget and the requested sampling settings; chunks got distinct seeds
    assert {c[1:5] for c in engine.calls} == {(N, MAX_NEW, 0.7, 1.0)}
    assert len({c[5] for c in engine.calls}) == len(engine.calls) == (1 if per_call is None else 4)
    m = r.metrics()
    assert m[f"eval/toy/avg@{N}"] == r.avg and "eval/toy/truncation_rate" in m


def test_evaluate_sets_uses_the_config(tok, tmp_path, problems):
    path = tmp_path / "toy_eval.jsonl"
    path.write_text("".join(f'{{"problem": "{p.prompt}", "answer": "{p.answer}"}}\n' for p in problems))
    cfg = EvalConfig(datasets=[f"toy_addition:{path}"], n_samples=2, max_problems=4, temperature=0.0)
    engine = ScriptedEngine(tok)
    res = evaluate_sets(cfg, engine, tok, max_response_length=MAX_NEW)
    r = res["toy_addition_toy_eval"]
    assert len(r.correct) == 4 and r.n_samples == 2 and set(r.pass_at) == {1, 2}
    assert engine.calls[0][2] == MAX_NEW and engine.calls[0][3] == 0.0  # full rollouts: max_response_length


def test_wrong_number_of_responses_is_an_error():
    with pytest.raises(ValueError, match="returned 3 responses for 2 prompts x n=2"):
        normalize_generation([[1], [2], [3]], 2, 2)
    assert normalize_generation([[[1], [2]], [[3], [4]]], 2, 2)[0] == [[1], [2], [3], [4]]
    assert normalize_generation([[1, 2], []], 2, 1)[0] == [[1, 2], []]
