"""Build the configured teacher scorer (``teacher.backend``) and check its servers at start-up.

Why it exists: the loop scores through the ``TeacherScorer`` interface only, so where the teacher runs is a config
switch; this factory checks at start-up that the backend can serve the configured top-K strategy (SGLang servers
are probed and their served model compared with ``teacher.hf_path``), so a run never fails on it mid-way. It lives
in ``teacher/`` and builds on the rollout layer (SGLang client, served-model check), which never imports back.
"""

from __future__ import annotations

import torch

from megatron_opd.config.tree import TeacherConfig
from megatron_opd.rollout.engine import check_served_model, sglang_client
from megatron_opd.teacher.scorer import TeacherScorer

__all__ = ["build_teacher_scorer"]


def build_teacher_scorer(
    cfg: TeacherConfig,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    max_concurrency: int = 64,
    request_timeout_s: float = 600.0,
    max_retries: int = 3,
) -> TeacherScorer:
    """The teacher of ``cfg.backend`` (embedded: on ``device`` in ``dtype``); sglang servers are probed now for
    ``cfg.topk`` / ``cfg.topk_strategy``.

    Backend 'megatron' is not built here: it is sharded over every rank of the trainer and needs the student's
    layout (``MegatronTeacher.build``, called by the run's set-up).
    """
    if cfg.backend == "megatron":
        raise ValueError(
            "teacher.backend 'megatron' lives inside the trainer on every rank: build it with "
            "megatron_opd.teacher.megatron.MegatronTeacher.build after initialize_parallel, not as a scorer"
        )
    if cfg.backend == "embedded":
        from megatron_opd.teacher.embedded import EmbeddedScorer

        if cfg.hf_path is None:
            raise ValueError("teacher.backend='embedded' needs teacher.hf_path")
        return EmbeddedScorer.from_hf_dir(cfg.hf_path, dtype=dtype, device=device)
    from megatron_opd.teacher.sglang_scorer import SGLangScorer

    scorer = SGLangScorer(
        sglang_client(cfg.sglang_urls, max_concurrency, request_timeout_s, max_retries, "teacher")
    )
    if cfg.hf_path:
        check_served_model(scorer.client, cfg.hf_path, "teacher")
    scorer.probe(cfg.topk, cfg.topk_strategy)
    return scorer
