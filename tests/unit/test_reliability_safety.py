"""Safety (issue 9): servers the project starts listen on loopback unless told otherwise, checkpoints never
unpickle arbitrary objects (a booby-trapped trainer state is refused before its code runs, naming the file; every
other file of a checkpoint: ``test_checkpoint_safety.py``), and
server credentials never reach an error message."""

from __future__ import annotations

import inspect
import os
import sys

import pytest
import torch

from megatron_opd.rollout.engine import build_rollout_engine
from megatron_opd.rollout.sglang_client import SGLangClient, redact_url
from megatron_opd.rollout.sglang_server import SGLangServer, free_port
from megatron_opd.rollout.sglang_weights import DistributedWeightSync
from megatron_opd.rollout.types import RolloutError
from megatron_opd.training import checkpoint as ckpt


def test_started_servers_and_the_weight_sync_group_bind_loopback_by_default(tmp_path):
    cmd = SGLangServer(str(tmp_path), python=sys.executable).command()
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert (
        SGLangServer(str(tmp_path), python=sys.executable, host="10.0.0.5").command().count("10.0.0.5") == 1
    )
    for fn in (DistributedWeightSync.__init__, build_rollout_engine):
        assert inspect.signature(fn).parameters["master_address"].default == "127.0.0.1"


class _Trap:
    """Unpickling this runs code (writes a file): what a malicious checkpoint would do."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_checkpoint_holding_arbitrary_objects_is_refused_unexecuted(tmp_path):
    root, marker = tmp_path / "ckpt", tmp_path / "pwned"
    it = ckpt.iteration_dir(str(root), 7)
    os.makedirs(it)
    (root / ckpt.LATEST_FILE).write_text("7")
    torch.save(
        {"format_version": ckpt.FORMAT_VERSION, "trainer": _Trap(str(marker))},
        os.path.join(it, "trainer_state.pt"),
    )
    with pytest.raises(ckpt.CheckpointError, match=r"trainer_state\.pt: .*Weights only load failed"):
        ckpt.load_checkpoint(str(root), [], None, None)
    assert not marker.exists()


def test_credentials_in_server_urls_never_reach_messages():
    url = f"http://opd:s3cret-token@127.0.0.1:{free_port()}"
    assert redact_url(url + "/v1") == url.replace("opd:s3cret-token", "***") + "/v1"
    assert redact_url("http://127.0.0.1:5/x") == "http://127.0.0.1:5/x"
    with pytest.raises(RolloutError) as e:
        SGLangClient([url], max_retries=1, backoff_s=0.01, timeout_s=2).post("/generate", {"input_ids": [1]})
    assert "s3cret" not in str(e.value) and "***@127.0.0.1" in str(e.value)
