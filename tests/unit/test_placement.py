"""GPU placement of launched SGLang servers (issue 12): own GPUs after the trainer's when the node has them; a
shared GPU only under an explicit memory cap, otherwise a start-up error saying what to set."""

from __future__ import annotations

import pytest

from megatron_opd.config.base import ConfigError
from megatron_opd.rollout.placement import flag_value, place_servers


def test_servers_get_the_gpus_after_the_trainers():
    """One node of 8: trainer on 0-3, student server TP 2 on 4-5, teacher TP 2 on 6-7."""
    out = place_servers(
        num_gpus=8,
        trainer_gpus=4,
        servers=[("rollout", ["--tp-size", "2"]), ("teacher", ["--tp-size=2"])],
    )
    assert [(p.role, p.gpus, p.shares) for p in out] == [
        ("rollout", (4, 5), False),
        ("teacher", (6, 7), False),
    ]
    assert out[1].launch_args() == ["--base-gpu-id", "6"]


def test_sharing_a_trainer_gpu_without_a_memory_cap_is_refused_naming_the_fix():
    with pytest.raises(
        ConfigError, match=r"rollout.launch_args.*GPU\(s\) \[0\].*trainer rank 0.*--mem-fraction-static"
    ):
        place_servers(num_gpus=1, trainer_gpus=1, servers=[("rollout", [])])


def test_sharing_is_allowed_under_an_explicit_cap():
    (p,) = place_servers(num_gpus=1, trainer_gpus=1, servers=[("rollout", ["--mem-fraction-static", "0.3"])])
    assert p.gpus == (0,) and p.shares


def test_two_servers_on_one_spare_gpu_need_the_cap_on_the_second():
    with pytest.raises(ConfigError, match=r"teacher.launch_args.*the rollout server"):
        place_servers(
            num_gpus=2, trainer_gpus=1, servers=[("rollout", []), ("teacher", ["--base-gpu-id", "1"])]
        )


def test_a_server_larger_than_the_node_is_refused():
    with pytest.raises(ConfigError, match=r"GPUs 4\.\.11 \(TP 8\) but this node has 8"):
        place_servers(num_gpus=8, trainer_gpus=4, servers=[("rollout", ["--base-gpu-id", "4", "--tp", "8"])])


def test_flag_value_reads_both_spellings():
    assert flag_value(["--a", "1", "--b=2"], "--b") == "2"
    assert flag_value(["--a", "1"], "--x", "--a") == "1"
    assert flag_value(["--a"], "--a") is None
