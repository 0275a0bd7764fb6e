"""examples/slurm_pretrain_opd.sbatch, run with stand-ins for SLURM's commands: which node runs what, and the
server URLs and teacher backend the trainer is given."""

import os
import stat
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

_SRUN = """#!/usr/bin/env bash
# Record each job step (its arguments joined by the unit separator, newlines kept apart); start nothing.
{ printf 'srun'; printf '\x1f%s' "$@"; printf '\x1e'; } >> "$STEPS_LOG"
"""


def _run(tmp_path: Path, nodes: list[str], **env_extra: str) -> tuple[int, list[str], str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in {
        "scontrol": "#!/usr/bin/env bash\nprintf '%s\\n' " + " ".join(nodes) + "\n",
        "srun": _SRUN,
        "curl": "#!/usr/bin/env bash\nexit 0\n",
    }.items():
        path = bin_dir / name
        path.write_text(body)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "steps.log"
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "STEPS_LOG": str(log),
        "SLURM_JOB_NODELIST": ",".join(nodes),
        "SLURM_JOB_ID": "42",
        "SLURM_GPUS_ON_NODE": "8",
        "STUDENT_MODEL": "/models/student",
        **env_extra,
    }
    proc = subprocess.run(
        ["bash", str(ROOT / "examples" / "slurm_pretrain_opd.sbatch"), "run.yaml", "--lr", "1e-6"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    steps = (
        [" ".join(step.split("\x1f")) for step in log.read_text().split("\x1e")[:-1]] if log.exists() else []
    )
    return proc.returncode, steps, proc.stdout + proc.stderr


def test_default_layout_rollout_servers_then_trainer_with_the_teacher_inside(tmp_path):
    rc, steps, out = _run(tmp_path, ["n0", "n1", "n2"])
    assert rc == 0, out
    servers, trainer = steps[0], steps[-1]
    assert "--nodelist=n0" in servers and "/models/student" in servers
    assert "--nodes=2" in trainer and "--nodelist=n1,n2" in trainer
    urls = ",".join(f"http://n0:{30000 + g}" for g in range(8))
    assert f"--rollout.sglang_urls {urls}" in trainer and "--lr 1e-6" in trainer
    assert "--teacher.backend" not in trainer  # the config's teacher (megatron in the paper configs)
    assert len(steps) == 2


def test_teacher_servers_get_their_own_node(tmp_path):
    rc, steps, out = _run(
        tmp_path,
        ["n0", "n1", "n2", "n3"],
        TEACHER_SERVERS="1",
        TEACHER_MODEL="/models/teacher",
        TEACHER_TP="2",
    )
    assert rc == 0, out
    # The two server steps start in the background, so they reach the log in either order: find them by model.
    servers, trainer = steps[:-1], steps[-1]
    (student,) = [s for s in servers if "/models/student" in s]
    (teacher,) = [s for s in servers if "/models/teacher" in s]
    assert "--nodelist=n0" in student and "--nodelist=n1" in teacher and len(steps) == 3
    assert "--nodelist=n2,n3" in trainer
    urls = ",".join(f"http://n1:{30000 + g}" for g in range(0, 8, 2))
    assert f"--teacher.backend sglang --teacher.sglang_urls {urls}" in trainer


def test_too_few_nodes_or_no_teacher_model_is_refused(tmp_path):
    rc, _, out = _run(tmp_path, ["n0"])
    assert rc == 2 and "need at least 2 nodes" in out
    rc, _, out = _run(tmp_path, ["n0", "n1", "n2"], TEACHER_SERVERS="1")
    assert rc == 2 and "set TEACHER_MODEL" in out
