"""Peak memory and time of the OPD loss through the LM head: naive torch vs chunked torch vs Triton (vs FP8).

Why it exists: the issue's claim is that the fused loss costs about what the LM-head GEMMs cost and almost no
memory. One run prints every implementation side by side at the same shape, with ratios to naive. Every case is
the path the train step runs (``adapter.opd_token_terms``, then ``reference.opd_loss`` on its terms, then
backward), with the ``loss.impl`` named in the case.

Cases (all compute the same loss, ``reference.opd_loss`` with the top-K reverse KL on K = 16 teacher ids, and
its gradients on hidden and weight):
- naive:         logits = hidden @ W^T in fp32 (all N x V of them), then ``reference.py`` (impl='reference').
- chunked/terms: ``adapter.opd_token_terms(impl='chunked')`` + ``reference.opd_loss`` (logits recomputed in
                 backward: 4 LM-head GEMMs, 8 N H V FLOPs), at each ``--chunk-sizes``.
- triton/terms:  the same with the Triton kernels (CUDA only); triton/terms+fp8 runs the two gradient GEMMs
                 in FP8 (``loss.fp8_lm_head``), triton/terms+fp8all also the logits GEMM.
- 2model/naive, 2model/tiled: the teacher inside the trainer (``loss/two_model.py``): student AND teacher hidden
                 states and LM heads (teacher of the same width), the student's own top-16 ids, the top-K KL and
                 the exact full-vocabulary reverse KL (coefficient 0.5 each) and the policy-gradient term.
                 naive builds both [N, V] logits (impl='reference'); tiled (impl='chunked') and triton (the
                 kernels of ``loss/two_model_triton.py``, CUDA; ``--interpreted-triton`` adds it on CPU for a
                 smoke run, timed through Triton's interpreter, so meaningless) never do; 2model/triton+fp8 runs the
                 student's gradient GEMMs in FP8 (CUDA). Their "vs naive" column is relative to 2model/naive.

Memory: on CUDA, ``torch.cuda.max_memory_allocated`` minus what was allocated before the case (inputs). On
CPU, torch's allocations are invisible to tracemalloc, so each case runs in its own subprocess and reports
the growth of the process's peak resident set (``ru_maxrss``) from just after the inputs are built to the end
of forward + backward: it includes the gradient buffers and allocator slack, which is what a run would see.
Time: forward + backward, median of ``--reps`` runs after one warm-up (CPU: the memory run is the warm-up).

    python benchmarks/bench_loss.py                      # CPU: N=2048, V=32768, H=512
    python benchmarks/bench_loss.py --out benchmarks/results/<date>-<cpu>.md
    python benchmarks/bench_loss.py --gpu                # CUDA: N=4096 and 16384, V=151936, H=1536
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_opd.loss import adapter, two_model  # noqa: E402
from megatron_opd.loss.reference import opd_loss  # noqa: E402

K = 16
GPU_PEAK_BF16_FLOPS = 790e12  # measured dense bf16 GEMM rate on an H200 (issue 7)


def _inputs(n: int, h: int, v: int, dtype: torch.dtype, device: str, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, device=device).to(dtype)
    weight = (torch.randn(v, h, generator=g, device=device) / h**0.5).to(dtype)
    targets = torch.randint(0, v, (n,), generator=g, device=device)
    ids = torch.randint(0, v, (n, K), generator=g, device=device)
    teacher = torch.log_softmax(torch.randn(n, K, generator=g, device=device), -1) - 3.0
    adv = torch.randn(1, n, generator=g, device=device)
    mask = torch.ones(1, n, dtype=torch.bool, device=device)
    return hidden, weight, targets, ids, teacher, adv, mask


def _step_two_model(case: str, chunk: int, hidden, weight, targets, adv, mask) -> torch.Tensor:
    """One forward + backward of the two-model loss (teacher: the student's inputs, shifted); logprobs [N]."""
    h = hidden.detach().requires_grad_(True)
    w = weight.detach().requires_grad_(True)
    t_h, t_w = hidden.roll(1, 0), weight.roll(1, 1)
    variant = case.removeprefix("2model/")
    impl = {"naive": "reference", "tiled": "chunked"}.get(variant.split("+")[0], "triton")
    out = two_model.two_model_terms(
        h, w, t_h, t_w, targets, topk=K, strategy="student", full_kl=True, chunk_size=chunk, impl=impl,
        fp8=variant.endswith("+fp8"),
    )  # fmt: skip
    loss = opd_loss(
        out["logp"].view(1, -1), adv, mask, topk_kl=out["topk_kl"].view(1, -1),
        full_kl=out["full_kl"].view(1, -1), topk_kl_coef=0.5, full_kl_coef=0.5,
    )  # fmt: skip
    loss.backward()
    return out["logp"].detach()


def _step(case: str, chunk: int, hidden, weight, targets, ids, teacher, adv, mask) -> torch.Tensor:
    """One forward + backward of the loss; returns the student logprobs [N] (no gradient)."""
    if case.startswith("2model/"):
        return _step_two_model(case, chunk, hidden, weight, targets, adv, mask)
    impl, _, variant = case.partition("/")
    impl = "reference" if impl == "naive" else impl
    h = hidden.detach().requires_grad_(True)
    w = weight.detach().requires_grad_(True)
    loss_kw = dict(topk_kl_coef=0.5, normalization="token_mean")
    lp, kl = adapter.opd_token_terms(
        h, w, targets, topk_ids=ids, teacher_topk_logprobs=teacher, impl=impl, chunk_size=chunk,
        fp8="fp8" in variant, fp8_forward=variant.endswith("fp8all"),
    )  # fmt: skip
    loss = opd_loss(lp.view(1, -1), adv, mask, topk_kl=kl.view(1, -1), **loss_kw)
    loss.backward()
    return lp.detach()


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_case(case: str, n: int, h: int, v: int, chunk: int, reps: int, device: str) -> dict:
    """Measure one case in this process. CPU memory is only meaningful in a fresh process (see module doc)."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    inputs = _inputs(n, h, v, dtype, device)
    cuda = device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        _step(case, chunk, *inputs)  # warm-up: Triton compilation, cuBLAS heuristics
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        _step(case, chunk, *inputs)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        # A tiny warm-up first, so pages of code and allocator pools touched on first use are not counted.
        _step(case, chunk, *_inputs(8, 16, 64, dtype, device))
        base = _maxrss_bytes()
        t0 = time.perf_counter()
        _step(case, chunk, *inputs)
        first = time.perf_counter() - t0
        peak = _maxrss_bytes() - base
    times = []
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            _step(case, chunk, *inputs)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            _step(case, chunk, *inputs)
            times.append(time.perf_counter() - t0)
    return {"case": case, "chunk": chunk, "peak_bytes": peak, "time_s": statistics.median(times or [first])}


def fp8_dlogp(n: int, h: int, v: int, chunk: int, fp8_forward: bool) -> tuple[float, float]:
    """(max, mean) |log p(fp8 path) - log p(fp32 reference)| on the bench inputs (CUDA)."""
    hidden, weight, targets, *_ = _inputs(n, h, v, torch.bfloat16, "cuda")
    with torch.no_grad():
        ref, _ = adapter.opd_token_terms(hidden, weight, targets, impl="reference")
        got, _ = adapter.opd_token_terms(
            hidden, weight, targets, impl="triton", chunk_size=chunk, fp8=True, fp8_forward=fp8_forward
        )
    d = (got - ref).abs()
    return d.max().item(), d.mean().item()


def _run_in_subprocess(case: str, n: int, h: int, v: int, chunk: int, reps: int) -> dict:
    spec = json.dumps(dict(case=case, n=n, h=h, v=v, chunk=chunk, reps=reps))
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--worker", spec],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _table(rows: list[dict], n: int, h: int, v: int, gpu: bool) -> str:
    naives = {r["case"].split("/")[0]: r for r in rows if r["case"] in ("naive", "2model/naive")}
    ideal = 6 * n * h * v / GPU_PEAK_BF16_FLOPS
    head = "| case | chunk | peak memory (MiB) | vs naive | fwd+bwd time (ms) | vs naive |"
    head += " x ideal GEMM |" if gpu else ""
    lines = [head, "|" + "---|" * (7 if gpu else 6)]
    for r in rows:
        naive = naives["2model" if r["case"].startswith("2model/") else "naive"]
        mem, t = r["peak_bytes"] / 2**20, r["time_s"] * 1e3
        line = f"| {r['case']} | {r['chunk'] if not r['case'].endswith('naive') else '-'} | {mem:,.1f} | "
        line += (
            f"{r['peak_bytes'] / naive['peak_bytes']:.3f} | {t:,.1f} | {r['time_s'] / naive['time_s']:.2f} |"
        )
        line += f" {r['time_s'] / ideal:.2f} |" if gpu else ""
        lines.append(line)
    title = f"N = {n:,}, H = {h:,}, V = {v:,}, K = {K}"
    if gpu:
        title += f"; ideal GEMM time 6NHV / {GPU_PEAK_BF16_FLOPS / 1e12:.0f} TFLOP/s = {ideal * 1e3:.1f} ms"
    return f"### {title}\n\n" + "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gpu", action="store_true", help="CUDA shapes (N = 4096, 16384; V = 151936; H = 1536)")
    p.add_argument("--n", type=int, nargs="*", help="token counts (default: CPU 2048, GPU 4096 16384)")
    p.add_argument("--h", type=int, default=None)
    p.add_argument("--v", type=int, default=None)
    p.add_argument("--chunk-sizes", type=int, nargs="*", default=[1024, 256])
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (default CPU 2, GPU 5)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads per case")
    p.add_argument(
        "--interpreted-triton",
        action="store_true",
        help="CPU: also the 2model/triton case through Triton's interpreter (a smoke run at small shapes)",
    )
    p.add_argument("--out", help="also write the markdown report here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args()

    if a.worker:
        spec = json.loads(a.worker)
        torch.set_num_threads(a.threads)
        print(json.dumps(run_case(device="cpu", **spec)))
        return

    gpu = a.gpu
    if gpu and not torch.cuda.is_available():
        sys.exit("--gpu needs CUDA")
    ns = a.n or ([4096, 16384] if gpu else [2048])
    h, v = a.h or (1536 if gpu else 512), a.v or (151936 if gpu else 32768)
    reps = a.reps if a.reps is not None else (5 if gpu else 2)
    impls = ["chunked", "triton"] if gpu else ["chunked"]
    cases = [("naive", a.chunk_sizes[0])]
    for impl in impls:
        cases += [(f"{impl}/terms", c) for c in a.chunk_sizes]
    if gpu:
        cases += [("triton/terms+fp8", a.chunk_sizes[0]), ("triton/terms+fp8all", a.chunk_sizes[0])]
    cases += [("2model/naive", a.chunk_sizes[0]), ("2model/tiled", a.chunk_sizes[0])]
    if gpu or a.interpreted_triton:
        cases += [("2model/triton", a.chunk_sizes[0])]
    if gpu:
        cases += [("2model/triton+fp8", a.chunk_sizes[0])]

    if gpu:
        device = torch.cuda.get_device_name()
    else:
        device = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                device = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
    report = [
        f"# bench_loss.py, {datetime.date.today().isoformat()}, {device}\n",
        f"torch {torch.__version__}; {'CUDA, bf16 inputs' if gpu else f'CPU, fp32 inputs, {a.threads} threads'}; "
        f"memory = {'cuda max_memory_allocated growth' if gpu else 'ru_maxrss growth in a fresh process per case'}; "
        f"time = median of {reps} fwd+bwd runs.\n",
    ]
    if not gpu:
        load = os.getloadavg()[0]
        report.append(
            f"Load average (1 min) when the run started: {load:.1f} on {os.cpu_count()} logical CPUs"
            + (
                " -- the machine was shared, so times are only indicative; memory is unaffected.\n"
                if load > 1.5 * (os.cpu_count() or 1)
                else ".\n"
            )
        )
    for n in ns:
        rows = []
        for case, chunk in cases:
            r = (
                run_case(case, n, h, v, chunk, reps, "cuda")
                if gpu
                else _run_in_subprocess(case, n, h, v, chunk, reps)
            )
            rows.append(r)
            print(
                f"  {case:18s} chunk={chunk:5d}  {r['peak_bytes'] / 2**20:10.1f} MiB  {r['time_s'] * 1e3:10.1f} ms"
            )
            if gpu:
                torch.cuda.empty_cache()
        report.append(_table(rows, n, h, v, gpu))
        if gpu:
            for fwd in (False, True):
                mx, mean = fp8_dlogp(n, h, v, a.chunk_sizes[0], fwd)
                name = "fp8all (logits in FP8 too)" if fwd else "fp8 (gradient GEMMs only)"
                report.append(f"{name}: |delta log p| vs fp32 reference: max {mx:.4f}, mean {mean:.4f}\n")
            torch.cuda.empty_cache()
    text = "\n".join(report)
    print(text)
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
