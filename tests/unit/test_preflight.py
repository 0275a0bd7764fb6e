"""Start-up checks against the disk (issue 16 item 5): model directories, TP/PP against the checkpoint's
config.json, and output folders, each a ConfigError naming the key before any model is built."""

from __future__ import annotations

import os

import pytest

from megatron_opd.config import ConfigError, config_from_dict
from megatron_opd.rollout.tiny_model import make_tiny_hf_model
from megatron_opd.training.preflight import check_run_inputs, check_writable_dir


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    # 4 attention heads, 2 KV heads, intermediate 128, 2 layers
    return make_tiny_hf_model(str(tmp_path_factory.mktemp("m") / "student"), seed=0)


def _cfg(tiny, **sections):
    raw = {"model": {"hf_path": tiny}, **sections}
    return config_from_dict(raw)


def test_a_missing_model_directory_names_its_key(tiny, tmp_path):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(ConfigError, match=rf"config key 'model.hf_path': {missing} does not exist"):
        check_run_inputs(config_from_dict({"model": {"hf_path": missing}}))
    with pytest.raises(ConfigError, match=rf"config key 'teacher.hf_path': {missing} does not exist"):
        check_run_inputs(_cfg(tiny, teacher={"hf_path": missing}))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"config key 'teacher.hf_path': .*empty has no config.json"):
        check_run_inputs(_cfg(tiny, teacher={"hf_path": str(tmp_path / "empty")}))
    check_run_inputs(_cfg(tiny, teacher={"hf_path": tiny}))  # both present: passes


@pytest.mark.parametrize(
    "parallel, needle",
    [
        (
            {"tensor_model_parallel_size": 3},
            "'parallel.tensor_model_parallel_size': got 3, which does not divide num_attention_heads = 4 of the "
            "config.json of model.hf_path",
        ),
        (
            {"tensor_model_parallel_size": 4},  # divides the 4 heads, not the 2 KV heads
            "'parallel.tensor_model_parallel_size': got 4, which does not divide num_key_value_heads = 2",
        ),
        (
            {"pipeline_model_parallel_size": 3},
            "'parallel.pipeline_model_parallel_size': got 3, which does not divide num_hidden_layers = 2",
        ),
        (
            {"pipeline_model_parallel_size": 2, "virtual_pipeline_model_parallel_size": 2},
            "got 2 x 2 = 4, which does not divide num_hidden_layers = 2",
        ),
    ],
)
def test_tp_not_dividing_heads_and_pp_not_dividing_layers_are_config_errors(tiny, parallel, needle):
    with pytest.raises(ConfigError) as e:
        check_run_inputs(_cfg(tiny, parallel=parallel))
    assert needle in str(e.value)
    assert "allowed: a divisor of" in str(e.value)


def test_layouts_that_fit_pass(tiny):
    check_run_inputs(
        _cfg(tiny, parallel={"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2})
    )


def test_an_unwritable_save_folder_is_refused_at_start_up(tiny, tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be")
    with pytest.raises(
        ConfigError, match=r"config key 'checkpoint.save': .*blocker is a file, not a directory"
    ):
        check_run_inputs(_cfg(tiny, checkpoint={"save": str(blocker)}))
    with pytest.raises(
        ConfigError, match=r"config key 'checkpoint.save': .* is not a writable directory .*Not a"
    ):
        check_run_inputs(_cfg(tiny, checkpoint={"save": str(blocker / "run1")}))  # a file in its path
    with pytest.raises(ConfigError, match=r"config key 'logging.log_dir'"):
        check_run_inputs(_cfg(tiny, logging={"log_dir": str(blocker / "logs")}))
    fresh = tmp_path / "a" / "b"
    check_writable_dir("checkpoint.save", str(fresh))  # created, and the probe file is gone again
    assert fresh.is_dir() and os.listdir(fresh) == []


def test_an_architecture_key_the_checkpoint_contradicts_is_a_config_error(tiny):
    """The weights fix the architecture: a model.* architecture key that disagrees is rejected, not ignored."""
    with pytest.raises(
        ConfigError, match=r"config key 'model.num_layers': got 4, .* has 2 in its config.json"
    ):
        check_run_inputs(config_from_dict({"model": {"hf_path": tiny, "num_layers": 4}}))
    check_run_inputs(config_from_dict({"model": {"hf_path": tiny, "num_layers": 2}}))  # agrees: passes
