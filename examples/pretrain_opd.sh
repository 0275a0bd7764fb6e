#!/usr/bin/env bash
# Launch megatron-opd with torchrun.
#
#   examples/pretrain_opd.sh                          # no arguments on a CPU machine: the CPU main job
#   examples/pretrain_opd.sh --config examples/configs/paper/r1_popd.yaml [--section.field value ...]
#
# Multi-node: set NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT (and NPROC_PER_NODE, default: the GPU count) on every
# node; examples/slurm_pretrain_opd.sbatch does it for SLURM. Everything after the script name goes to the
# trainer (megatron_opd.training.main): see `--help` for every config key.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
HAS_CUDA=$("$PYTHON" -c "import torch; print(int(torch.cuda.is_available()))")
GPUS=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")

NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
ARGS=("$@")
if [[ "$HAS_CUDA" == 1 ]]; then
  NPROC_PER_NODE=${NPROC_PER_NODE:-$GPUS}
elif [[ ${#ARGS[@]} -eq 0 ]]; then
  # The CPU main job: one single-threaded data-parallel rank per core, up to 2 (each generates its own share
  # of the step with its own engine, rollout.engine_ranks data_parallel in cpu_toy.yaml).
  CORES=$(nproc 2>/dev/null || echo 1)
  NPROC_PER_NODE=${NPROC_PER_NODE:-$(( CORES >= 2 ? 2 : 1 ))}
else
  NPROC_PER_NODE=${NPROC_PER_NODE:-1}
fi
if [[ ${#ARGS[@]} -eq 0 ]]; then
  if [[ "$HAS_CUDA" == 1 ]]; then
    echo "usage: $0 --config CONFIG.yaml [--section.field value ...]   (configs: examples/configs/paper/)" >&2
    exit 2
  fi
  # The CPU main job: a toy reasoning task, a tiny teacher and student made (or taken from the cache) here,
  # the embedded engine, POPD; prints the student's accuracy before and after next to the teacher's.
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  echo "== CPU main job: making (or loading cached) toy teacher and student =="
  eval "$("$PYTHON" - <<'PY'
import shlex
from megatron_opd.toy.models import make_toy_models
m = make_toy_models()
print("TOY_TEACHER=%s TOY_STUDENT=%s TOY_TRAIN=%s TOY_EVAL=%s" % tuple(
    shlex.quote(x) for x in (m.teacher, m.student, m.train_data, m.eval_spec)))
PY
)"
  ARGS=(--config examples/configs/cpu_toy.yaml
        --model.hf_path "$TOY_STUDENT" --teacher.hf_path "$TOY_TEACHER"
        --train.data_path "$TOY_TRAIN" --eval.datasets "$TOY_EVAL"
        --train.micro_batch_size $(( 64 / NPROC_PER_NODE )))  # each rank's 64 / DP rollouts in one micro-batch
  echo "== CPU main job: distilling (POPD) =="
fi

# torchrun with its rendezvous store bound to one address (torch's own static rendezvous listens on every
# interface): loopback when NNODES=1, MASTER_ADDR otherwise; see megatron_opd/parallel/launch.py.
exec "$PYTHON" -m megatron_opd.parallel.launch \
  --nnodes "$NNODES" --nproc_per_node "$NPROC_PER_NODE" \
  --rdzv-backend opd-static --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-conf "rank=$NODE_RANK" \
  -m megatron_opd.training.main "${ARGS[@]}"
