"""Run logging (jsonl + TensorBoard) and the plot tool that reads it."""

import importlib.util
import json
import os

from megatron_opd.training.logger import RunLogger


def _plot_tool():
    path = os.path.join(os.path.dirname(__file__), "..", "..", "tools", "plot_run.py")
    spec = importlib.util.spec_from_file_location("plot_run", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_logger_writes_phases_and_scalars_and_the_plot_tool_reads_them(tmp_path, capsys):
    runs = []
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
                    "eval/toy/avg": 0.1 * step,
                    "opd_by_position/topk_kl_00": 0.1,
                    "opd_by_position/topk_kl_01": 0.3,
                },
            )
        log.close()
        runs.append(str(d))
        rows = [json.loads(x) for x in open(d / "metrics.jsonl")]
        assert [r["step"] for r in rows] == [0, 1, 2, 3]
        assert {"time/rollout_s", "time/teacher_s", "time/train_s", "time/sync_s", "memory/peak_gb"} <= rows[
            0
        ].keys()
        assert any(f.startswith("events.out.tfevents") for f in os.listdir(d / "tb"))
    assert "step     3 | loss=0.25" in capsys.readouterr().out
    written = _plot_tool().plot_runs(runs, str(tmp_path / "plots"))
    assert {os.path.basename(p) for p in written} == {
        "accuracy.png",
        "topk_kl_by_position.png",
        "horizon.png",
    }
    assert all(os.path.getsize(p) > 1000 for p in written)


def test_logger_disabled_on_other_ranks_writes_nothing(tmp_path):
    log = RunLogger(log_dir=str(tmp_path / "x"), tensorboard_dir=None, enabled=False)
    with log.phase("train", 0):
        pass
    log.log(0, {"loss": 1.0})
    assert not (tmp_path / "x").exists()
