"""Expected errors become one line on rank 0 with exit code 2; anything else keeps its traceback (issue 16 item 6)."""

from __future__ import annotations

import pytest

from megatron_opd.config import ConfigError
from megatron_opd.data.rows import DataError
from megatron_opd.model.hf_conversion.architecture import ConversionError
from megatron_opd.rollout.types import RolloutError
from megatron_opd.teacher.vocab import VocabularyMismatchError
from megatron_opd.training.checkpoint import CheckpointError
from megatron_opd.training.run import NonFiniteError
from megatron_opd.utils.errors import (
    MissingFileError,
    OPDError,
    expected_errors,
    expected_errors_exit,
    one_line,
)


def test_the_expected_error_types_share_one_base_and_keep_their_old_bases():
    for cls, old in (
        (ConfigError, ValueError),
        (DataError, ValueError),
        (RolloutError, RuntimeError),
        (VocabularyMismatchError, ValueError),
        (ConversionError, ValueError),
        (NonFiniteError, RuntimeError),
        (MissingFileError, FileNotFoundError),
        (CheckpointError, RuntimeError),
    ):
        assert issubclass(cls, OPDError) and issubclass(cls, old), cls
    assert issubclass(CheckpointError, expected_errors())
    assert not any(issubclass(KeyError, t) or issubclass(RuntimeError, t) for t in expected_errors())


@pytest.mark.parametrize("rank, printed", [("0", True), ("1", False)])
def test_an_expected_error_is_one_line_on_rank_0_and_exit_code_2(monkeypatch, capsys, rank, printed):
    monkeypatch.setenv("RANK", rank)
    with pytest.raises(SystemExit) as e, expected_errors_exit():
        raise DataError("data.jsonl", 3, "missing field 'prompt'\n  add it or drop the row")
    assert e.value.code == 2
    err = capsys.readouterr().err
    if printed:
        assert err == "error: data.jsonl, row 3: missing field 'prompt' | add it or drop the row\n"
    else:
        assert err == ""  # the other ranks exit silently


def test_an_unexpected_error_keeps_its_traceback(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(KeyError), expected_errors_exit():
        raise KeyError("a bug")
    assert capsys.readouterr().err == ""
    assert one_line(ValueError("")) == "ValueError"
