"""The config tree: defaults validate, YAML and CLI are generated from it, bad input fails naming the key."""

import dataclasses
import textwrap

import pytest

from megatron_opd.config import (
    ConfigError,
    HorizonConfig,
    OPDConfig,
    build_parser,
    config_from_dict,
    dump_yaml,
    load_yaml,
    parse_config,
)
from megatron_opd.config.base import field_docs
from megatron_opd.config.loader import _sections


def test_every_field_has_a_docstring():
    for section, cls in _sections().items():
        docs = field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
        assert not missing, f"{section}: fields without a docstring: {missing}"


def test_defaults_are_valid_and_follow_the_paper_table_3():
    cfg = OPDConfig()
    assert cfg.train.global_batch_size == 64 and cfg.train.n_samples_per_prompt == 4
    assert cfg.rollout.temperature == 1.0 and cfg.rollout.top_p == 1.0
    assert cfg.rollout.max_prompt_length == 1024 and cfg.rollout.max_response_length == 15360
    assert cfg.optimizer.lr == 1e-6 and cfg.train.epochs == 2
    assert cfg.teacher.topk == 16 and cfg.teacher.topk_strategy == "student"
    assert cfg.horizon.delta_h == 9 and cfg.horizon.delta_k == 1
    assert cfg.loss.gamma == 0.0


def test_cli_megatron_names_and_dotted_names():
    cfg = parse_config(
        [
            "--tensor-model-parallel-size",
            "2",
            "--parallel.pipeline_model_parallel_size",
            "2",
            "--micro-batch-size",
            "2",
            "--global-batch-size",
            "8",
            "--lr",
            "3e-4",
            "--horizon.schedule",
            "truncated",
            "--horizon.rho",
            "0.1",
            "--sequence-parallel",
            "true",
            "--rollout.sglang_urls",
            "http://a:1,http://b:2",
        ]
    )
    assert cfg.parallel.tensor_model_parallel_size == 2
    assert cfg.parallel.pipeline_model_parallel_size == 2
    assert cfg.train.micro_batch_size == 2 and cfg.train.global_batch_size == 8
    assert cfg.optimizer.lr == pytest.approx(3e-4)
    assert cfg.horizon.schedule == "truncated" and cfg.horizon.rho == 0.1
    assert cfg.parallel.sequence_parallel is True
    assert cfg.rollout.sglang_urls == ["http://a:1", "http://b:2"]


def test_yaml_then_cli_override_and_include(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("optimizer:\n  lr: 1.0e-5\ntrain:\n  epochs: 3\n")
    child = tmp_path / "child.yaml"
    child.write_text("include: base.yaml\nhorizon:\n  schedule: full\ntrain:\n  seed: 7\n")
    cfg = parse_config(["--config", str(child), "--train.seed", "9"])
    assert cfg.optimizer.lr == 1e-5 and cfg.train.epochs == 3
    assert cfg.horizon.schedule == "full" and cfg.train.seed == 9


def test_dump_yaml_round_trips(tmp_path):
    cfg = parse_config(["--horizon.schedule", "adaptive", "--tensor-model-parallel-size", "2"])
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_yaml(cfg))
    assert config_from_dict(load_yaml(path)) == cfg


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--horizon.schedule", "foo"], "'horizon.schedule': got 'foo'; allowed: one of 'full', 'truncated'"),
        (["--horizon.rho", "1.5"], "'horizon.rho': got 1.5; allowed: a number in (0.0, 1.0]"),
        (["--lr", "abc"], "'optimizer.lr': got 'abc'; allowed: a number"),
        (["--micro-batch-size", "0"], "'train.micro_batch_size': got 0"),
        (
            ["--horizon.schedul", "full"],
            "unknown command-line argument '--horizon.schedul'. Did you mean --horizon.schedule",
        ),
        (["--sequence-parallel", "true"], "'parallel.sequence_parallel'"),
        (["--model.num_query_groups", "3"], "a divisor of num_attention_heads (4)"),
        (["--rollout.sglang_urls", "localhost:3000"], "URLs starting with http://"),
        (
            ["--teacher.backend", "sglang", "--teacher.sglang_urls", "localhost:3000"],
            "'teacher.sglang_urls': got 'localhost:3000'; allowed: URLs starting with http://",
        ),
        (["--loss.topk_kl_coef", "0.5", "--teacher.topk", "0"], "'teacher.topk'"),
        (
            ["--rollout.launch_server", "true"],
            "'rollout.launch_server': got True; allowed: rollout.backend 'sglang'",
        ),
        (
            [
                "--rollout.backend",
                "sglang",
                "--rollout.launch_server",
                "true",
                "--rollout.sglang_urls",
                "http://127.0.0.1:3000",
            ],
            "allowed: no rollout.sglang_urls",
        ),  # fmt: skip
        (["--teacher.backend", "sglang", "--teacher.launch_server", "true"], "teacher.hf_path set"),
        (["--rollout.sync_address", "10.0.0.1:29600"], "'rollout.sync_address': got '10.0.0.1:29600'"),
        (["--rollout.sync_address", "http://10.0.0.1"], "bare host addresses"),
        (["--rollout.sync_port", "70000"], "'rollout.sync_port': got 70000"),
        (["--rollout.sync_backend", "mpi"], "'rollout.sync_backend'"),
        (
            ["--loss.fp8_lm_head", "true", "--loss.impl", "reference"],
            "'loss.fp8_lm_head': got True; allowed: false with loss.impl 'reference'",
        ),
    ],
)
def test_bad_values_name_the_key_and_the_allowed_values(argv, needle):
    with pytest.raises(ConfigError) as e:
        parse_config(argv)
    assert needle in str(e.value)


def test_unknown_yaml_key_and_section(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(textwrap.dedent("horizon:\n  shedule: full\n"))
    with pytest.raises(
        ConfigError, match=r"unknown config key 'horizon.shedule'. Did you mean horizon.schedule"
    ):
        parse_config(["--config", str(bad)])
    with pytest.raises(ConfigError, match=r"unknown config key 'horizn'"):
        config_from_dict({"horizn": {}})
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml(tmp_path / "missing.yaml")


def test_world_size_checks():
    cfg = parse_config(
        ["--tensor-model-parallel-size", "2", "--global-batch-size", "4", "--micro-batch-size", "2"]
    )
    assert cfg.check_world_size(4) == 2
    with pytest.raises(
        ConfigError, match=r"world size 3 is not divisible by tensor_model_parallel_size \(2\)"
    ):
        cfg.check_world_size(3)
    odd = parse_config(["--global-batch-size", "3", "--n-samples-per-prompt", "1", "--micro-batch-size", "2"])
    with pytest.raises(ConfigError, match="not divisible by micro_batch_size"):
        odd.check_world_size(1)
    fixed = parse_config(["--parallel.data_parallel_size", "2"])
    with pytest.raises(ConfigError, match="set it to 4"):
        fixed.check_world_size(4)


def test_steps_per_rollout_needs_checkpoints_between_rollout_phases():
    ok = parse_config(["--train.steps_per_rollout", "4", "--checkpoint.save_interval", "8"])
    assert ok.train.steps_per_rollout == 4
    with pytest.raises(
        ConfigError, match=r"checkpoint.save_interval.*a multiple of train.steps_per_rollout \(4\)"
    ):
        parse_config(["--train.steps_per_rollout", "4", "--checkpoint.save_interval", "6"])
    with pytest.raises(ConfigError, match="train.steps_per_rollout"):
        parse_config(["--train.steps_per_rollout", "0"])


def test_help_lists_every_field_with_its_doc():
    parser = build_parser("opd")
    actions = {a.dest: a for a in parser._actions}
    for section, cls in _sections().items():
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            action = actions.get(f"{section}.{f.name}")
            assert action is not None, f"--{section}.{f.name} is not on the command line"
            assert f"--{section}.{f.name}" in action.option_strings
            assert docs[f.name] and action.help.startswith(docs[f.name]), (
                f"{section}.{f.name}: help lacks its doc"
            )
    text = parser.format_help()
    assert "--parallel.tensor_model_parallel_size" in text and "--tensor-model-parallel-size" in text
    # a name shared by two sections gets no ambiguous alias
    assert "--temperature " not in text and "--rollout.temperature" in text and "--eval.temperature" in text


def test_section_constructors_validate_directly():
    with pytest.raises(ConfigError, match="segment_end"):
        HorizonConfig(segment_start=0.5, segment_end=0.2)


def test_yaml_env_vars_expand_or_fail_clearly(tmp_path, monkeypatch):
    f = tmp_path / "env.yaml"
    f.write_text("model:\n  hf_path: ${OPD_TEST_MODELS}/student\n")
    monkeypatch.setenv("OPD_TEST_MODELS", "/models")
    assert parse_config(["--config", str(f)]).model.hf_path == "/models/student"
    monkeypatch.delenv("OPD_TEST_MODELS")
    with pytest.raises(ConfigError, match=r"'model.hf_path' .* uses \$\{OPD_TEST_MODELS\}, which is not set"):
        parse_config(["--config", str(f)])


def test_shipped_paper_configs_load(monkeypatch):
    import glob
    import os

    for var in ("MODELS_DIR", "DATA_DIR", "RUN_DIR"):
        monkeypatch.setenv(var, "/x")
    root = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "configs")
    # Every run config of the two pairs (the base and pair files are included by them, not runs themselves).
    files = sorted(
        path
        for path in glob.glob(os.path.join(root, "paper", "*.yaml"))
        if not os.path.basename(path).startswith("base_") and not path.endswith("_pair.yaml")
    )
    seen = set()
    for path in files:
        cfg = parse_config(["--config", path])
        assert cfg.optimizer.lr == 1e-6 and cfg.train.global_batch_size == 64 and cfg.teacher.topk == 16
        # one estimator, the paper's Eq. 6/10/12 (docs/cpu_schedules.md): the top-K KL term is an option only
        assert (cfg.loss.gamma, cfg.loss.pg_coef, cfg.loss.topk_kl_coef) == (0.0, 1.0, 0.0)
        rho = cfg.horizon.rho if cfg.horizon.schedule == "truncated" else None
        seen.add((os.path.basename(path).split("_")[0], cfg.horizon.schedule, rho))
    # Table 1's grid: OPD, POPD and TOPD at rho = 0.5, 0.25, 0.1 for both student-teacher pairs, each exactly once.
    grid = [
        ("full", None),
        ("progressive", None),
        ("truncated", 0.5),
        ("truncated", 0.25),
        ("truncated", 0.1),
    ]
    assert seen == {(pair, *run) for pair in ("r1", "openmath") for run in grid}
    assert len(files) == len(seen)


@pytest.mark.parametrize(
    "argv, key, value",
    [
        (["--optimizer.lr", "-1e-4"], "optimizer.lr", -1e-4),  # argparse alone reads -1e-4 as an option
        (["--lr", "-1E+2"], "optimizer.lr", -100.0),
        (["--optimizer.weight_decay", "-.5"], "optimizer.weight_decay", -0.5),
        (["--optimizer.lr", "-inf"], "optimizer.lr", float("-inf")),
    ],
)
def test_a_negative_number_on_the_command_line_is_a_value(argv, key, value):
    # The value reaches validation, which rejects it with the key's own message (not a usage screen).
    with pytest.raises(ConfigError, match=rf"config key '{key}': got {value!r}; allowed: a number in"):
        parse_config(argv)
    assert parse_config(["--train.seed", "-3"]).train.seed == -3
    with pytest.raises(ConfigError, match="unknown command-line argument '-x'"):
        parse_config(["-x"])  # a lone dash-word is still an unknown option, not a number


@pytest.mark.parametrize(
    "argv, needle",
    [
        (
            ["--teacher.backend", "megatron"],
            "'teacher.backend': got 'megatron'; allowed: teacher.hf_path set",
        ),
        (["--loss.full_kl_coef", "0.5"], "'loss.full_kl_coef': got 0.5; allowed: 0 unless teacher.backend"),
        (["--loss.full_kl_coef", "-1"], "'loss.full_kl_coef'"),
        (["--teacher.offload", "true"], "'teacher.offload': got True; allowed: teacher.backend 'megatron'"),
        (
            [
                "--teacher.backend",
                "megatron",
                "--teacher.hf_path",
                "t",
                "--teacher.sglang_urls",
                "http://a:1",
            ],
            "no URLs with teacher.backend 'megatron'",
        ),
    ],
)
def test_megatron_teacher_options_are_checked(argv, needle):
    with pytest.raises(ConfigError) as e:
        parse_config(argv)
    assert needle in str(e.value)


def test_megatron_teacher_with_full_kl_only_is_a_valid_loss():
    cfg = parse_config(
        [
            "--teacher.backend",
            "megatron",
            "--teacher.hf_path",
            "t",
            "--loss.pg_coef",
            "0",
            "--loss.full_kl_coef",
            "1",
        ]
    )
    assert cfg.teacher.backend == "megatron" and cfg.loss.full_kl_coef == 1.0


def test_fp8_lm_head_is_accepted_with_every_fused_loss_path():
    for impl in ("auto", "chunked", "triton"):
        assert parse_config(["--loss.fp8_lm_head", "true", "--loss.impl", impl]).loss.fp8_lm_head


def test_data_parallel_engines_need_the_embedded_engine_and_an_even_prompt_split() -> None:
    with pytest.raises(ConfigError, match="rollout.engine_ranks"):
        parse_config(["--rollout.backend", "sglang", "--rollout.sglang_urls", "http://127.0.0.1:1",
                      "--rollout.engine_ranks", "data_parallel"])  # fmt: skip
    cfg = parse_config(["--rollout.engine_ranks", "data_parallel", "--global-batch-size", "3",
                        "--n-samples-per-prompt", "2", "--micro-batch-size", "1"])  # fmt: skip
    with pytest.raises(ConfigError, match="multiple of 2"):
        cfg.check_world_size(2)
    assert cfg.check_world_size(3) == 3  # 3 prompts over 3 ranks: one each
