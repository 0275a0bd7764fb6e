"""Run logging (jsonl + TensorBoard). The plot tool is tested on a real run's output in tests/e2e/test_plot_run.py."""

import json
import os

from megatron_opd.training.logger import RunLogger


def test_logger_writes_phases_and_scalars(tmp_path, capsys):
    for name, h in (("opd", 40), ("popd", 10)):
        d = tmp_path / name
        log = RunLogger(log_dir=str(d), tensorboard_dir=str(d / "tb"), enabled=True, progress_bar=False)
        for step in range(4):
            for ph in ("rollout", "teacher", "train", "sync"):
                with log.phase(ph, step):
                    pass
            log.log(
                step,
                {
                    "loss": 1.0 / (step + 1),
                    "horizon/end": float(h + step),
                    "eval/toy/avg@4": 0.1 * step,
                },
            )
        log.close()
        rows = [json.loads(x) for x in open(d / "metrics.jsonl")]
        assert [r["step"] for r in rows] == [0, 1, 2, 3]
        assert {"time/rollout_s", "time/teacher_s", "time/train_s", "time/sync_s", "memory/peak_gb"} <= rows[
            0
        ].keys()
        assert any(f.startswith("events.out.tfevents") for f in os.listdir(d / "tb"))
    assert "step     3 | loss=0.25" in capsys.readouterr().out


def test_logger_disabled_on_other_ranks_writes_nothing(tmp_path):
    log = RunLogger(log_dir=str(tmp_path / "x"), tensorboard_dir=None, enabled=False)
    with log.phase("train", 0):
        pass
    log.log(0, {"loss": 1.0})
    assert not (tmp_path / "x").exists()
