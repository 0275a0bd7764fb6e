"""Refuse a teacher whose vocabulary differs from the student's, except for embedding padding.

Why it exists: OPD compares log p_teacher(y_t) with log p_student(y_t) for the *same token id*. If the two
tokenizers map ids to different strings, every log-ratio is meaningless, silently. The one benign difference is
the embedding's row count (Qwen checkpoints pad 151,665 tokens to 151,936 rows): identical tokenizers with
different padding are accepted, since sampling and scoring are restricted to the tokenizer's ids.
"""

from __future__ import annotations

import json
import os
from typing import Any

from megatron_opd.utils.errors import OPDError


class VocabularyMismatchError(OPDError, ValueError):
    """Teacher and student cannot be paired: their token ids mean different things."""


def _tokenizer_vocab(path: str) -> dict[str, int]:
    from megatron_opd.data.tokenizer import load_tokenizer

    return dict(load_tokenizer(path).get_vocab())


def _embedding_rows(path: str) -> int | None:
    cfg_file = os.path.join(path, "config.json")
    if not os.path.exists(cfg_file):
        return None
    with open(cfg_file, encoding="utf-8") as f:
        cfg: dict[str, Any] = json.load(f)
    return cfg.get("vocab_size")


def check_teacher_student_vocab(
    student_path: str, teacher_path: str, allow_padding_mismatch: bool = True
) -> None:
    """Raise ``VocabularyMismatchError`` naming both sizes unless the tokenizers are identical.

    With identical tokenizers, differing embedding row counts are allowed when ``allow_padding_mismatch``.
    """
    s_vocab, t_vocab = _tokenizer_vocab(student_path), _tokenizer_vocab(teacher_path)
    s_rows, t_rows = _embedding_rows(student_path), _embedding_rows(teacher_path)
    if s_vocab != t_vocab:
        differing = sorted(set(s_vocab.items()) ^ set(t_vocab.items()))[:5]
        raise VocabularyMismatchError(
            f"teacher tokenizer ({teacher_path}: {len(t_vocab)} tokens, {t_rows} embedding rows) differs from the "
            f"student's ({student_path}: {len(s_vocab)} tokens, {s_rows} embedding rows); e.g. {differing}. "
            "OPD needs the same tokenizer on both sides: pick a teacher of the same model family"
        )
    if s_rows != t_rows and not allow_padding_mismatch:
        raise VocabularyMismatchError(
            f"teacher has {t_rows} embedding rows, the student {s_rows} (same tokenizer of {len(s_vocab)} tokens); "
            "set teacher.allow_vocab_padding_mismatch=true to accept padded embeddings"
        )
