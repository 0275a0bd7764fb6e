"""benchmarks/bench_teacher.py's CountingClient: it must pass the scorer's ``parse`` through (the SGLang client
parses each answer in its worker thread) and count requests and raw JSON bytes during the warm-up call only."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_teacher", ROOT / "benchmarks" / "bench_teacher.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class _Client:
    def map(self, path, payloads, parse=None):
        outs = [{"echo": p["n"]} for p in payloads]
        return outs if parse is None else [parse(i, o) for i, o in enumerate(outs)]


def test_counting_client_passes_parse_through_and_counts_the_warm_up_only():
    bench = _bench()
    client = bench.CountingClient(_Client())
    payloads = [{"n": 1}, {"n": 22}]
    calls = []

    def score():
        calls.append(client.map("/generate", payloads, parse=lambda i, o: o["echo"] * 10))

    bench._timed(score, reps=2, client=client)
    assert calls == [[10, 220]] * 3  # the parsed answers, every call
    assert client.requests == 2  # the warm-up's two requests, not the timed calls'
    raw = sum(len(json.dumps(p)) for p in payloads) + sum(len(json.dumps({"echo": p["n"]})) for p in payloads)
    assert client.bytes == raw
