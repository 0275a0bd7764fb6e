"""Engine/scorer factories, the result type's checks, the SGLang scorer's run planning, and client failures that need
no server (the SGLang paths against a real server are in tests/e2e/test_sglang_engine.py)."""

from __future__ import annotations

import json
import random

import pytest
import torch

from megatron_opd.config.tree import RolloutConfig, TeacherConfig
from megatron_opd.rollout.embedded import EmbeddedEngine
from megatron_opd.rollout.engine import build_rollout_engine
from megatron_opd.rollout.sglang_client import SGLangClient
from megatron_opd.rollout.sglang_engine import parse_generation
from megatron_opd.rollout.sglang_server import free_port
from megatron_opd.rollout.tiny_model import make_tiny_hf_model
from megatron_opd.rollout.types import RolloutError, RolloutResult
from megatron_opd.teacher.embedded import EmbeddedScorer
from megatron_opd.teacher.factory import build_teacher_scorer
from megatron_opd.teacher.sglang_scorer import plan_runs


def test_plan_runs_covers_positions_with_bounded_unions():
    rng = random.Random(0)
    ids = [rng.sample(range(50), 4) for _ in range(37)]
    runs = plan_runs(ids, max_ids=12)
    assert runs[0][0] == 0 and runs[-1][1] == 37
    assert all(a[1] == b[0] for a, b in zip(runs, runs[1:]))  # consecutive, no gap, no overlap
    for s, e, union in runs:
        assert e > s and len(union) <= 12
        assert set().union(*map(set, ids[s:e])) == set(union)
    assert len(runs) > 3  # 37 x 4 random ids of 50 cannot fit in few 12-id runs
    # Repeated ids collapse into one run; the K ids of one position always fit even if max_ids < K.
    assert plan_runs([[1, 2, 3]] * 9, max_ids=3) == [(0, 9, [1, 2, 3])]
    assert [r[:2] for r in plan_runs([[1, 2], [3, 4]], max_ids=1)] == [(0, 1), (1, 2)]
    assert plan_runs([], 8) == []


def test_result_prompts_selects_a_contiguous_run_of_prompts():
    # 3 prompts x 2 samples, as an engine returns them for one rollout phase of several steps
    ids = [torch.tensor([10 * p + s]) for p in range(3) for s in range(2)]
    lps = [torch.tensor([-0.5]) for _ in ids]
    top = [torch.tensor([[1, 2]]) for _ in ids]
    r = RolloutResult([0, 0, 1, 1, 2, 2], [[p] for p in (7, 7, 8, 8, 9, 9)], ids, lps, ["stop"] * 6, top)
    part = r.prompts(1, 3)
    assert part.prompt_index == [0, 0, 1, 1] and part.prompt_ids == [[8], [8], [9], [9]]
    assert [int(t) for t in part.response_ids] == [10, 11, 20, 21]
    assert (
        part.topk_ids is not None and len(part.topk_ids) == 4 and part.response_ids[0] is ids[2]
    )  # no copies
    part.validate()
    assert len(r.prompts(0, 1)) == 2 and len(r.prompts(3, 3)) == 0
    shuffled = RolloutResult([0, 1, 0], [[7], [8], [7]], ids[:3], lps[:3], ["stop"] * 3)
    with pytest.raises(RolloutError, match="not grouped by prompt"):
        shuffled.prompts(0, 1)


def test_result_validate_rejects_corrupted_batches():
    ok = RolloutResult([0], [[1]], [[2, 3]], [[-0.1, -0.2]], ["length"], [[[2], [3]]])
    ok.validate()
    # The engines' types: int64 [T] ids, float32 [T] logprobs, int64 [T, K] top-K; a wrong dtype or shape is refused.
    ids, lps, top = torch.tensor([2, 3]), torch.tensor([-0.1, -0.2]), torch.tensor([[2, 4], [3, 5]])
    RolloutResult([0], [[1]], [ids], [lps], ["stop"], [top]).validate()
    for bad, match in (
        (dict(logprobs=[lps.double()]), "float64"),
        (dict(logprobs=[lps[:1]]), r"logprobs is torch.float32 \(1,\)"),
        (dict(response_ids=[ids.int()]), "response_ids is torch.int32"),
        (dict(topk_ids=[top[:, 0]]), r"top-K ids is torch.int64 \(2,\), expected torch.int64 \(2, K\)"),
    ):
        fields = dict(response_ids=[ids], logprobs=[lps], topk_ids=[top]) | bad
        with pytest.raises(RolloutError, match=match):
            RolloutResult([0], [[1]], finish_reasons=["stop"], **fields).validate()
    with pytest.raises(RolloutError, match="logprobs"):
        RolloutResult([0], [[1]], [[2, 3]], [[-0.1]], ["length"]).validate()
    with pytest.raises(RolloutError, match="finish reason"):
        RolloutResult([0], [[1]], [[2]], [[-0.1]], ["abort"]).validate()
    with pytest.raises(RolloutError, match="numbers of samples"):
        RolloutResult([0, 0], [[1]], [[2]], [[-0.1]], ["stop"]).validate()


def test_parse_generation_refuses_aborted_or_inconsistent_answers():
    good = {
        "output_ids": [4, 0],
        "meta_info": {
            "finish_reason": {"type": "stop"},
            "output_token_logprobs": [[-1.0, 4, None], [-2.0, 0, None]],
        },
    }
    ids, lps, kind, tks = parse_generation(good, 5, 0)
    assert ids.dtype == torch.long and ids.tolist() == [4, 0] and kind == "stop" and tks is None
    assert lps.dtype == torch.float32 and lps.tolist() == [-1.0, -2.0]
    aborted = {"meta_info": {"finish_reason": {"type": "abort", "message": "x"}, "output_token_logprobs": []}}
    with pytest.raises(RolloutError, match="abort"):
        parse_generation(aborted, 5, 0)
    short = {"meta_info": {"finish_reason": {"type": "length"}, "output_token_logprobs": [[-1.0, 4, None]]}}
    with pytest.raises(RolloutError, match="max_new_tokens=5"):
        parse_generation(short, 5, 0)
    with pytest.raises(RolloutError, match="top logprobs"):
        parse_generation(good, 5, 2)


def _old_parse_generation(out: dict, want_topk: int) -> tuple[list, list, list]:
    """The per-token parse the engine used before it returned tensors (the specification of its values)."""
    meta = out["meta_info"]
    ids = [int(e[1]) for e in meta["output_token_logprobs"]]
    lps = [float(e[0]) for e in meta["output_token_logprobs"]]
    tks = [[int(e[1]) for e in t[:want_topk]] for t in meta.get("output_top_logprobs") or []]
    return ids, lps, tks


def test_parse_generation_gives_the_values_of_the_per_token_parse():
    """The vectorised parse equals the old per-token one (logprobs as float32: what the hand-over made of the
    Python floats), on a JSON round-tripped answer with top logprobs wider than asked."""
    rng = random.Random(1)
    T, K = 37, 4
    entries = [[-rng.random() * 9, rng.randrange(150_000), None] for _ in range(T)]
    tops = [[[-rng.random() * 9, rng.randrange(150_000), None] for _ in range(K + 2)] for _ in range(T)]
    out = json.loads(
        json.dumps(
            {
                "output_ids": [e[1] for e in entries],
                "meta_info": {
                    "finish_reason": {"type": "length"},
                    "output_token_logprobs": entries,
                    "output_top_logprobs": tops,
                },
            }
        )
    )
    ids, lps, kind, tks = parse_generation(out, T, K)
    old_ids, old_lps, old_tks = _old_parse_generation(out, K)
    assert kind == "length"
    assert ids.dtype == torch.long and ids.shape == (T,) and ids.tolist() == old_ids
    assert lps.dtype == torch.float32 and torch.equal(lps, torch.tensor(old_lps, dtype=torch.float32))
    assert tks.dtype == torch.long and tks.shape == (T, K) and tks.tolist() == old_tks
    assert not torch.equal(
        lps.double(), torch.tensor(old_lps, dtype=torch.float64)
    )  # float32, not the JSON's float64
    with pytest.raises(RolloutError, match="null or NaN logprob at position 3"):
        out["meta_info"]["output_token_logprobs"][3][0] = None
        parse_generation(out, T, 0)
    with pytest.raises(RolloutError, match="malformed logprob entry"):
        out["meta_info"]["output_token_logprobs"][3] = [-1.0]
        parse_generation(out, T, 0)


def test_map_parses_each_answer_in_the_worker_thread_that_received_it():
    """``SGLangClient.map(parse=...)`` converts each answer where it arrives (overlapped with the other requests),
    not on the caller's thread after the whole batch."""
    import threading

    from tests.unit.test_reliability_servers import _ok, _Server

    with _Server(lambda i, p: _ok(p)) as srv:
        client = SGLangClient([srv.url], max_concurrency=3)
        payloads = [{"input_ids": [i], "sampling_params": {"max_new_tokens": 2}} for i in range(6)]
        got = client.map("/generate", payloads, parse=lambda i, out: (i, threading.current_thread().name))
    assert [i for i, _ in got] == list(range(6))
    assert all(name.startswith("sglang") for _, name in got)
    assert threading.current_thread().name not in {name for _, name in got}


def test_sglang_engine_returns_per_sequence_tensors():
    """``RolloutResult``'s documented types from the SGLang engine (a stand-in server answering in SGLang's
    format): int64 [T] ids, float32 [T] logprobs, int64 [T, K] top-K, prompts as lists."""
    from megatron_opd.rollout.sglang_engine import SGLangEngine
    from tests.unit.test_reliability_servers import _generate_answer, _Server

    def answer(i, payload):
        out = _generate_answer(payload)
        K = payload["top_logprobs_num"]
        meta = out["meta_info"]
        meta["output_top_logprobs"] = [[[-0.5 - k, t + k, None] for k in range(K)] for t in out["output_ids"]]
        return 200, "application/json", json.dumps(out)

    with _Server(answer) as srv:
        res = SGLangEngine(SGLangClient([srv.url])).generate(
            [[1, 2], [3]], n=2, max_new_tokens=3, temperature=1.0, top_p=1.0, seed=0, topk=2
        )
    assert res.prompt_ids == [[1, 2], [1, 2], [3], [3]]
    for r, lp, tk in zip(res.response_ids, res.logprobs, res.topk_ids):
        assert r.dtype == torch.long and r.tolist() == [7, 8, 9]
        assert lp.dtype == torch.float32 and lp.tolist() == [-1.0] * 3
        assert tk.dtype == torch.long and tk.tolist() == [[7, 8], [8, 9], [9, 10]]


def test_client_names_the_unreachable_url_after_retries():
    url = f"http://127.0.0.1:{free_port()}"
    client = SGLangClient([url], max_retries=2, backoff_s=0.01, timeout_s=2)
    with pytest.raises(RolloutError, match=r"3 attempts.*" + url.replace(".", r"\.")):
        client.map("/generate", [{"input_ids": [1]}] * 3)
    assert not client.health()
    with pytest.raises(ValueError):
        SGLangClient([])


def test_factories(tmp_path):
    path = make_tiny_hf_model(str(tmp_path / "m"), seed=0)
    assert isinstance(build_rollout_engine(RolloutConfig(), hf_path=path), EmbeddedEngine)
    assert isinstance(build_teacher_scorer(TeacherConfig(hf_path=path)), EmbeddedScorer)
    with pytest.raises(ValueError, match="hf_path"):
        build_teacher_scorer(TeacherConfig())
    dead = f"http://127.0.0.1:{free_port()}"
    # Refused at start-up, before any network call: a sync that could never run.
    with pytest.raises(ValueError, match="weight_sync_dir"):
        build_rollout_engine(
            RolloutConfig(backend="sglang", sglang_urls=[dead], weight_sync="disk"), hf_path=path
        )
    with pytest.raises(RolloutError, match="rollout servers not healthy"):
        build_rollout_engine(RolloutConfig(backend="sglang", sglang_urls=[dead]), hf_path=path)
    # The teacher probe runs at start-up; an unreachable teacher fails there, naming it.
    with pytest.raises(RolloutError, match=dead.replace(".", r"\.")):
        build_teacher_scorer(TeacherConfig(backend="sglang", sglang_urls=[dead]), max_retries=0)


def test_score_request_checks(tmp_path):
    sc = EmbeddedScorer.from_hf_dir(make_tiny_hf_model(str(tmp_path / "m"), seed=0))
    with pytest.raises(ValueError, match="student_topk_ids"):
        sc.score([[1, 2]], [[3, 4]], topk=2, strategy="student")
    with pytest.raises(ValueError, match=r"\[len\(response\)\]\[2\]"):
        sc.score([[1, 2]], [[3, 4]], topk=2, strategy="student", student_topk_ids=[[[5, 6]]])
    with pytest.raises(ValueError, match="empty prompt"):
        sc.score([[]], [[3]])
    empty = sc.score([[1, 2]], [[]])
    assert len(empty.logprobs) == 1 and empty.logprobs[0].shape == (0,)


def test_embedded_engine_placement(tmp_path):
    """In-process engines: the trainer's CUDA device in the student's dtype on a GPU machine, CPU fp32 otherwise;
    the factories build them where they are told."""
    import torch

    from megatron_opd.rollout.engine import embedded_engine_placement

    assert embedded_engine_placement("bfloat16", cuda=True, cuda_index=3) == (
        torch.device("cuda", 3),
        torch.bfloat16,
    )
    assert embedded_engine_placement("float16", cuda=True) == (torch.device("cuda", 0), torch.float16)
    assert embedded_engine_placement("float32", cuda=True) == (torch.device("cuda", 0), torch.float32)
    assert embedded_engine_placement("bfloat16", cuda=False) == (torch.device("cpu"), torch.float32)
    path = make_tiny_hf_model(str(tmp_path / "m"), seed=0)
    dev, dtype = embedded_engine_placement("bfloat16", torch.cuda.is_available())
    engine = build_rollout_engine(RolloutConfig(), hf_path=path, dtype=dtype, device=dev)
    scorer = build_teacher_scorer(TeacherConfig(hf_path=path), dtype=dtype, device=dev)
    for decoder in (engine.decoder, scorer.decoder):
        assert torch.device(decoder.device).type == dev.type and decoder.dtype == dtype


def test_rollout_package_does_not_import_the_teacher_package():
    """The layering of issue 13: teacher/ builds on rollout/ (decoder, SGLang client, errors), never the reverse."""
    import subprocess
    import sys

    code = (
        "import importlib, pkgutil, sys, megatron_opd.rollout as pkg\n"
        "for m in pkgutil.iter_modules(pkg.__path__):\n"
        "    importlib.import_module(f'megatron_opd.rollout.{m.name}')\n"
        "print(sorted(n for n in sys.modules if n.startswith('megatron_opd.teacher')))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_the_megatron_teacher_is_not_a_scorer_factory_product():
    with pytest.raises(ValueError, match="inside the trainer"):
        build_teacher_scorer(TeacherConfig(hf_path="t", backend="megatron"))
