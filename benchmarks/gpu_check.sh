#!/usr/bin/env bash
# GPU check for the fused LM-head + OPD loss (issue 7), sized for one H200 in under 8 minutes:
#   1. the CUDA numerics tests (tests/gpu/test_loss_gpu.py: Triton/cuBLAS vs the fp32 reference, FP8 error),
#   2. the GPU benchmark (benchmarks/bench_loss.py --gpu: N = 4096 and 16384, V = 151936, H = 1536).
# Output: benchmarks/results/<UTC date>-<gpu name>.md (also copied to $OUT when that is set).
#
# Needs only torch (CUDA build) and triton. megatron-core and transformer-engine are not needed by the loss
# and are not installed on the check machine: the TP=2 test (tests/distributed, gloo on CPU) and any
# Transformer-Engine FP8 path are skipped here and said so in the report. Uses pytest when installed, else
# runs the test file directly.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET

if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check.sh: no CUDA device visible to $PY; nothing to do" >&2
  exit 2
fi
gpu=$($PY -c "import torch, re; print(re.sub(r'[^A-Za-z0-9]+', '-', torch.cuda.get_device_name()).strip('-'))")
out="benchmarks/results/$(date -u +%F)-${gpu}.md"
mkdir -p benchmarks/results
tmp=$(mktemp -d)
start=$(date +%s)

{
  echo "# GPU check, issue 7 (fused LM-head + OPD loss): $(date -u '+%F %H:%M UTC'), ${gpu}"
  echo
  echo '```'
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || true
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| triton', triton.__version__)"
  $PY -c "import megatron.core" 2>/dev/null && echo "megatron-core: installed" \
    || echo "megatron-core: not installed -> tests/distributed (TP=2 gloo, CPU) skipped here"
  $PY -c "import transformer_engine" 2>/dev/null && echo "transformer-engine: installed (not used: FP8 goes through torch._scaled_mm)" \
    || echo "transformer-engine: not installed -> no TE FP8 path (this loss uses torch._scaled_mm)"
  echo '```'
  echo
  echo "## 1. CUDA numerics tests (tests/gpu/test_loss_gpu.py)"
  echo
  echo '```'
} > "$out"

if $PY -c "import pytest" 2>/dev/null; then
  timeout 240 $PY -m pytest tests/gpu/test_loss_gpu.py -q -s -rs -p no:cacheprovider -o addopts="" 2>&1 | tee "$tmp/tests.log"
  tests_rc=${PIPESTATUS[0]}
else
  echo "(pytest not installed: running the test file directly)" | tee "$tmp/tests.log"
  timeout 240 $PY tests/gpu/test_loss_gpu.py 2>&1 | tee -a "$tmp/tests.log"
  tests_rc=${PIPESTATUS[0]}
fi
tail -n 60 "$tmp/tests.log" >> "$out"
{ echo "exit code: $tests_rc"; echo '```'; echo; echo "## 2. Benchmark (benchmarks/bench_loss.py --gpu)"; echo; } >> "$out"

timeout 330 $PY benchmarks/bench_loss.py --gpu --out "$tmp/bench.md" 2>&1 | tee "$tmp/bench.log"
bench_rc=${PIPESTATUS[0]}
if [ -s "$tmp/bench.md" ]; then
  sed '1d' "$tmp/bench.md" >> "$out"  # drop its title; the header above names the run
else
  { echo "benchmark did not finish (exit code $bench_rc); its log:"; echo '```'; tail -n 40 "$tmp/bench.log"; echo '```'; } >> "$out"
fi
{ echo; echo "Total wall time: $(( $(date +%s) - start )) s; tests exit $tests_rc, benchmark exit $bench_rc."; } >> "$out"

echo "wrote $out"
if [ -n "${OUT:-}" ]; then cp "$out" "$OUT/"; fi
rm -rf "$tmp"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
