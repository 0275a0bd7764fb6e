#!/usr/bin/env python
"""The peer side of ``bench_peers.py``: Hugging Face TRL's ``DistillationTrainer`` on the CPU main job's task.

Why it exists: the comparison must run TRL as its users would, in its own environment (``.venv-trl``, built by
``make bench-peers``; TRL 1.16 pins a transformers/accelerate set the trainer's ``.venv`` need not share). This
script imports nothing from megatron_opd: ``bench_peers.py`` hands it the prompts in the main job's order and
evaluates the students it saves with the project's own evaluator afterwards, out of band.

What it runs (TRL 1.16.0, ``trl/trainer/distillation_trainer.py``): every step generates one completion per
prompt with the current student (``transformers`` ``generate``, sampling at temperature 1, no top-p / top-k), runs
the teacher on prompt + completion and minimises the generalised JSD with ``beta = 1``, i.e. the exact reverse
KL(student || teacher) over the whole vocabulary at every completion token (``_chunked_divergence_loss``), token
mean. It repeats no prompt itself (``mini_repeat_count=1``), so the prompt file holds each prompt
``n_samples_per_prompt`` times in a row; ``shuffle_dataset=False`` keeps the file's order, which is the main job's.
Optimiser: AdamW with weight decay 0 (= Adam), constant lr, gradient-norm clip; fp32 (``bf16=False``); gradient
checkpointing off (TRL turns it on by default; at this size it only costs time).

Timing: training wall-clock (and CPU seconds of this process) from the start of the first step, with the saving
of the evaluation snapshots taken out. Per phase: ``rollout`` (``_generate``), ``teacher`` (the teacher's forward), ``train`` (the rest of the step).

Usage (normally called by bench_peers.py):
  .venv-trl/bin/python benchmarks/peer_trl.py --student DIR --teacher DIR --prompts FILE.jsonl --steps 100
      --seed 1234 --batch 64 --max-new-tokens 56 --save-steps 0,10,20 --out DIR
Writes DIR/step_<k>.pt (the student's state dict, HF names) and DIR/timing.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", required=True, help="the student's HF directory (weights + tokenizer)")
    p.add_argument("--teacher", required=True, help="the teacher's HF directory")
    p.add_argument(
        "--prompts", required=True, help="jsonl of {prompt, prompt_ids}, one row per rollout, in order"
    )
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument(
        "--batch", type=int, required=True, help="rollouts per step (prompts x samples per prompt)"
    )
    p.add_argument("--max-new-tokens", type=int, required=True)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--save-steps", required=True, help="comma-separated steps whose student is saved")
    p.add_argument("--out", required=True)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (the CPU cores it gets)")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DistillationConfig, DistillationTrainer

    os.makedirs(args.out, exist_ok=True)
    with open(args.prompts, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    if len(rows) < args.steps * args.batch:
        raise SystemExit(
            f"{args.prompts}: {len(rows)} rows, fewer than steps x batch = {args.steps * args.batch}"
        )
    tokenizer = AutoTokenizer.from_pretrained(args.student)
    # The peer tokenizes the prompt text itself; it must give the ids the main job samples from.
    for r in rows[: args.batch]:
        ids = tokenizer(text=r["prompt"])["input_ids"]
        if ids != r["prompt_ids"]:
            raise SystemExit(f"TRL tokenizes {r['prompt']!r} as {ids}, the main job as {r['prompt_ids']}")

    student = AutoModelForCausalLM.from_pretrained(args.student, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(args.teacher, dtype=torch.float32)
    config = DistillationConfig(
        output_dir=os.path.join(args.out, "trl"),
        seed=args.seed,
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1,
        max_steps=args.steps,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=args.clip,
        beta=1.0,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        max_completion_length=args.max_new_tokens,
        shuffle_dataset=False,
        disable_dropout=True,
        save_strategy="no",
        report_to="none",
        logging_steps=10**9,
        dataloader_num_workers=0,
    )
    dataset = Dataset.from_list([{"prompt": r["prompt"]} for r in rows[: args.steps * args.batch]])
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=config, train_dataset=dataset, processing_class=tokenizer
    )

    phases = {"rollout": 0.0, "teacher": 0.0}
    generate, hidden = trainer._generate, trainer._get_last_hidden_state

    def timed_generate(*a, **k):
        t0 = time.perf_counter()
        try:
            return generate(*a, **k)
        finally:
            phases["rollout"] += time.perf_counter() - t0

    def timed_hidden(model, *a, **k):
        t0 = time.perf_counter()
        try:
            return hidden(model, *a, **k)
        finally:
            if model is not trainer.accelerator.unwrap_model(trainer.model):
                phases["teacher"] += time.perf_counter() - t0

    trainer._generate, trainer._get_last_hidden_state = timed_generate, timed_hidden
    save_steps = {int(s) for s in args.save_steps.split(",") if s}
    clock = {"train": 0.0, "mark": 0.0, "cpu": 0.0, "cpu_mark": 0.0}
    curve: list[dict[str, float]] = []
    steps: list[dict[str, float]] = []

    def snapshot(model, step: int) -> None:
        state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        torch.save(state, os.path.join(args.out, f"step_{step}.pt"))
        curve.append({"step": step, "train_s": clock["train"], "cpu_s": clock["cpu"]})

    class Clock(TrainerCallback):
        """Training wall-clock between steps; snapshot saving happens off the clock."""

        def on_train_begin(self, targs, state, control, model=None, **kw):
            if 0 in save_steps:
                snapshot(model, 0)
            clock["mark"], clock["cpu_mark"] = time.perf_counter(), time.process_time()

        def on_step_end(self, targs, state, control, model=None, **kw):
            now, cpu_now = time.perf_counter(), time.process_time()
            dt = now - clock["mark"]
            clock["train"] += dt
            clock["cpu"] += cpu_now - clock["cpu_mark"]
            steps.append({"step": state.global_step, "step_s": dt, **phases})
            phases.update(rollout=0.0, teacher=0.0)
            if state.global_step in save_steps:
                snapshot(model, state.global_step)
            clock["mark"], clock["cpu_mark"] = time.perf_counter(), time.process_time()

    trainer.add_callback(Clock())
    trainer.train()
    with open(os.path.join(args.out, "timing.json"), "w", encoding="utf-8") as f:
        json.dump({"steps": steps, "curve": curve, "train_s": clock["train"], "cpu_s": clock["cpu"]}, f)


if __name__ == "__main__":
    main()
