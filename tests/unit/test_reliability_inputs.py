"""Bad input refused with what, where and how to fix (issue 9), for the cases not already covered elsewhere
(docs/reliability.md lists those): a checkpoint of another architecture, a teacher whose tokenizer differs from
the student's (both sizes named) while identical tokenizers with padded embeddings are accepted."""

from __future__ import annotations

import json

import pytest

from megatron_opd.config.tree import ModelConfig, ParallelConfig
from megatron_opd.model.builders import build_model_chunks
from megatron_opd.parallel.state import initialize_parallel
from megatron_opd.teacher.vocab import VocabularyMismatchError, check_teacher_student_vocab
from megatron_opd.training import checkpoint as ckpt

# This module may start a one-process group in the pytest process (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("own_process_group")


def _model(hidden: int, layers: int = 1):
    return build_model_chunks(
        ModelConfig(
            vocab_size=64,
            num_layers=layers,
            hidden_size=hidden,
            ffn_hidden_size=64,
            make_vocab_size_divisible_by=64,
        )
    )


def test_checkpoint_of_another_architecture_is_refused_naming_the_tensor(tmp_path):
    initialize_parallel(ParallelConfig(), seed=0)
    ckpt.save_checkpoint(str(tmp_path), 1, _model(32), None, None, {})
    with pytest.raises(ckpt.CheckpointError, match=r"another architecture .*checkpoint \(.*32.*\), this model "
                       r"\(.*48.*\).*load a checkpoint of this model"):  # fmt: skip
        ckpt.load_checkpoint(str(tmp_path), _model(48), None, None)
    with pytest.raises(ckpt.CheckpointError, match=r"another architecture"):  # a deeper model: a layer more
        ckpt.load_checkpoint(str(tmp_path), _model(32, layers=2), None, None)
    assert ckpt.load_checkpoint(str(tmp_path), _model(32), None, None)["iteration"] == 1  # the same one loads


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    from megatron_opd.rollout.tiny_model import make_tiny_hf_model

    d = tmp_path_factory.mktemp("vocab")
    student = make_tiny_hf_model(str(d / "student"), vocab_size=128, seed=0)
    other = make_tiny_hf_model(str(d / "other"), vocab_size=160, seed=1)
    padded = make_tiny_hf_model(str(d / "padded"), vocab_size=128, seed=2)  # same tokenizer, more rows
    cfg = json.loads((d / "padded" / "config.json").read_text())
    (d / "padded" / "config.json").write_text(json.dumps({**cfg, "vocab_size": 192}))
    return student, other, padded


def test_teacher_with_another_tokenizer_is_refused_with_both_sizes(tokenizers):
    student, other, padded = tokenizers
    with pytest.raises(VocabularyMismatchError, match=r"teacher tokenizer \(.*other: 160 tokens, 160 embedding rows\) "
                       r"differs from the student's \(.*student: 128 tokens, 128 embedding rows\)"):  # fmt: skip
        check_teacher_student_vocab(student, other)


def test_identical_tokenizers_with_padded_embeddings_are_accepted(tokenizers):
    student, _, padded = tokenizers
    check_teacher_student_vocab(student, padded)  # accepted: ids mean the same on both sides
    with pytest.raises(VocabularyMismatchError, match="192 embedding rows, the student 128"):
        check_teacher_student_vocab(student, padded, allow_padding_mismatch=False)
