"""Evaluate any checkpoint, Hugging Face or Megatron, on the configured sets: the ``tools/eval.py`` entry.

Why it exists: a distillation run is judged by the student's accuracy, and users evaluate checkpoints outside
the training loop too (the initial student, a teacher, a mid-run ``iter_*`` checkpoint). A Megatron checkpoint is
first exported to HF with the conversion driver (any TP/PP layout it was saved at), then generation runs on the
rollout engine of ``rollout.backend``: in process (``embedded``), or on SGLang servers that already serve it.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from typing import Any

import torch

from megatron_opd.config import EvalConfig, RolloutConfig
from megatron_opd.data.tokenizer import load_tokenizer
from megatron_opd.eval.evaluator import EvalResult, evaluate_sets


def evaluate_checkpoint(
    eval_cfg: EvalConfig,
    rollout_cfg: RolloutConfig,
    *,
    hf_dir: str | None = None,
    megatron_ckpt: str | None = None,
    hf_config_dir: str | None = None,
    seed: int = 0,
    apply_chat_template: bool = True,
    progress: Callable[[str, float], None] | None = None,
) -> dict[str, EvalResult]:
    """Score ``hf_dir`` (or ``megatron_ckpt`` exported with the config/tokenizer of ``hf_config_dir``);
    ``progress(set name, seconds)`` is called as each set finishes."""
    if (hf_dir is None) == (megatron_ckpt is None):
        raise ValueError("give exactly one of an HF directory or a Megatron checkpoint directory")
    if megatron_ckpt is not None:
        from megatron_opd.model.hf_conversion.driver import megatron_to_hf

        ckpt = (
            os.path.join(megatron_ckpt, "dist")
            if os.path.isdir(os.path.join(megatron_ckpt, "dist"))
            else megatron_ckpt
        )
        with tempfile.TemporaryDirectory(prefix="opd-eval-") as tmp:
            out = os.path.join(tmp, "hf")
            megatron_to_hf(ckpt, out, hf_config_dir=hf_config_dir, dtype="float32")
            return evaluate_checkpoint(
                eval_cfg,
                rollout_cfg,
                hf_dir=out,
                seed=seed,
                apply_chat_template=apply_chat_template,
                progress=progress,
            )
    engine = _engine(rollout_cfg, hf_dir)
    return evaluate_sets(
        eval_cfg,
        engine.generate,
        load_tokenizer(hf_dir),
        max_response_length=rollout_cfg.max_response_length,
        seed=seed,
        apply_chat_template=apply_chat_template,
        progress=progress,
    )


def _engine(rollout_cfg: RolloutConfig, hf_dir: str) -> Any:
    if rollout_cfg.backend == "embedded":
        from megatron_opd.rollout.embedded import EmbeddedEngine

        return EmbeddedEngine.from_hf_dir(hf_dir, dtype=torch.float32)
    from megatron_opd.rollout.sglang_client import SGLangClient
    from megatron_opd.rollout.sglang_engine import SGLangEngine

    client = SGLangClient(
        rollout_cfg.sglang_urls,
        max_concurrency=rollout_cfg.max_concurrency,
        timeout_s=rollout_cfg.request_timeout_s,
        max_retries=rollout_cfg.max_retries,
    )
    if not client.health():
        from megatron_opd.rollout.types import RolloutError

        raise RolloutError(
            f"SGLang servers {rollout_cfg.sglang_urls} are not healthy; start them serving {hf_dir}"
        )
    return SGLangEngine(client)
