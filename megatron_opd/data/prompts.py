"""Prompt datasets: rows -> validated (prompt token ids, ground-truth answer) examples.

Why it exists: the trainer and the evaluator need prompts as token ids, formatted the way the model was
trained to read them (its chat template) and checked once, up front, with errors that point at the row.
Two layouts are read through configurable (dotted) keys:
- DAPO-Math-17K: ``prompt`` is a list of chat messages ``[{"role": "user", "content": ...}]`` and the answer
  sits in ``reward_model.ground_truth``;
- plain: ``{"prompt" or "problem": str, "answer": str}``.
Prompts longer than ``max_prompt_length`` tokens are counted and skipped, or refused (``over_long_prompts``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from megatron_opd.config.tree import RolloutConfig, TrainConfig
from megatron_opd.data.rows import DataError, get_field, iter_rows

logger = logging.getLogger(__name__)

Prompt = str | list[dict[str, str]]
"""A prompt as stored: plain text, or chat messages ``[{"role": ..., "content": ...}, ...]``."""


@dataclass(frozen=True)
class PromptExample:
    """One usable prompt: ``index`` is its position in the dataset, ``row`` its row in the source file."""

    index: int
    row: int
    prompt_ids: list[int]
    answer: str
    prompt_text: str


@dataclass
class PromptDataset:
    """The examples of one file, plus what was left out and why (for the run's log)."""

    path: str
    examples: list[PromptExample]
    num_rows: int
    num_too_long: int = 0
    too_long_rows: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> PromptExample:
        return self.examples[i]


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def validate_prompt(value: Any) -> Prompt:
    """Return ``value`` if it is a non-empty string or a non-empty list of chat messages; raise ``ValueError``."""
    if isinstance(value, str):
        if not value.strip():
            raise ValueError("the prompt is empty")
        return value
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError("the prompt is an empty message list")
        for i, msg in enumerate(value):
            if (
                not isinstance(msg, dict)
                or not isinstance(msg.get("role"), str)
                or not isinstance(msg.get("content"), str)
            ):
                raise ValueError(
                    f"message {i} of the prompt is not a {{'role': str, 'content': str}} object: {msg!r:.80}"
                )
        if not any(m["content"].strip() for m in value):
            raise ValueError("every message of the prompt is empty")
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise ValueError(f"the prompt must be a string or a list of chat messages, got {type(value).__name__}")


def validate_answer(value: Any) -> str:
    """Return the ground truth as a string (numbers are accepted and converted); raise ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"the answer must be a string or a number, got {type(value).__name__}")
    text = str(value)
    if not text.strip():
        raise ValueError("the answer is empty")
    return text


def render_prompt(prompt: Prompt, tokenizer: Any, *, apply_chat_template: bool = True) -> tuple[str, bool]:
    """The prompt as the text the model reads, and whether a chat template produced it.

    With a chat template (and ``apply_chat_template``) a string becomes one user message and the template adds
    the generation prompt. Without one, a string is used as is and messages are joined by newlines.
    """
    if apply_chat_template and has_chat_template(tokenizer):
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text, True
    if isinstance(prompt, str):
        return prompt, False
    return "\n".join(m["content"] for m in prompt), False


def encode_prompts(
    prompts: Sequence[Prompt], tokenizer: Any, *, apply_chat_template: bool = True
) -> tuple[list[str], list[list[int]]]:
    """Render and tokenize prompts: returns (texts, token id lists).

    A template-rendered text already holds the model's special tokens (BOS ...), so it is tokenized without
    adding them again; raw text gets the tokenizer's own special tokens, as the model saw in pretraining.
    """
    rendered = [render_prompt(p, tokenizer, apply_chat_template=apply_chat_template) for p in prompts]
    texts = [t for t, _ in rendered]
    ids: list[list[int]] = [[] for _ in texts]
    for templated in (True, False):
        sel = [i for i, (_, tpl) in enumerate(rendered) if tpl == templated]
        if sel:
            enc = tokenizer([texts[i] for i in sel], add_special_tokens=not templated)["input_ids"]
            for i, row_ids in zip(sel, enc):
                ids[i] = list(row_ids)
    return texts, ids


def load_prompt_dataset(
    path: str | os.PathLike[str],
    tokenizer: Any,
    *,
    prompt_key: str = "prompt",
    answer_key: str = "answer",
    apply_chat_template: bool = True,
    max_prompt_length: int | None = None,
    over_long_prompts: Literal["skip", "error"] = "skip",
) -> PromptDataset:
    """Read, validate and tokenize a jsonl/json/parquet prompt dataset.

    ``prompt_key`` falls back to ``problem`` (and back) when the row lacks it, so plain
    ``{"problem", "answer"}`` files need no flag. Raises ``DataError`` naming the file and row for a malformed
    row, or for an over-long prompt when ``over_long_prompts == "error"``.
    """
    path = os.fspath(path)
    fallbacks = {"prompt": "problem", "problem": "prompt"}
    rows: list[int] = []
    prompts: list[Prompt] = []
    answers: list[str] = []
    num_rows = 0
    for row_no, row in iter_rows(path):
        num_rows += 1
        try:
            raw_prompt = get_field(row, prompt_key)
        except KeyError:
            alt = fallbacks.get(prompt_key)
            if alt is None or alt not in row:
                raise DataError(
                    path, row_no, f"missing prompt field '{prompt_key}' (keys: {sorted(row)})"
                ) from None
            raw_prompt = row[alt]
        try:
            raw_answer = get_field(row, answer_key)
        except KeyError:
            raise DataError(
                path, row_no, f"missing answer field '{answer_key}' (keys: {sorted(row)})"
            ) from None
        try:
            prompts.append(validate_prompt(raw_prompt))
            answers.append(validate_answer(raw_answer))
        except ValueError as e:
            raise DataError(path, row_no, str(e)) from None
        rows.append(row_no)
    if num_rows == 0:
        raise DataError(path, None, "the dataset has no rows")

    texts, ids = encode_prompts(prompts, tokenizer, apply_chat_template=apply_chat_template)
    examples: list[PromptExample] = []
    too_long: list[int] = []
    for row_no, text, prompt_ids, answer in zip(rows, texts, ids, answers):
        if max_prompt_length is not None and len(prompt_ids) > max_prompt_length:
            if over_long_prompts == "error":
                raise DataError(
                    path,
                    row_no,
                    f"the prompt is {len(prompt_ids)} tokens, longer than max_prompt_length={max_prompt_length} "
                    "(set rollout.over_long_prompts=skip to skip such rows)",
                )
            too_long.append(row_no)
            continue
        examples.append(PromptExample(len(examples), row_no, prompt_ids, answer, text))
    if too_long:
        logger.warning(
            "%s: skipped %d of %d prompts longer than max_prompt_length=%d tokens (first rows: %s)",
            path,
            len(too_long),
            num_rows,
            max_prompt_length,
            too_long[:5],
        )
    if not examples:
        raise DataError(
            path, None, f"all {num_rows} prompts are longer than max_prompt_length={max_prompt_length}"
        )
    return PromptDataset(path, examples, num_rows, len(too_long), too_long)


def load_train_dataset(train: TrainConfig, rollout: RolloutConfig, tokenizer: Any) -> PromptDataset:
    """``load_prompt_dataset`` with the keys and limits of a run's ``train`` and ``rollout`` sections."""
    if train.data_path is None:
        raise DataError("<train.data_path>", None, "no training dataset given; set train.data_path")
    return load_prompt_dataset(
        train.data_path,
        tokenizer,
        prompt_key=train.prompt_key,
        answer_key=train.answer_key,
        apply_chat_template=train.apply_chat_template,
        max_prompt_length=rollout.max_prompt_length,
        over_long_prompts=rollout.over_long_prompts,
    )
