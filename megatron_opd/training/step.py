"""One OPD optimizer step of the student on Megatron-core: micro-batches -> loss -> gradients -> update.

Why it exists: this is where the paper's objective meets Megatron's machinery. It runs Megatron's
``get_forward_backward_func`` schedule (no pipelining, 1F1B, or interleaved) over a rank's micro-batches; on
the last pipeline stage it turns the vocab-parallel output into per-token student logprobs and the OPD loss
through ``megatron_opd.loss`` (the reference path on logits by default, or a fused LM-head path through
``loss.adapter.opd_token_terms`` with ``impl=``); Megatron DDP reduces the gradients, the optimizer clips and
steps, the LR scheduler advances.

Normalisation. The loss is the GLOBAL batch's loss: every micro-batch divides its summed token losses by the
global count (tokens or sequences, all-reduced over data-parallel ranks before the forward). Megatron's
schedule divides each micro-batch loss by the number of micro-batches and DDP averages gradients over DP
ranks; the step multiplies by both beforehand, so the gradient is exactly that of the global loss, for any
split into micro-batches and ranks.

Tokens outside the horizon window cost nothing: only the logits rows of distilled tokens enter the loss, and
each micro-batch is cut to the window's end and padded only to its own real length. Vocabulary padding ids
(>= the model's vocabulary) are masked out of the softmax, so logprobs match the unpadded HF model.

A non-finite loss or gradient skips the update on every rank (weights, optimizer state and LR schedule
unchanged) and says so in the result.

Teacher inside the step (``teacher=``, ``teacher.backend: megatron``): before the student's schedule the teacher
runs Megatron's forward-only schedule over the same micro-batches and leaves, on the last stage, its final hidden
states at the distilled positions; the student's loss then takes log p_T(y), the top-K KL (ids chosen inside) and
the optional full-vocabulary KL from both models' hidden states and LM heads (``loss/two_model.py``), so the
batch carries no teacher scores (``OPDBatch.teacher_logprobs`` None).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state as mpu
from megatron.core.optimizer.optimizer import MegatronOptimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region
from megatron.core.utils import get_attr_wrapped_model, get_model_config

from megatron_opd.algorithms.advantage import opd_advantages
from megatron_opd.config.tree import LossConfig
from megatron_opd.loss import reference
from megatron_opd.loss.metrics import position_sums
from megatron_opd.model.builders import hidden_states_only, lm_head_weight
from megatron_opd.model.shared_prompts import (
    SharedPromptLayout,
    check_shared_prompts,
    model_forward,
    pack_shared_prompts,
)
from megatron_opd.teacher.megatron import MegatronTeacher
from megatron_opd.training.batch import OPDBatch

_PAD_LOGIT = -1e30  # finite (not -inf) so entropy-style p * z terms stay 0 instead of NaN


@dataclass
class StepResult:
    """What one step did, identical on every rank.

    ``position_*`` are indexed by absolute response position [0, window.end): the sums and counts that
    ``HorizonSchedule.observe`` takes (signal 'log_ratio' is the sampled-token KL estimate -r_t, so pass
    ``-position_log_ratio_sum``; signal 'kl' is ``position_topk_kl_sum``).
    """

    loss: float
    grad_norm: float
    lr: float
    log_ratio_mean: float
    topk_kl_mean: float
    num_tokens: int
    num_sequences: int
    skipped: bool
    skip_reason: str | None
    position_log_ratio_sum: torch.Tensor
    position_topk_kl_sum: torch.Tensor
    position_count: torch.Tensor
    extra: dict[str, float] = field(default_factory=dict)

    def scalars(self, prefix: str = "train") -> dict[str, float]:
        """Flat scalars for logging."""
        out = {
            f"{prefix}/loss": self.loss,
            f"{prefix}/grad_norm": self.grad_norm,
            f"{prefix}/lr": self.lr,
            f"{prefix}/log_ratio_mean": self.log_ratio_mean,
            f"{prefix}/topk_kl_mean": self.topk_kl_mean,
            f"{prefix}/tokens": float(self.num_tokens),
            f"{prefix}/sequences": float(self.num_sequences),
            f"{prefix}/skipped": float(self.skipped),
        }
        out.update({f"{prefix}/{k}": v for k, v in self.extra.items()})
        return out


@dataclass
class _MicroBatch:
    """A micro-batch prepared for the model and the loss (flat indices of its distilled tokens)."""

    batch: OPDBatch
    tokens: torch.Tensor  # [b, L] (L padded to ``seq_padding_multiple``), or [G, L] packed rows
    position_ids: torch.Tensor  # [b, L] or [G, L]: each token's position in its own sequence
    mask: torch.Tensor  # [b, R] distilled tokens
    rows: torch.Tensor  # [N] sequence index of each distilled token
    cols: torch.Tensor  # [N] response position of each distilled token
    out_rows: torch.Tensor  # [N] row of ``tokens`` whose output predicts it
    out_pos: torch.Tensor  # [N] position in that row
    shared: SharedPromptLayout | None  # the packing of ``tokens`` (``model.shared_prompts``), or None
    targets: torch.Tensor  # [N] its token id
    topk_ids: torch.Tensor | None  # [N, K]
    teacher_topk: torch.Tensor | None  # [N, K]
    teacher_hidden: torch.Tensor | None = None  # [N, H_t] the in-step teacher's rows (last stage), or None


_FP8_TOKEN_MULTIPLE = 8  # TE's FP8 GEMMs need each rank's token count divisible by 8


def seq_padding_multiple(tp_size: int, sequence_parallel: bool, fp8: bool) -> int:
    """The multiple every micro-batch's sequence length L is padded to.

    Sequence parallelism splits L over the TP ranks, so L must divide by TP; Transformer-Engine's FP8 GEMMs need
    the tokens of each rank (b * L, or b * L / TP under sequence parallelism) divisible by 8, which holds for any
    micro-batch size b when each rank's share of L is. Padding goes after the last token: causal attention keeps
    it out of every real position, and no loss term reads it.
    """
    if tp_size < 1:
        raise ValueError(f"tp_size must be >= 1, got {tp_size}")
    split = tp_size if sequence_parallel else 1
    return split * (_FP8_TOKEN_MULTIPLE if fp8 else 1)


def _prepare(
    batch: OPDBatch,
    device: torch.device,
    *,
    whole_response: bool,
    seq_multiple: int,
    share_prompts: bool = False,
) -> _MicroBatch:
    """The micro-batch's model inputs and flat indices of its distilled tokens; with ``share_prompts`` the
    rollouts of one prompt are packed in one row (``model.shared_prompts``) when some prompt repeats."""
    if not whole_response:
        batch = batch.trimmed_to_window()
    mask = batch.response_mask()
    if whole_response:
        R = batch.response_width
        mask = torch.arange(R).unsqueeze(0) < batch.response_lengths.unsqueeze(1)
    logit_pos, targets = batch.response_positions()
    rows, cols = mask.nonzero(as_tuple=True)
    pos = logit_pos[rows, cols]
    packed = None
    if share_prompts:
        lengths = batch.prompt_lengths + batch.response_lengths
        packed = pack_shared_prompts(batch.tokens, batch.prompt_lengths, lengths, multiple=seq_multiple)
    if packed is not None:
        shared = packed.layout.to(device)
        tokens, positions = packed.tokens, shared.positions
        out_rows, out_pos = packed.locate(rows, pos)
    else:
        shared = None
        tokens = batch.tokens
        if tokens.shape[1] % seq_multiple:
            pad = seq_multiple - tokens.shape[1] % seq_multiple
            tokens = torch.nn.functional.pad(tokens, (0, pad))
        B, L = tokens.shape
        positions = torch.arange(L, device=device).unsqueeze(0).expand(B, L).contiguous()
        out_rows, out_pos = rows, pos
    ids = tk = None
    if batch.topk_ids is not None:
        ids, tk = batch.topk_ids[rows, cols].to(device), batch.teacher_topk_logprobs[rows, cols].to(device)
    return _MicroBatch(
        batch=batch,
        tokens=tokens.to(device),
        position_ids=positions,
        mask=mask.to(device),
        rows=rows.to(device),
        cols=cols.to(device),
        out_rows=out_rows.to(device),
        out_pos=out_pos.to(device),
        shared=shared,
        targets=targets[rows, cols].to(device),
        topk_ids=ids,
        teacher_topk=tk,
    )


def _device() -> torch.device:
    return (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )


class TrainStep:
    """Runs one optimizer step (or a forward-only logprob pass) over a rank's micro-batches.

    Args:
        model: this rank's model chunks, wrapped in Megatron DDP (``optimizer.setup_training``).
        optimizer, scheduler: from ``optimizer.setup_training``.
        loss_cfg: the objective (gamma, coefficients, normalisation) and how it is computed: ``impl``
            'reference' (logits from Megatron's output layer, then ``loss.reference``) or a fused LM-head path
            of ``loss.adapter`` ('chunked', 'triton', 'auto'), with its ``chunk_size`` and ``fp8_lm_head``.
        vocab_size: the model's real vocabulary (``ModelConfig.vocab_size``); ids at or above it are padding.
        teacher: the in-step Megatron teacher (module doc), or None when the batches carry teacher scores.
        share_prompts: pack the rollouts of one prompt in one row, the prompt computed once
            (``model.shared_prompts``; ``train.share_prompts``).
    """

    def __init__(
        self,
        model: list[torch.nn.Module],
        optimizer: MegatronOptimizer | None,
        scheduler: OptimizerParamScheduler | None,
        loss_cfg: LossConfig,
        *,
        vocab_size: int,
        teacher: MegatronTeacher | None = None,
        share_prompts: bool = False,
    ) -> None:
        if mpu.get_context_parallel_world_size() > 1:
            raise NotImplementedError("context parallelism is not supported by the OPD step yet (use CP = 1)")
        if share_prompts:
            check_shared_prompts(model, "the student")
            if teacher is not None:
                check_shared_prompts(teacher.chunks, "the teacher")
        self.share_prompts = share_prompts
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.loss_cfg = loss_cfg
        self.vocab_size = vocab_size
        self.teacher = teacher
        self.config = get_model_config(model[0])
        self.device = _device()
        self.tp_group = mpu.get_tensor_model_parallel_group()
        self.tp_rank = mpu.get_tensor_model_parallel_rank()
        self._reset_accumulators(1)

    # ------------------------------------------------------------------------------------------------
    # per-token terms on the last stage
    # ------------------------------------------------------------------------------------------------
    def _vocab_start(self, local_vocab: int) -> int:
        return self.tp_rank * local_vocab

    def _mask_padding(self, rows: torch.Tensor, vocab_start: int) -> torch.Tensor:
        """Padding ids out of the softmax: [N, V/tp] -> fp32 [N, V/tp]."""
        rows = rows.float()
        if vocab_start + rows.shape[-1] <= self.vocab_size:
            return rows
        ids = vocab_start + torch.arange(rows.shape[-1], device=rows.device)
        return rows.masked_fill(ids >= self.vocab_size, _PAD_LOGIT)

    def _terms_from_logits(
        self, mb: _MicroBatch, logits: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """logits [b, L, V/tp] -> (logp [N], top-K KL [N] or None) through the reference path."""
        vocab_start = self._vocab_start(logits.shape[-1])
        rows = self._mask_padding(logits[mb.out_rows, mb.out_pos], vocab_start)
        logp, kl, _ = reference.opd_token_terms_from_logits(
            rows,
            mb.targets,
            topk_ids_given=mb.topk_ids,
            teacher_topk_logprobs=mb.teacher_topk,
            renormalize=self.loss_cfg.topk_renormalize,
            vocab_start=vocab_start,
            tp_group=self.tp_group,
        )
        return logp, kl

    def _terms_from_hidden(
        self, mb: _MicroBatch, core: torch.nn.Module, hidden: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """hidden [S, b, H] -> (logp [N], top-K KL [N] or None) through ``loss.adapter`` (fused LM head)."""
        from megatron_opd.loss.adapter import copy_to_tp_region, opd_token_terms

        weight = lm_head_weight(core)
        if self.config.sequence_parallel:
            hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=True)
            rows = hidden.transpose(0, 1)[mb.out_rows, mb.out_pos]
        else:
            rows = copy_to_tp_region(hidden.transpose(0, 1)[mb.out_rows, mb.out_pos], self.tp_group)
        vocab_start = self._vocab_start(weight.shape[0])
        real = min(max(self.vocab_size - vocab_start, 0), weight.shape[0])
        if real == 0:
            raise NotImplementedError(
                f"TP rank {self.tp_rank} holds only vocabulary padding; the fused LM-head paths need real rows on "
                "every rank (use impl='reference' or a smaller make_vocab_size_divisible_by)"
            )
        weight = weight[:real]  # padding rows never enter the softmax (the fused paths take uneven shards)
        return opd_token_terms(
            rows,
            weight,
            mb.targets,
            topk_ids=mb.topk_ids,
            teacher_topk_logprobs=mb.teacher_topk,
            renormalize=self.loss_cfg.topk_renormalize,
            vocab_start=vocab_start,
            tp_group=self.tp_group,
            impl=self.loss_cfg.impl,
            chunk_size=self.loss_cfg.chunk_size,
            fp8=self.loss_cfg.fp8_lm_head,
        )

    def _two_model_terms(
        self, mb: _MicroBatch, core: torch.nn.Module, hidden: torch.Tensor
    ) -> dict[str, torch.Tensor | None]:
        """hidden [S, b, H_s] and the teacher's rows -> ``loss.two_model`` terms (logp, teacher_logp, top-K and
        full KL, [N] each or None); padding ids (>= the real vocabulary) stay out of every softmax."""
        from megatron_opd.loss.adapter import copy_to_tp_region
        from megatron_opd.loss.two_model import two_model_terms

        if self.config.sequence_parallel:
            hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=True)
            rows = hidden.transpose(0, 1)[mb.out_rows, mb.out_pos]
        else:
            rows = copy_to_tp_region(hidden.transpose(0, 1)[mb.out_rows, mb.out_pos], self.tp_group)
        weight = lm_head_weight(core)
        teacher_weight, vocab_start = self.teacher.lm_head()
        cfg = self.loss_cfg
        return two_model_terms(
            rows,
            weight,
            mb.teacher_hidden,
            teacher_weight,
            mb.targets,
            topk=self.teacher.topk if cfg.topk_kl_coef > 0 else 0,
            strategy=self.teacher.strategy,
            renormalize=cfg.topk_renormalize,
            full_kl=cfg.full_kl_coef > 0,
            vocab_start=vocab_start,
            tp_group=self.tp_group,
            impl=cfg.impl,
            chunk_size=cfg.chunk_size,
            vocab_size=self.vocab_size,
            fp8=cfg.fp8_lm_head,
        )

    # ------------------------------------------------------------------------------------------------
    # the loss and its metrics
    # ------------------------------------------------------------------------------------------------
    def _reset_accumulators(self, positions: int) -> None:
        f64 = dict(dtype=torch.float64, device=self.device)
        # loss, log-ratio sum, KL sum, KL count, tokens, non-finite loss flag, full-KL sum, full-KL count
        self._acc = torch.zeros(8, **f64)
        self._pos = torch.zeros(3, positions, **f64)  # log-ratio sum, KL sum, count
        self._logprobs: list[torch.Tensor] = []

    def _scatter(self, mb: _MicroBatch, values: torch.Tensor) -> torch.Tensor:
        """[N] values of the distilled tokens -> [b, R] (zeros elsewhere), keeping the gradient."""
        out = torch.zeros(mb.mask.shape, dtype=values.dtype, device=values.device)
        return out.index_put((mb.rows, mb.cols), values)

    def _loss(
        self,
        mb: _MicroBatch,
        logp_flat: torch.Tensor,
        kl_flat: torch.Tensor | None,
        teacher_flat: torch.Tensor | None = None,
        full_kl_flat: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The micro-batch's loss from its [N] terms; ``teacher_flat`` (log p_T(y) from the in-step teacher)
        replaces the batch's teacher logprobs, ``full_kl_flat`` is the full-vocabulary KL."""
        cfg = self.loss_cfg
        logp = self._scatter(mb, logp_flat.float())
        if teacher_flat is not None:
            teacher = self._scatter(mb, teacher_flat.detach().float())
        else:
            teacher = mb.batch.teacher_logprobs.to(self.device)
        adv = opd_advantages(teacher, logp.detach(), mb.mask, cfg.gamma)
        kl = None if kl_flat is None else self._scatter(mb, kl_flat.float())
        full = None if full_kl_flat is None else self._scatter(mb, full_kl_flat.float())
        loss = reference.opd_loss(
            logp,
            adv,
            mb.mask,
            topk_kl=kl,
            full_kl=full,
            pg_coef=cfg.pg_coef,
            topk_kl_coef=cfg.topk_kl_coef,
            full_kl_coef=cfg.full_kl_coef,
            normalization=cfg.normalization,
            constant=cfg.normalization_constant,
            num_tokens=self._global_tokens,
            num_sequences=self._global_sequences,
        )
        with torch.no_grad():
            r = (teacher - logp.detach()) * mb.mask
            lr_sum, lr_cnt = position_sums(r, mb.mask)
            n = lr_sum.shape[0]
            self._pos[0, :n] += lr_sum
            self._pos[2, :n] += lr_cnt
            self._acc[1] += r.double().sum()
            self._acc[4] += mb.mask.sum()
            if kl is not None:
                kl_sum, _ = position_sums(kl.detach(), mb.mask)
                self._pos[1, :n] += kl_sum
                self._acc[2] += kl_sum.sum()
                self._acc[3] += mb.mask.sum()
            if full is not None:
                self._acc[6] += (full.detach() * mb.mask).double().sum()
                self._acc[7] += mb.mask.sum()
            self._acc[0] += loss.detach().double()
            self._acc[5] += float(not torch.isfinite(loss.detach()))
        # Megatron divides by the micro-batch count and DDP averages over DP ranks: undo both (module doc).
        scale = self._num_microbatches * mpu.get_data_parallel_world_size()
        return loss * scale, {"loss": loss.detach()}

    def _loss_from_logits(self, mb: _MicroBatch, logits: torch.Tensor):
        return self._loss(mb, *self._terms_from_logits(mb, logits))

    def _loss_from_hidden(self, mb: _MicroBatch, core: torch.nn.Module, hidden: torch.Tensor):
        if mb.teacher_hidden is not None:
            t = self._two_model_terms(mb, core, hidden)
            return self._loss(mb, t["logp"], t["topk_kl"], t["teacher_logp"], t["full_kl"])
        return self._loss(mb, *self._terms_from_hidden(mb, core, hidden))

    def _logprobs_only(self, mb: _MicroBatch, logits: torch.Tensor):
        logp, _ = self._terms_from_logits(mb, logits)
        self._logprobs.append(self._scatter(mb, logp.detach().float()))
        return torch.zeros((), device=self.device), {}

    # ------------------------------------------------------------------------------------------------
    # Megatron's schedule
    # ------------------------------------------------------------------------------------------------
    def _forward_step(
        self, data_iterator: Iterator[_MicroBatch], model: torch.nn.Module, *, forward_only: bool
    ):
        mb = next(data_iterator)
        core = get_attr_wrapped_model(model, "post_process", return_model_obj=True)
        last = core.post_process
        if last and not forward_only and (self.loss_cfg.impl != "reference" or mb.teacher_hidden is not None):
            with hidden_states_only(core):
                hidden = model_forward(model, core, mb.tokens, mb.position_ids, mb.shared)
            return hidden, partial(self._loss_from_hidden, mb, core)
        out = model_forward(model, core, mb.tokens, mb.position_ids, mb.shared)
        return out, partial(self._logprobs_only if forward_only else self._loss_from_logits, mb)

    def _run_schedule(self, micro: list[_MicroBatch], *, forward_only: bool) -> None:
        self._num_microbatches = len(micro)
        iters: Any = [iter(micro) for _ in self.model] if len(self.model) > 1 else iter(micro)
        get_forward_backward_func()(
            forward_step_func=partial(self._forward_step, forward_only=forward_only),
            data_iterator=iters,
            model=self.model if len(self.model) > 1 else self.model[0],
            num_microbatches=len(micro),
            seq_length=max(m.tokens.shape[1] for m in micro),
            micro_batch_size=micro[0].tokens.shape[0],
            forward_only=forward_only,
        )

    def _reduce_metrics(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Sum the last stage's accumulators over the pipeline (others hold zeros) and over DP ranks."""
        acc, pos = self._acc.clone(), self._pos.clone()
        for group in (mpu.get_pipeline_model_parallel_group(), mpu.get_data_parallel_group()):
            if dist.get_world_size(group) > 1:
                dist.all_reduce(acc, group=group)
                dist.all_reduce(pos, group=group)
        return acc, pos

    def _seq_multiple(self) -> int:
        return seq_padding_multiple(
            mpu.get_tensor_model_parallel_world_size(),
            bool(self.config.sequence_parallel),
            bool(getattr(self.config, "fp8", None)),
        )

    def _prepare_all(self, batches: list[OPDBatch], *, whole_response: bool) -> list[_MicroBatch]:
        """``_prepare`` for each batch with this step's padding multiple and prompt sharing."""
        multiple = self._seq_multiple()
        return [
            _prepare(
                b,
                self.device,
                whole_response=whole_response,
                seq_multiple=multiple,
                share_prompts=self.share_prompts,
            )
            for b in batches
        ]

    def _grads_finite(self) -> bool:
        """Whether every gradient on every rank is finite, with one host sync (not one per parameter)."""
        grads = []
        for chunk in self.model:
            for p in chunk.parameters():
                g = getattr(p, "main_grad", None)
                grads.append(p.grad if g is None else g)
        bad = torch.zeros((), dtype=torch.float32, device=self.device)
        groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for g in grads:
            if g is not None and g.numel() > 0:
                groups.setdefault((g.device, g.dtype), []).append(g)
        if groups:
            # L1 norms, one fused launch per device and dtype: a sum propagates NaN and inf (CUDA's max-abs norm
            # uses fmax, which drops NaN), and a finite sum of |g| reaches fp32's 3.4e38 only for gradients that
            # are broken anyway (the L2 norm's squares would overflow from |g| ~ 1.8e19).
            norms = [n.float().to(self.device) for gs in groups.values() for n in torch._foreach_norm(gs, 1)]
            bad = (~torch.isfinite(torch.stack(norms))).any().float()
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        return bad.item() == 0.0

    def __call__(self, micro_batches: list[OPDBatch]) -> StepResult:
        """One optimizer step over this rank's micro-batches (gradient accumulation to the global batch)."""
        if self.optimizer is None or self.scheduler is None:
            raise RuntimeError(
                "TrainStep was built without an optimizer/scheduler; use compute_logprobs only"
            )
        if not micro_batches:
            raise ValueError("a step needs at least one micro-batch")
        window = micro_batches[0].window
        if any(b.window != window for b in micro_batches):
            raise ValueError("all micro-batches of a step must share one horizon window")
        counts = torch.tensor(
            [
                sum(b.num_distilled_tokens() for b in micro_batches),
                sum(b.num_distilled_sequences() for b in micro_batches),
            ],
            dtype=torch.float64,
            device=self.device,
        )
        dist.all_reduce(counts, group=mpu.get_data_parallel_group())
        self._global_tokens, self._global_sequences = float(counts[0]), float(counts[1])
        micro = self._prepare_all(micro_batches, whole_response=False)
        self._reset_accumulators(window.end)

        for chunk in self.model:
            chunk.train()
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        lr = float(self.optimizer.param_groups[0]["lr"])
        if self.teacher is not None:
            for m, rows in zip(micro, self.teacher.hidden_rows(micro) or []):
                m.teacher_hidden = rows
        self._run_schedule(micro, forward_only=False)
        if self.teacher is not None:
            self.teacher.release()
        acc, pos = self._reduce_metrics()

        skip_reason = None
        if acc[5] > 0:
            skip_reason = "non-finite loss"
        elif not self._grads_finite():
            skip_reason = "non-finite gradient"
        grad_norm = float("nan")
        if skip_reason is None:
            ok, norm, _ = self.optimizer.step()
            if norm is None:
                norm = self.optimizer.get_grad_norm()
            grad_norm = float(norm) if norm is not None else float("nan")
            if not ok:
                skip_reason = "optimizer reported an overflow"
            elif not math.isfinite(grad_norm):
                skip_reason = (
                    "non-finite gradient norm"  # cannot happen after the checks above; kept explicit
                )
            else:
                self.scheduler.step(increment=1)
        tokens = int(acc[4])
        return StepResult(
            loss=float(acc[0]),
            grad_norm=grad_norm,
            lr=lr,
            log_ratio_mean=float(acc[1] / acc[4]) if acc[4] > 0 else float("nan"),
            topk_kl_mean=float(acc[2] / acc[3]) if acc[3] > 0 else float("nan"),
            num_tokens=tokens,
            num_sequences=int(self._global_sequences),
            skipped=skip_reason is not None,
            skip_reason=skip_reason,
            position_log_ratio_sum=pos[0].cpu(),
            position_topk_kl_sum=pos[1].cpu(),
            position_count=pos[2].cpu(),
            extra={"full_kl_mean": float(acc[6] / acc[7])} if acc[7] > 0 else {},
        )

    @torch.no_grad()
    def compute_logprobs(self, batches: list[OPDBatch]) -> list[torch.Tensor]:
        """Forward only: the trainer's log p of every response token (whole responses, not just the window).

        Returns one [b, R] float32 tensor per batch (zeros past each response's end), on every rank.
        """
        micro = self._prepare_all(batches, whole_response=True)
        self._reset_accumulators(1)
        for chunk in self.model:
            chunk.eval()
        self._run_schedule(micro, forward_only=True)
        for chunk in self.model:
            chunk.train()
        out = (
            self._logprobs
            if self._logprobs
            else [torch.zeros(m.mask.shape, device=self.device) for m in micro]
        )
        pp_group = mpu.get_pipeline_model_parallel_group()
        if dist.get_world_size(pp_group) > 1:
            src = mpu.get_pipeline_model_parallel_last_rank()
            for t in out:
                dist.broadcast(t, src=src, group=pp_group)
        return [t.cpu() for t in out]


def compute_logprobs(
    model: list[torch.nn.Module],
    batches: list[OPDBatch],
    *,
    vocab_size: int,
    loss_cfg: LossConfig | None = None,
) -> list[torch.Tensor]:
    """Forward-only trainer logprobs of the rollout tokens: one [b, R] tensor per batch (see ``TrainStep``)."""
    step = TrainStep(model, None, None, loss_cfg or LossConfig(), vocab_size=vocab_size)
    return step.compute_logprobs(batches)
