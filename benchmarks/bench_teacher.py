"""Cost per sample of teacher scoring: SGLang (token-only, teacher top-16, student top-16) vs the Megatron teacher.

Why it exists: issue 13's claim is that the paper's student top-K cannot be served by SGLang at scale (one id list
per request: the planner of ``teacher/sglang_scorer.py`` cuts a response into runs, one prefill each) while the
teacher inside the trainer serves it, and the exact full-vocabulary KL, for about the cost of token-only scoring.
One run measures, side by side, for each response length T:

- sglang/token:      ``SGLangScorer.score`` topk=0 (log p of the sampled tokens only; one request per sample);
- sglang/teacher16:  strategy 'teacher', K = 16 (``top_logprobs_num``);
- sglang/student16:  strategy 'student', K = 16: the run planner, ``max_ids_per_request`` 256;
- megatron/teacher:  what the teacher inside the trainer adds to a student-only step, and so the row to hold
  against SGLang's: ``MegatronTeacher.hidden_rows`` (Megatron forward-only schedule) plus the teacher-side tile
  pass, ``two_model.model_scores`` (the function behind ``MegatronTeacher.score``'s ``TeacherScores``): the
  teacher's LM-head GEMM and logsumexp over vocabulary tiles and its log p at the sampled token and at the
  student's given top-16 ids (the same ids sglang/student16 sends). In the step the fused loss does this work
  inside its pass over the tiles, interleaved with the student's own, which a student-only step does anyway;
- megatron/student16: ``hidden_rows`` plus the forward of the fused two-model loss with the student's own top-16
  (``loss/two_model.py``): an upper bound of the teacher's cost, since that forward also does the student's
  LM-head GEMM, softmax and top-K;
- megatron/fullkl:   the same with the exact full-vocabulary reverse KL as well (its backward adds one recompute
  of the teacher's LM-head tiles, not counted here).

Threads: the SGLang server and the Megatron rows run with the same number of torch threads (``--threads``,
default 1): the server gets ``OMP_NUM_THREADS`` in its environment (its CPU engine binds no cores here, so torch
takes its intra-op thread count from it), the Megatron worker ``torch.set_num_threads``.

The teacher has Qwen2-1.5B's width and vocabulary (hidden 1,536, 12 heads / 2 KV heads, FFN 8,960, vocab 151,936)
and 2 layers, made locally with random weights (``rollout/tiny_model.py``), fp32 on CPU. Prompts are 64 tokens;
responses and the student's top-16 ids are Zipf-like streams over the vocabulary (exponent 1.1, as issue 13's
planner measurement), so the planner sees realistic id unions. Seconds per sample are the median of ``--reps``
calls after one warm-up; requests and bytes (JSON request + response bodies) per sample are counted on the
client. The last line compares the Megatron teacher's student top-16 with SGLang token-only at the largest T.

    python benchmarks/bench_teacher.py --out benchmarks/results/<date>-teacher-cpu.md      # T = 256 1024 4096
    python benchmarks/bench_teacher.py --t 256 --reps 1                                  # a smoke run
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from functools import partial

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_opd.rollout.tiny_model import make_tiny_hf_model  # noqa: E402

K = 16
PROMPT = 64
SHAPE = dict(
    vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_layers=2, num_heads=12, num_kv_heads=2
)


def zipf_stream(n: int, k: int, vocab: int, seed: int) -> torch.Tensor:
    """[n, k] distinct ids per row from a Zipf(1.1) law over a fixed random permutation of the vocabulary."""
    g = torch.Generator().manual_seed(seed)
    probs = torch.arange(1, vocab + 1, dtype=torch.float64).pow(-1.1)
    perm = torch.randperm(vocab, generator=g)
    out = torch.empty(n, k, dtype=torch.long)
    for i in range(n):
        row: list[int] = []
        while len(row) < k:  # draw with replacement, keep the first k distinct
            for x in torch.multinomial(probs, 4 * k, replacement=True, generator=g).tolist():
                if x not in row and len(row) < k:
                    row.append(x)
        out[i] = perm[torch.as_tensor(row)]
    return out


def student_topk(t: int) -> torch.Tensor:
    """The student's top-16 ids [T, 16] at each response position (the same stream for SGLang and Megatron)."""
    return zipf_stream(t, K, SHAPE["vocab_size"], seed=t + 2)


class CountingClient:
    """An ``SGLangClient`` whose ``map`` counts requests and JSON bytes each way (the bench's only wrapper).

    Bytes are counted only while ``counting`` is set (the warm-up call): serialising a response again to count
    it costs time that the timed calls must not include."""

    def __init__(self, client) -> None:
        self._c, self.requests, self.bytes, self.counting = client, 0, 0, True

    def __getattr__(self, name):
        return getattr(self._c, name)

    def map(self, path, payloads, parse=None):
        if not self.counting:
            return self._c.map(path, payloads, parse=parse)
        sizes = [0] * len(payloads)

        def counted(i, response):
            sizes[i] = len(json.dumps(response))  # the raw answer, before the scorer parses it into arrays
            return response if parse is None else parse(i, response)

        outs = self._c.map(path, payloads, parse=counted)
        self.requests += len(payloads)
        self.bytes += sum(len(json.dumps(p)) for p in payloads) + sum(sizes)
        return outs


def _timed(fn, reps: int, client: CountingClient | None = None) -> float:
    """Median seconds of ``reps`` calls after one warm-up (radix cache / allocator / first-call costs are not
    counted); a ``client`` counts requests and bytes during the warm-up only."""
    if client is not None:
        client.counting = True
    fn()
    if client is not None:
        client.counting = False
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def sglang_rows(model_dir: str, ts: list[int], reps: int, threads: int) -> dict[tuple[str, int], dict]:
    from megatron_opd.rollout.sglang_client import SGLangClient
    from megatron_opd.rollout.sglang_server import SGLangServer
    from megatron_opd.teacher.sglang_scorer import SGLangScorer

    out = {}
    srv = SGLangServer(
        model_dir,
        dtype="float32",
        max_total_tokens=max(ts) * 2 + 2 * PROMPT + 256,
        env={"OMP_NUM_THREADS": str(threads)},
    )
    srv.start(timeout_s=900)
    try:
        client = CountingClient(SGLangClient([srv.url], max_concurrency=4, timeout_s=3600, max_retries=0))
        scorer = SGLangScorer(client, vocab_size=SHAPE["vocab_size"])
        for t in ts:
            prompt = zipf_stream(1, PROMPT, SHAPE["vocab_size"], seed=t)[0].tolist()
            resp = zipf_stream(t, 1, SHAPE["vocab_size"], seed=t + 1)[:, 0].tolist()
            sid = student_topk(t).tolist()
            cases = {
                "sglang/token": dict(topk=0),
                "sglang/teacher16": dict(topk=K, strategy="teacher"),
                "sglang/student16": dict(topk=K, strategy="student", student_topk_ids=[sid]),
            }
            for name, kw in cases.items():
                client.requests = client.bytes = 0
                secs = _timed(partial(scorer.score, [prompt], [resp], **kw), reps, client)
                out[(name, t)] = dict(s=secs, requests=client.requests, bytes=client.bytes)  # one sample
                print(f"  {name:18s} T={t:5d}  {secs:8.2f} s  {out[(name, t)]['requests']:6.0f} requests")
    finally:
        srv.stop()
    return out


@torch.no_grad()
def _teacher_only(teacher, mb, t_w, y, sid) -> None:
    """Teacher forward (Megatron schedule) + the teacher-side tile pass at the sampled token and the given ids."""
    from megatron_opd.loss import two_model

    rows = teacher.hidden_rows([mb])[0]
    two_model.model_scores(rows, t_w, y, ids=sid, impl="chunked", vocab_size=teacher.vocab_size)


@torch.no_grad()
def _with_teacher(teacher, mb, h_s, s_w, t_w, y, full_kl: bool) -> None:
    """Teacher forward (Megatron schedule) + the two-model loss's forward with the student's own top-16."""
    from megatron_opd.loss import two_model

    rows = teacher.hidden_rows([mb])[0]
    two_model.two_model_terms(h_s, s_w, rows, t_w, y, topk=K, full_kl=full_kl, impl="chunked")


def _megatron_worker(rank, world, model_dir, ts, reps, threads):
    from megatron_opd.config.tree import ParallelConfig, TeacherConfig
    from megatron_opd.model.builders import model_config_from_hf
    from megatron_opd.parallel.state import initialize_parallel
    from megatron_opd.teacher.megatron import MegatronTeacher, _positions

    torch.set_num_threads(threads)
    initialize_parallel(ParallelConfig(), seed=0)
    v = SHAPE["vocab_size"]
    teacher = MegatronTeacher.build(
        TeacherConfig(hf_path=model_dir, backend="megatron"), model_config_from_hf(model_dir), vocab_size=v
    )
    t_w, _ = teacher.lm_head()
    g = torch.Generator().manual_seed(0)
    s_w = torch.randn(v, SHAPE["hidden_size"], generator=g) * 0.02  # the student's LM head
    out = {}
    for t in ts:
        prompt = zipf_stream(1, PROMPT, v, seed=t)[0].tolist()
        resp = zipf_stream(t, 1, v, seed=t + 1)[:, 0].tolist()
        mb = _positions([prompt], [resp], torch.device("cpu"))
        y = torch.as_tensor(resp)
        h_s = torch.randn(t, SHAPE["hidden_size"], generator=g)
        secs = _timed(partial(_teacher_only, teacher, mb, t_w, y, student_topk(t)), reps)
        out[("megatron/teacher", t)] = dict(s=secs, requests=0.0, bytes=0.0)
        print(f"  {'megatron/teacher':18s} T={t:5d}  {secs:8.2f} s")
        for name, full in (("megatron/student16", False), ("megatron/fullkl", True)):
            secs = _timed(partial(_with_teacher, teacher, mb, h_s, s_w, t_w, y, full), reps)
            out[(name, t)] = dict(s=secs, requests=0.0, bytes=0.0)
            print(f"  {name:18s} T={t:5d}  {secs:8.2f} s")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--t", type=int, nargs="*", default=[256, 1024, 4096], help="response lengths")
    p.add_argument("--reps", type=int, default=1, help="timed calls per case (median), after one warm-up")
    p.add_argument(
        "--skip-sglang", action="store_true", help="only the Megatron rows (no SGLang environment)"
    )
    p.add_argument("--skip-megatron", action="store_true", help="only the SGLang rows")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of the SGLang server and of the Megatron rows alike",
    )
    p.add_argument("--out", help="also write the markdown report here")
    a = p.parse_args()
    from megatron_opd.utils.spawn import run_on_ranks

    rows: dict[tuple[str, int], dict] = {}
    with tempfile.TemporaryDirectory() as d:
        model_dir = make_tiny_hf_model(os.path.join(d, "teacher"), init_std=0.02, **SHAPE)
        with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
            hf_cfg = json.load(f)
        hf_cfg["max_position_embeddings"] = max(4096, PROMPT + max(a.t) + 64)  # SGLang needs input < context
        with open(os.path.join(model_dir, "config.json"), "w", encoding="utf-8") as f:
            json.dump(hf_cfg, f)
        if not a.skip_megatron:
            print("Megatron teacher:")
            rows.update(
                run_on_ranks(_megatron_worker, 1, model_dir, a.t, a.reps, a.threads, timeout_s=7200)[0]
            )
        if not a.skip_sglang:
            print("SGLang teacher server:")
            rows.update(sglang_rows(model_dir, a.t, a.reps, a.threads))
    names = [n for n in ("sglang/token", "sglang/teacher16", "sglang/student16") if not a.skip_sglang]
    names += [] if a.skip_megatron else ["megatron/teacher", "megatron/student16", "megatron/fullkl"]
    load = os.getloadavg()[0]
    lines = [
        f"# bench_teacher.py, {datetime.date.today().isoformat()}, CPU ({os.cpu_count()} logical CPUs, load "
        f"{load:.1f} at the end: times are indicative when the load exceeds the CPU count), {a.threads} torch "
        "thread(s) for the SGLang server and the Megatron rows alike\n",
        "Teacher: Qwen2-1.5B width and vocabulary, 2 layers, fp32. Per sample: prompt 64 tokens, one response of "
        "T tokens. megatron/teacher: teacher forward + its tile pass at the sampled token and the student's "
        "top-16 ids (what the teacher adds to the step); megatron/student16 and /fullkl: teacher forward + the "
        "two-model loss forward, an upper bound (module doc).\n",
        "| case | T | s / sample | vs sglang/token | requests / sample | bytes / sample |",
        "|---|---|---|---|---|---|",
    ]
    for t in a.t:
        ref = rows.get(("sglang/token", t))
        for n in names:
            r = rows[(n, t)]
            ratio = f"{r['s'] / ref['s']:.2f}" if ref else "-"
            lines.append(
                f"| {n} | {t:,} | {r['s']:.2f} | {ratio} | {r['requests']:.0f} | {r['bytes']:,.0f} |"
            )
    tmax = max(a.t)
    if not (a.skip_sglang or a.skip_megatron):
        tok = rows[("sglang/token", tmax)]["s"]
        own, upper = (
            rows[("megatron/teacher", tmax)]["s"] / tok,
            rows[("megatron/student16", tmax)]["s"] / tok,
        )
        lines.append(
            f"\nteacher: Megatron teacher with student top-16 / SGLang token-only at T = {tmax:,}: {own:.2f}x seconds "
            f"(the teacher's own cost in the step; upper bound with the student's loss forward: {upper:.2f}x), "
            f"0 HTTP bytes (SGLang student top-16: {rows[('sglang/student16', tmax)]['requests']:.0f} requests "
            "per sample)"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w", encoding="utf-8") as f:
            f.write(text)


if __name__ == "__main__":
    main()
