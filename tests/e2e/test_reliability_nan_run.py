"""Numerical faults in a whole run (issue 9): NaN teacher logprobs at chosen steps make those steps' loss NaN;
each is skipped (weights, optimizer, LR untouched) and logged, the run stops with a clear message after
``train.max_consecutive_nonfinite_steps`` in a row, and no checkpoint ever holds NaN weights."""

import json

import pytest

from megatron_opd.utils.kill_resume import make_tiny_setup
from megatron_opd.utils.spawn import run_on_ranks

pytestmark = pytest.mark.e2e

NAN_STEPS = {2, 4, 5}  # 0-based loop steps whose teacher scores are NaN; 4 and 5 are two in a row


def _worker(rank, world, work_dir):
    import torch

    from megatron_opd.teacher.embedded import EmbeddedScorer
    from megatron_opd.training import checkpoint
    from megatron_opd.training.main import train
    from megatron_opd.training.run import NonFiniteError

    calls = {"n": 0}
    score = EmbeddedScorer.score

    def poisoned_score(self, *a, **kw):  # the real teacher, then NaN logprobs on the chosen steps
        out = score(self, *a, **kw)
        if calls["n"] in NAN_STEPS:
            out.logprobs = [torch.full_like(r, float("nan")) for r in out.logprobs]  # the scorer's type
        calls["n"] += 1
        return out

    saves = {}
    save = checkpoint.save_checkpoint

    def recording_save(root, iteration, model, *a, **kw):  # what each checkpoint is written from
        params = [p.detach().clone() for chunk in model for p in chunk.parameters()]
        saves[iteration] = {
            "finite": all(bool(torch.isfinite(p).all()) for p in params),
            "params": params,
        }
        return save(root, iteration, model, *a, **kw)

    EmbeddedScorer.score = poisoned_score
    checkpoint.save_checkpoint = recording_save
    argv = make_tiny_setup(work_dir) + [
        "--train.train_steps", "8", "--checkpoint.save_interval", "1", "--checkpoint.keep_last", "10",
        "--checkpoint.save", f"{work_dir}/run", "--train.max_consecutive_nonfinite_steps", "2",
    ]  # fmt: skip
    try:
        train(argv)
        error = None
    except NonFiniteError as e:
        error = str(e)
    same = {
        f"{a}=={b}": all(torch.equal(x, y) for x, y in zip(saves[a]["params"], saves[b]["params"]))
        for a, b in ((2, 3), (3, 4), (4, 5))
    }
    return {"error": error, "finite": {k: v["finite"] for k, v in saves.items()}, "same": same}


def test_nan_steps_are_skipped_then_the_run_stops_and_checkpoints_stay_finite(tmp_path):
    out = run_on_ranks(_worker, 1, str(tmp_path))[0]
    assert (
        out["error"] is not None
        and "2 consecutive steps had a non-finite loss (last at step 5)" in out["error"]
    )
    assert "--checkpoint.load" in out["error"]  # says how to go on
    # Saved after steps 1..5 (the failing 6th step stops before its save); every checkpoint's weights are finite.
    assert sorted(out["finite"]) == [1, 2, 3, 4, 5] and all(out["finite"].values())
    # A skipped step leaves the weights exactly as they were; a good step changes them.
    assert out["same"] == {"2==3": True, "3==4": False, "4==5": True}
    latest = (tmp_path / "run" / "latest_checkpointed_iteration.txt").read_text().strip()
    assert latest == "5"
    rows = {
        r["step"]: r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
    }
    assert [s for s in sorted(rows) if rows[s]["train/skipped"] == 1.0] == [3, 5]  # 1-based: steps 2 and 4
    assert rows[4]["train/skipped"] == 0.0 and rows[4]["train/loss"] == rows[4]["train/loss"]
