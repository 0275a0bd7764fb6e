"""A generation callable backed by a plain ``transformers`` causal LM (the reference engine for evaluation).

Why it exists: the ``eval`` tool must score any HF checkpoint without a rollout server, and the toy models are
checked right after they are trained; both need the rollout engine's ``generate`` shape on top of
``model.generate``. Prompts are left-padded per call; sampling draws from the full distribution (top-k off)
with the requested temperature and top-p, greedy when temperature is 0, under a seed local to the call.
"""

from __future__ import annotations

from typing import Any

import torch


class HFGenerate:
    """``HFGenerate(model, eos_token_id, pad_token_id)(prompts, n=..., max_new_tokens=..., ...)`` -> response ids.

    Returns a prompt-major list of ``len(prompts) * n`` response id lists, each ending at (and including) the
    first EOS when the model stopped. ``batch_size`` bounds the sequences decoded together.
    """

    def __init__(
        self, model: Any, *, eos_token_id: int | list[int], pad_token_id: int, batch_size: int = 256
    ) -> None:
        self.model = model
        self.eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        self.pad = pad_token_id
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(
        self,
        prompts: list[list[int]],
        *,
        n: int = 1,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int = 0,
    ) -> list[list[int]]:
        seqs = [p for p in prompts for _ in range(n)]
        device = next(self.model.parameters()).device
        out: list[list[int]] = []
        was_training = self.model.training
        self.model.eval()
        sample = temperature > 0
        kwargs: dict[str, Any] = {"do_sample": sample}
        if sample:
            kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for start in range(0, len(seqs), self.batch_size):
                chunk = seqs[start : start + self.batch_size]
                width = max(len(p) for p in chunk)
                ids = torch.full((len(chunk), width), self.pad, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for i, p in enumerate(chunk):
                    ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
                    mask[i, width - len(p) :] = 1
                gen = self.model.generate(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    max_new_tokens=max_new_tokens,
                    eos_token_id=self.eos,
                    pad_token_id=self.pad,
                    **kwargs,
                )[:, width:].tolist()
                for row in gen:
                    cut = next((i + 1 for i, t in enumerate(row) if t in self.eos), len(row))
                    out.append(row[:cut])
        self.model.train(was_training)
        return out
