"""The teacher as a forward-only Megatron model inside the trainer (``teacher.backend: megatron``).

Why it exists: the paper's default loss (top-16 reverse KL over the student's own top-K ids) needs the teacher's
logprobs at ids only known once the student's logits are; through SGLang that is hundreds of prefill requests per
sample (issue 13's measurements). Here the teacher is built from its HF directory with the student's builders and
TP/PP layout, runs Megatron's forward-only schedule over the step's micro-batches, and keeps on the last pipeline
stage only its final hidden states at the distilled positions, [N, H_t] per micro-batch. The student's loss then
meets them with both LM heads in ``loss/two_model.py``: log p_T(y) (the advantage's r_t), any top-K set, and the
exact full-vocabulary reverse KL, with no request, no JSON and no [N, V] logits.

Memory, per GPU: the teacher's weights only (no gradients, no optimizer state, no DDP buffers), divided like the
student's by TP x PP. A model of P parameters in bf16 costs 2P bytes; the student being trained costs 18P (bf16
weights 2P, the DDP's fp32 gradient buffer 4P, Adam's fp32 master copy and two moments 12P; the distributed
optimizer divides the last 12P by DP). For Qwen2-1.5B shapes (1.54e9 parameters, tied head) as teacher and
student: teacher 3.1 GB, student 27.8 GB, so the teacher adds 1/9 of the student's weight-and-state memory
(1/8 if one counts Adam's 16 bytes per parameter without the bf16 copy). Its activations exist only during its
forward pass, one micro-batch at a time, before the student's; what it keeps is [N, H_t] hidden rows per
micro-batch (N distilled tokens). ``teacher.offload`` keeps its weights in host memory between steps (copied in
for the forward pass, out after the step).

Outside the step (analysis tools, tests), ``MegatronTeacher.score`` fills the same ``TeacherScores`` as the other
backends; unlike them it is COLLECTIVE: every rank of the job calls it with the same arguments.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state as mpu
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region
from megatron.core.utils import get_attr_wrapped_model

from megatron_opd.config.tree import ModelConfig, TeacherConfig
from megatron_opd.loss.two_model import model_scores
from megatron_opd.model.builders import (
    build_model_chunks,
    hidden_states_only,
    lm_head_weight,
    model_config_from_hf,
    padded_vocab_size,
)
from megatron_opd.model.hf_conversion.live import load_hf_weights, unwrap
from megatron_opd.model.shared_prompts import SharedPromptLayout, model_forward
from megatron_opd.teacher.scorer import TeacherScores, TopKStrategy, check_score_request

__all__ = ["MegatronTeacher", "weight_bytes"]


def weight_bytes(chunks: Sequence[torch.nn.Module]) -> int:
    """Bytes of this rank's parameters (the teacher's whole memory between steps, without offload)."""
    return sum(p.numel() * p.element_size() for c in chunks for p in c.parameters())


@dataclass
class _Positions:
    """What the teacher's forward needs of a micro-batch (the student step's ``_MicroBatch`` has these too)."""

    tokens: torch.Tensor  # [b, L]
    position_ids: torch.Tensor  # [b, L]
    out_rows: torch.Tensor  # [N] row of each scored token
    out_pos: torch.Tensor  # [N] position whose hidden state predicts it
    shared: SharedPromptLayout | None = None  # packed rows (``model.shared_prompts``); never set by ``score``


class MegatronTeacher:
    """This rank's forward-only teacher chunks (the student's TP/PP/VPP layout) and what they need to be run.

    Args:
        chunks: the bare ``GPTModel`` chunks (no DDP), weights loaded, ``requires_grad`` False.
        model_cfg: the teacher's architecture.
        vocab_size: the real vocabulary (the tokenizer's); LM-head rows past it are padding, never scored.
        topk, strategy: the top-K set of the loss (``teacher.topk`` when the loss uses it, else 0).
        offload: keep the weights in host memory between steps (CUDA only).
    """

    def __init__(
        self,
        chunks: list[torch.nn.Module],
        model_cfg: ModelConfig,
        *,
        vocab_size: int,
        topk: int = 0,
        strategy: TopKStrategy = "student",
        offload: bool = False,
    ) -> None:
        self.chunks = chunks
        self.model_cfg = model_cfg
        self.vocab_size = vocab_size
        self.topk = topk
        self.strategy = strategy
        self.offload = offload and torch.cuda.is_available()
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
        self.tp_group = mpu.get_tensor_model_parallel_group()
        self.tp_rank = mpu.get_tensor_model_parallel_rank()
        for c in chunks:
            c.eval()
            for p in c.parameters():
                p.requires_grad_(False)
        if self.offload:
            self.to_host()

    @classmethod
    def build(
        cls,
        cfg: TeacherConfig,
        student: ModelConfig,
        *,
        vocab_size: int,
        topk: int = 0,
        sequence_parallel: bool = False,
    ) -> MegatronTeacher:
        """Build the teacher from ``cfg.hf_path`` with the student's run settings (needs ``initialize_parallel``).

        bf16 (the student's params_dtype) on GPU, fp32 on CPU. Raises when the two embeddings would be padded to
        different row counts: the fused loss pairs the two LM heads' vocabulary shards row by row.
        """
        if cfg.hf_path is None:
            raise ValueError("teacher.backend 'megatron' needs teacher.hf_path")
        model_cfg = model_config_from_hf(
            cfg.hf_path,
            params_dtype=student.params_dtype if torch.cuda.is_available() else "float32",
            transformer_impl=student.transformer_impl,
            local_attention=student.local_attention,
            make_vocab_size_divisible_by=student.make_vocab_size_divisible_by,
        )
        tp = mpu.get_tensor_model_parallel_world_size()
        rows_t = padded_vocab_size(model_cfg.vocab_size, model_cfg.make_vocab_size_divisible_by, tp)
        rows_s = padded_vocab_size(student.vocab_size, student.make_vocab_size_divisible_by, tp)
        if rows_t != rows_s:
            raise ValueError(
                f"teacher {cfg.hf_path} pads its vocabulary ({model_cfg.vocab_size}) to {rows_t} rows, the student "
                f"({student.vocab_size}) to {rows_s}: teacher.backend 'megatron' needs both LM heads split into the "
                "same TP shards; change model.make_vocab_size_divisible_by so both round to the same size, or use "
                "teacher.backend 'embedded' or 'sglang'"
            )
        chunks = build_model_chunks(model_cfg, sequence_parallel=sequence_parallel)
        load_hf_weights(chunks, cfg.hf_path, model_cfg, tp_group=mpu.get_tensor_model_parallel_group())
        return cls(
            chunks,
            model_cfg,
            vocab_size=vocab_size,
            topk=topk,
            strategy=cfg.topk_strategy,
            offload=cfg.offload,
        )

    # ------------------------------------------------------------------------------------------------
    # weights
    # ------------------------------------------------------------------------------------------------
    def to_host(self) -> None:
        """Offload: weights to (pinned) host memory."""
        for c in self.chunks:
            for p in c.parameters():
                p.data = p.data.to("cpu", non_blocking=True).pin_memory()

    def to_device(self) -> None:
        """Offload: weights back to this rank's GPU for a forward pass."""
        for c in self.chunks:
            for p in c.parameters():
                p.data = p.data.to(self.device, non_blocking=True)

    def lm_head(self) -> tuple[torch.Tensor, int]:
        """(this rank's LM-head shard [V_padded / TP, H_t], its first global id) on the last pipeline stage.

        Rows of id >= ``vocab_size`` are padding (a rank may hold only padding)."""
        weight = lm_head_weight(unwrap(self.chunks[-1]))
        return weight, self.tp_rank * weight.shape[0]

    # ------------------------------------------------------------------------------------------------
    # the forward pass
    # ------------------------------------------------------------------------------------------------
    def _forward_step(self, keep: list[torch.Tensor], data_iterator, model: torch.nn.Module):
        mb = next(data_iterator)
        core = get_attr_wrapped_model(model, "post_process", return_model_obj=True)
        if not core.post_process:
            return model_forward(model, core, mb.tokens, mb.position_ids, mb.shared), _no_loss
        with hidden_states_only(core):
            hidden = model_forward(model, core, mb.tokens, mb.position_ids, mb.shared)

        def select(h: torch.Tensor):
            if core.config.sequence_parallel:
                h = gather_from_sequence_parallel_region(h, tensor_parallel_output_grad=False)
            keep.append(h.transpose(0, 1)[mb.out_rows, mb.out_pos].detach().clone())
            return torch.zeros((), device=h.device), {}

        return hidden, select

    @torch.no_grad()
    def hidden_rows(self, micro: Sequence[Any]) -> list[torch.Tensor] | None:
        """The teacher's final hidden states at each micro-batch's scored positions: [N_i, H_t] per micro-batch on
        the last pipeline stage, None elsewhere. Collective over the model-parallel group (all stages and TP ranks
        call it with the same micro-batches, items with ``tokens``, ``position_ids``, ``out_rows``, ``out_pos`` and
        ``shared``)."""
        if self.offload:
            self.to_device()
        keep: list[torch.Tensor] = []
        iters: Any = [iter(micro) for _ in self.chunks] if len(self.chunks) > 1 else iter(micro)
        get_forward_backward_func()(
            forward_step_func=partial(self._forward_step, keep),
            data_iterator=iters,
            model=self.chunks if len(self.chunks) > 1 else self.chunks[0],
            num_microbatches=len(micro),
            seq_length=max(m.tokens.shape[1] for m in micro),
            micro_batch_size=micro[0].tokens.shape[0],
            forward_only=True,
        )
        return keep if mpu.is_pipeline_last_stage() else None

    def release(self) -> None:
        """End of a step: offload the weights (when configured)."""
        if self.offload:
            self.to_host()

    # ------------------------------------------------------------------------------------------------
    # TeacherScores for callers outside the training step
    # ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def score(
        self,
        prompt_ids: list[list[int]],
        response_ids: list[list[int]] | list[torch.Tensor],
        *,
        topk: int = 0,
        strategy: TopKStrategy = "student",
        student_topk_ids: list[list[list[int]]] | list[torch.Tensor] | None = None,
        micro_batch_size: int = 8,
        logits_block: int = 1024,
    ) -> TeacherScores:
        """``TeacherScorer.score``, COLLECTIVE (module doc); every rank returns the same ``TeacherScores``.

        The kept hidden rows are scored ``logits_block`` positions at a time over vocabulary tiles
        (``two_model.model_scores``, checked against ``loss/reference.py``).
        """
        check_score_request(prompt_ids, response_ids, topk, strategy, student_topk_ids)
        dev = self.device or torch.device("cpu")
        sp = unwrap(self.chunks[0]).config.sequence_parallel
        multiple = mpu.get_tensor_model_parallel_world_size() if sp else 1
        micro, spans = [], []
        for s in range(0, len(prompt_ids), micro_batch_size):
            idx = list(range(s, min(s + micro_batch_size, len(prompt_ids))))
            micro.append(
                _positions([prompt_ids[i] for i in idx], [response_ids[i] for i in idx], dev, multiple)
            )
            spans.append(idx)
        rows = self.hidden_rows(micro) if micro else []
        payload: list[Any] = [None]
        if mpu.is_pipeline_last_stage():
            weight, vocab_start = self.lm_head()
            out = []
            for idx, h in zip(spans, rows or []):
                targets = torch.cat([torch.as_tensor(response_ids[i], dtype=torch.long) for i in idx]).to(dev)
                given = None
                if topk > 0 and strategy == "student":
                    given = torch.cat([torch.as_tensor(student_topk_ids[i]).view(-1, topk) for i in idx]).to(
                        dev
                    )
                out.append(
                    self._score_rows(h, weight, vocab_start, targets, topk, strategy, given, logits_block)
                )
            payload[0] = out
        pp = mpu.get_pipeline_model_parallel_group()
        if dist.get_world_size(pp) > 1:
            dist.broadcast_object_list(payload, src=mpu.get_pipeline_model_parallel_last_rank(), group=pp)
        if self.offload:
            self.to_host()
        lps, tk_ids, tk_lps = [], [] if topk else None, [] if topk else None
        for (lp, ids, tlp), idx in zip(payload[0], spans):
            # per-sample CPU tensors owning their storage (TeacherScores); split returns views of the micro-batch
            sizes = [len(response_ids[i]) for i in idx]
            lps += [t.clone() for t in lp.split(sizes)]
            if topk:
                tk_ids += [t.clone() for t in ids.split(sizes)]
                tk_lps += [t.clone() for t in tlp.split(sizes)]
        return TeacherScores(logprobs=lps, topk_ids=tk_ids, topk_logprobs=tk_lps)

    def _score_rows(self, h, weight, vocab_start, targets, topk, strategy, given, block):
        """(token logprobs float32 [N], top-K ids int64 [N, K], their logprobs float32 [N, K]) of the rows
        ``h`` [N, hidden], on the CPU (K = 0: the top-K parts are empty), over vocabulary tiles
        (``two_model.model_scores``: no [N, V/tp] block)."""
        lp, ids, tlp = model_scores(
            h, weight, targets, ids=given if topk > 0 and strategy == "student" else None,
            topk=topk if strategy == "teacher" else 0, vocab_start=vocab_start, tp_group=self.tp_group,
            chunk_size=block, vocab_size=self.vocab_size,
        )  # fmt: skip
        lp = lp.cpu().to(torch.float32)
        if topk == 0 or ids is None:
            return lp, torch.empty((0, topk), dtype=torch.long), torch.empty((0, topk), dtype=torch.float32)
        return lp, ids.cpu().to(torch.long), tlp.cpu().to(torch.float32)


def _no_loss(output: torch.Tensor):
    return torch.zeros((), device=output.device), {}


def _positions(
    prompts: list[list[int]],
    responses: list[list[int]] | list[torch.Tensor],
    device: torch.device,
    multiple: int = 1,
) -> _Positions:
    """Right-padded tokens of prompt + response (length a multiple of ``multiple``, for sequence parallelism) and
    the (row, position) predicting every response token."""
    seqs = [
        torch.cat([torch.as_tensor(p, dtype=torch.long), torch.as_tensor(r, dtype=torch.long)])
        for p, r in zip(prompts, responses)
    ]
    L = -(-max(len(s) for s in seqs) // multiple) * multiple
    tokens = torch.zeros(len(seqs), L, dtype=torch.long)
    rows, pos = [], []
    for b, (p, s) in enumerate(zip(prompts, seqs)):
        tokens[b, : len(s)] = s
        rows += [b] * (len(s) - len(p))
        pos += list(range(len(p) - 1, len(s) - 1))
    return _Positions(
        tokens=tokens.to(device),
        position_ids=torch.arange(L, device=device).unsqueeze(0).expand(len(seqs), L).contiguous(),
        out_rows=torch.as_tensor(rows, dtype=torch.long, device=device),
        out_pos=torch.as_tensor(pos, dtype=torch.long, device=device),
    )
