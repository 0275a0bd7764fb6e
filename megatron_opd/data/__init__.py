"""Prompt datasets (jsonl/parquet rows -> token ids + answers) and the resumable prompt sampler."""

from megatron_opd.data.prompts import (
    PromptDataset,
    PromptExample,
    encode_prompts,
    load_prompt_dataset,
    load_train_dataset,
    render_prompt,
)
from megatron_opd.data.rows import DataError, get_field, iter_rows
from megatron_opd.data.sampler import PromptBatch, PromptSampler, shard

__all__ = [
    "DataError",
    "PromptBatch",
    "PromptDataset",
    "PromptExample",
    "PromptSampler",
    "encode_prompts",
    "get_field",
    "iter_rows",
    "load_prompt_dataset",
    "load_train_dataset",
    "render_prompt",
    "shard",
]
