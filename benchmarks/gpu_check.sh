#!/usr/bin/env bash
# The GPU acceptance run (issue 14) on one H200, in under 8 minutes, without network:
#   (a) the CUDA loss numerics tests and the loss benchmark at N = 4,096 and 16,384 (V = 151,936, H = 1,536)
#       against our goals, (b) a Megatron student step at Qwen2-1.5B width with its MFU, (c) a checkpoint save and
#       load under NCCL, (d) the trainer -> HF-names weight gather in GB/s. One "CHECK <name>: PASS|FAIL" line each;
#   the report goes to benchmarks/results/<UTC date>-<gpu>.md (also copied to $OUT when that is set).
# The checks live in benchmarks/gpu_acceptance.py; this script prepares the environment and runs it.
#
# Usage: bash benchmarks/gpu_check.sh [--dry-run] [--out FILE]
#   --dry-run  every part on CPU at toy size (gloo, fp32, Triton interpreted; ~30-60 s); the report goes to a
#              temporary file unless --out is given. tests/e2e/test_gpu_acceptance_dry_run.py runs this.
#
# Offline packages: the check machine has torch, triton, transformers, pytest, numpy, pyyaml, safetensors, tqdm,
# tensorboard, but no megatron-core and no package index. Fill the git-ignored benchmarks/wheels/ here, on a
# machine with network, with cp312 manylinux wheels (about 3 MiB) and ship it with the checkout (the device tool:
# carry ["benchmarks/wheels"]):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
#       -d benchmarks/wheels megatron-core==0.16.1 psutil
# When the folder holds wheels they are installed (pip --no-index --no-deps --target, or unzipped) into a temporary
# folder put on PYTHONPATH (so these pinned versions are the ones imported). transformer-engine and
# sglang do not fit the 64 MiB a checkout may carry: the run works without them (Megatron's local layer spec with
# torch SDPA attention, masked_softmax_fusion off without its kernels) and its report says so.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

dry=0
out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry=1 ;;
    --out) out="$2"; shift ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$1' (use --dry-run, --out FILE)" >&2; exit 2 ;;
  esac
  shift
done

wheels=benchmarks/wheels
if compgen -G "$wheels/*.whl" > /dev/null; then
  if [ "$dry" -eq 1 ]; then
    echo "gpu_check.sh: dry run: not installing $wheels/*.whl (the CPU environment is used as it is)"
  else
    # Into a private folder on PYTHONPATH, not the system's site-packages (which may be externally managed);
    # plain unzipping is the fallback where pip is missing: these wheels need no install-time steps.
    site=$(mktemp -d)/site
    echo "gpu_check.sh: installing $(ls "$wheels"/*.whl | wc -l) offline wheel(s) from $wheels into $site"
    $PY -m pip install -q --no-index --no-deps --target "$site" "$wheels"/*.whl 2>/dev/null \
      || $PY -c "import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]" \
        "$site" "$wheels"/*.whl \
      || echo "gpu_check.sh: offline wheel install failed" >&2
    export PYTHONPATH="$PYTHONPATH:$site"
  fi
elif [ "$dry" -eq 0 ]; then
  $PY -c "import megatron.core" 2>/dev/null \
    || echo "gpu_check.sh: megatron-core missing and $wheels/ empty: the student checks will FAIL (see the header)" >&2
fi

if [ "$dry" -eq 1 ]; then
  export TRITON_INTERPRET=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  [ -n "$out" ] || out="$(mktemp -d)/gpu-acceptance-dry-run.md"
  timeout 300 $PY benchmarks/gpu_acceptance.py --dry-run --out "$out"
  exit $?
fi

unset TRITON_INTERPRET
if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check.sh: no CUDA device visible to $PY; use --dry-run for the CPU version" >&2
  exit 2
fi
gpu=$($PY -c "import torch, re; print(re.sub(r'[^A-Za-z0-9]+', '-', torch.cuda.get_device_name()).strip('-'))")
[ -n "$out" ] || out="benchmarks/results/$(date -u +%F)-${gpu}.md"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || true
# 8 minutes in all: the parts are sized for about 4 on an H200; the rest is margin (Triton compilation, disk).
timeout 480 $PY benchmarks/gpu_acceptance.py --out "$out"
rc=$?
[ "$rc" -eq 124 ] && echo "gpu_check.sh: the run passed its 8-minute budget and was stopped" >&2
if [ -n "${OUT:-}" ] && [ -f "$out" ]; then cp "$out" "$OUT/"; fi
exit $rc
