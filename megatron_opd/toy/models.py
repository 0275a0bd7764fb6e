"""The CPU main job's tiny teacher and student: trained on the spot by SFT, saved as HF dirs, cached by recipe.

Why it exists: the CPU demonstration needs a teacher that solves the toy task (step-by-step addition, see
``toy/addition.py``) and a student that reasons worse, in the same formats as real checkpoints (Qwen2
``config.json`` + ``model.safetensors``, tokenizer files, ``generation_config.json`` with EOS), made in a few
minutes on 2 CPU cores and reused afterwards. Both are ``Qwen2ForCausalLM`` (hidden 64, 2 layers, 4 heads,
2 KV heads, fp32) trained from scratch with plain torch on fresh random problems each step:
- the teacher on the step-by-step traces only;
- the student on a mix: with probability ``student_shortcut_rate`` the bare answer (``=04328``), else the trace
  (optionally with dropped carries), starting from the teacher's weights (``student_init='teacher'``, cheap:
  a short fine-tune) or from scratch. It learns both formats; greedy, it takes the shortcut, which a tiny
  model cannot compute, so its accuracy is far below the teacher's. Its mistakes sit at the response's first
  token (the format choice): what on-policy distillation, and cheaply its short horizons, can fix. Learning to
  guess sums after ``=`` also blurs its traces' own answers (sampled, forced to start a trace: 0.72 against the
  teacher's 0.96); with ``student_shortcut_loss_tokens=1`` the bare-answer targets train only their ``=``, and
  the traces stay the teacher's (0.91): a student that errs at its first token only.
Everything is keyed by a hash of the recipe under ``cache_dir/<hash>/``; a second call returns at once.

Measured with the default recipe (2026-11-30, one thread on the shared 2-core machine, 256 held-out problems):
teacher greedy 1.00 (sampled at T=1: 0.98), student greedy 0.00 (sampled: 0.16, with the step format in 0.21 of
samples); about 105 s of CPU time for both. Built on another machine (2026-12-01): teacher sampled 0.96, student
0.14. The models are the same on every build of one machine but not across CPUs (float rounding; README). A throwaway token-level OPD loop (HF models, 16 prompts x 4 samples,
Adam lr 1e-4, full horizon) lifted the student's greedy accuracy to 0.93 in 10 steps and 0.96-0.98 by 20.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Any, Literal

import torch

from megatron_opd.toy.addition import (
    TRACE_START,
    AdditionProblem,
    alphabet,
    check_answer,
    make_problems,
    prompt_length,
    response_length,
)
from megatron_opd.toy.tokenizer import save_char_tokenizer

DEFAULT_CACHE_DIR = os.path.join(".cache", "toy_models")


@dataclass(frozen=True, kw_only=True)
class ToyRecipe:
    """Everything that decides the toy models and data; its hash names the cache entry."""

    digits: int = 4
    """Operand width of the addition problems."""
    seed: int = 0
    """Seed of data, initialisation and SFT sampling."""
    num_train_prompts: int = 2048
    """Prompts written to data/train.jsonl for distillation."""
    num_eval_problems: int = 256
    """Problems written to data/eval.jsonl (disjoint from the training prompts)."""
    hidden_size: int = 64
    num_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    ffn_hidden_size: int = 176
    rope_theta: float = 10000.0
    batch_size: int = 64
    """SFT sequences per step."""
    lr: float = 3e-3
    """Peak SFT learning rate (AdamW, linear warmup, cosine decay to 10%)."""
    warmup_steps: int = 30
    teacher_steps: int = 600
    """SFT steps of the teacher."""
    student_init: Literal["teacher", "scratch"] = "teacher"
    """Start the student from the teacher's weights (a short fine-tune) or from a fresh initialisation."""
    student_steps: int = 150
    """SFT steps of the student."""
    student_lr: float = 1e-3
    """Peak SFT learning rate of the student."""
    student_shortcut_rate: float = 0.8
    """Probability that a student SFT target is the bare answer instead of the step-by-step trace."""
    student_carry_drop_rate: float = 0.0
    """Probability that a step of the student's traces loses its carry-in (late, sloppy-arithmetic errors)."""
    student_shortcut_loss_tokens: int = 0
    """If > 0, the student's SFT loss on a bare-answer target covers only its first ``student_shortcut_loss_tokens``
    tokens (0: the whole target); traces keep their whole loss. With 1 the student learns the format choice
    (token 0 is ``=`` with probability ``student_shortcut_rate``) and the teacher's traces, but not to guess sums
    after ``=``, which otherwise also corrupts the answer after its traces: it errs at its first token only."""
    num_threads: int = 1
    """torch threads while training (1 was several times faster than 2 on the shared 2-core machine)."""
    version: int = 1
    """Bumped when the recipe's meaning changes, so old caches are not reused."""

    def __post_init__(self) -> None:
        if self.student_shortcut_loss_tokens < 0:
            raise ValueError(
                "student_shortcut_loss_tokens must be >= 0 (0: SFT loss on the whole bare-answer target), got "
                f"{self.student_shortcut_loss_tokens}"
            )

    def key(self) -> str:
        """The cache entry's name: a hash of every field. Fields added after version 1 enter it only when set
        away from their default (which keeps the old behaviour), so existing cache entries keep their names."""
        fields = dataclasses.asdict(self)
        for name, default in _ADDED_FIELDS.items():
            if fields[name] == default:
                del fields[name]
        blob = json.dumps(fields, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def max_response_tokens(self) -> int:
        """The step-by-step response plus EOS: the full rollout length T_max of the toy task."""
        return response_length(self.digits) + 1

    @property
    def max_position_embeddings(self) -> int:
        return 1 << math.ceil(math.log2(prompt_length(self.digits) + self.max_response_tokens))


# Fields added to ToyRecipe after its hash was first used, with the default that keeps the old recipe.
_ADDED_FIELDS: dict[str, Any] = {"student_shortcut_loss_tokens": 0}


@dataclass(frozen=True)
class ToyModels:
    """Paths of a made set: HF dirs of the teacher and the student, the train/eval jsonl files, and the report
    (greedy accuracies, SFT seconds, final losses)."""

    root: str
    teacher: str
    student: str
    train_data: str
    eval_data: str
    report: dict[str, Any]

    @property
    def eval_spec(self) -> str:
        """The ``eval.datasets`` entry that scores this set with the task's exact-match checker."""
        return f"toy_addition:{self.eval_data}"


def qwen2_config(recipe: ToyRecipe, vocab_size: int, eos_id: int, pad_id: int):
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.ffn_hidden_size,
        num_hidden_layers=recipe.num_layers,
        num_attention_heads=recipe.num_attention_heads,
        num_key_value_heads=recipe.num_key_value_heads,
        max_position_embeddings=recipe.max_position_embeddings,
        rope_theta=recipe.rope_theta,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        use_sliding_window=False,
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        torch_dtype="float32",
    )


# An SFT target: (prompt ids, response ids, how many of the response's first tokens the loss covers).
Target = tuple[list[int], list[int], int]


def _batch(targets: list[Target], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded [B, L] input ids, attention mask and labels (-100 outside the response's trained tokens)."""
    width = max(len(p) + len(r) for p, r, _ in targets)
    ids = torch.full((len(targets), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (p, r, n) in enumerate(targets):
        seq = p + r
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        labels[i, len(p) : len(p) + min(n, len(r))] = torch.tensor(r[:n])
    return ids, mask, labels


def sft(
    model: Any,
    make_targets: Any,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    warmup_steps: int,
    seed: int,
    pad_id: int,
    log_every: int = 100,
    desc: str | None = None,
) -> list[float]:
    """Train ``model`` on ``make_targets(rng, batch_size) -> [Target]``; return losses.

    With ``desc``, progress goes to stderr: a bar on a terminal, else a line every ``log_every`` steps."""
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)

    def lr_at(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        frac = (step - warmup_steps) / max(1, steps - warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    losses = []
    bar = None
    if desc is not None and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=steps, desc=desc, unit="step", file=sys.stderr, dynamic_ncols=True)
    for step in range(steps):
        ids, mask, labels = _batch(make_targets(rng, batch_size), pad_id)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"loss {loss.item():.3f}", refresh=False)
        elif desc is not None and log_every and (step + 1) % log_every == 0:
            mean = sum(losses[-log_every:]) / log_every
            print(f"{desc}: step {step + 1}/{steps}, loss {mean:.4f}", file=sys.stderr, flush=True)
    if bar is not None:
        bar.close()
    model.eval()
    return losses


def task_accuracy(
    model: Any,
    tokenizer: Any,
    problems: list[AdditionProblem],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    seed: int = 0,
    prefix: str = "",
) -> dict[str, float]:
    """Exact-match accuracy (greedy at temperature 0) and the share of responses in the step-by-step format.

    ``prefix`` forces the response's first characters (appended to the prompt, counted in the response): with
    the trace's first place letter it measures how well the model reasons once the format is chosen."""
    from megatron_opd.eval.hf_generate import HFGenerate

    gen = HFGenerate(model, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    prompts = [tokenizer(p.prompt + prefix, add_special_tokens=False)["input_ids"] for p in problems]
    new_tokens = max_new_tokens - len(tokenizer(prefix, add_special_tokens=False)["input_ids"])
    responses = gen(prompts, n=1, max_new_tokens=new_tokens, temperature=temperature, seed=seed)
    texts = [prefix + tokenizer.decode(r, skip_special_tokens=True) for r in responses]
    ok = sum(check_answer(t, p.answer) for t, p in zip(texts, problems))
    steps = sum(not t.startswith("=") for t in texts)
    return {"accuracy": ok / len(problems), "step_format_rate": steps / len(problems)}


def _write_jsonl(path: str, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def _save_model(model: Any, tokenizer: Any, path: str, eos_id: int, pad_id: int) -> None:
    from transformers import GenerationConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # its "Writing model shards" bar for a one-file, 0.4 MB model
    try:
        model.save_pretrained(path, safe_serialization=True)
    finally:
        hf_logging.enable_progress_bar()
    # transformers 5 writes the RoPE base only inside rope_parameters; readers on transformers 4 (SGLang) look
    # for the top-level key and would silently fall back to Qwen2's 1e6.
    cfg_json = os.path.join(path, "config.json")
    with open(cfg_json, encoding="utf-8") as f:
        hf_cfg = json.load(f)
    theta = (hf_cfg.get("rope_parameters") or {}).get("rope_theta")
    if theta is not None:
        hf_cfg.setdefault("rope_theta", theta)
    with open(cfg_json, "w", encoding="utf-8") as f:
        json.dump(hf_cfg, f, indent=2)
    tokenizer.save_pretrained(path)
    # the saved tokenizer_config must keep the version-portable class name written by save_char_tokenizer
    with open(os.path.join(path, "tokenizer_config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2)
    GenerationConfig(
        eos_token_id=eos_id, pad_token_id=pad_id, do_sample=True, temperature=1.0, top_p=1.0, top_k=0
    ).save_pretrained(path)


def _build(recipe: ToyRecipe, out: str) -> dict[str, Any]:
    from transformers import AutoTokenizer, Qwen2ForCausalLM

    os.makedirs(os.path.join(out, "data"), exist_ok=True)
    save_char_tokenizer(os.path.join(out, "tokenizer"), alphabet(recipe.digits))
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(out, "tokenizer"))
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id

    eval_problems = make_problems(recipe.num_eval_problems, recipe.digits, seed=recipe.seed + 1)
    held_out = {(p.a, p.b) for p in eval_problems}
    train_problems = make_problems(
        recipe.num_train_prompts, recipe.digits, seed=recipe.seed + 2, exclude=held_out
    )
    _write_jsonl(
        os.path.join(out, "data", "train.jsonl"),
        [{"prompt": p.prompt, "answer": p.answer} for p in train_problems],
    )
    _write_jsonl(
        os.path.join(out, "data", "eval.jsonl"),
        [{"problem": p.prompt, "answer": p.answer} for p in eval_problems],
    )

    vocab = tokenizer.get_vocab()

    def enc(
        text: str,
    ) -> list[int]:  # one id per character; a dict lookup is 10x faster than the tokenizer call
        return [vocab[ch] for ch in text]

    space = 10**recipe.digits

    def draw(rng: random.Random) -> AdditionProblem:
        while True:
            p = AdditionProblem(rng.randrange(space), rng.randrange(space), recipe.digits)
            if (p.a, p.b) not in held_out:
                return p

    def teacher_targets(rng: random.Random, b: int) -> list[Target]:
        out_ = []
        for _ in range(b):
            p = draw(rng)
            resp = enc(p.teacher_response()) + [eos_id]
            out_.append((enc(p.prompt), resp, len(resp)))
        return out_

    def student_targets(rng: random.Random, b: int) -> list[Target]:
        out_ = []
        for _ in range(b):
            p = draw(rng)
            if rng.random() < recipe.student_shortcut_rate:
                resp = enc(p.shortcut_response()) + [eos_id]
                n = recipe.student_shortcut_loss_tokens or len(resp)
            else:
                drop = {i for i in range(recipe.digits) if rng.random() < recipe.student_carry_drop_rate}
                resp = enc(p.steps(drop)) + [eos_id]
                n = len(resp)
            out_.append((enc(p.prompt), resp, n))
        return out_

    report: dict[str, Any] = {"recipe": dataclasses.asdict(recipe), "vocab_size": len(tokenizer)}
    threads = torch.get_num_threads()
    torch.set_num_threads(recipe.num_threads)
    try:
        teacher = None
        for role, targets, steps, lr, seed in (
            ("teacher", teacher_targets, recipe.teacher_steps, recipe.lr, recipe.seed + 10),
            ("student", student_targets, recipe.student_steps, recipe.student_lr, recipe.seed + 20),
        ):
            torch.manual_seed(seed)
            model = Qwen2ForCausalLM(qwen2_config(recipe, len(tokenizer), eos_id, pad_id)).float()
            if role == "student" and recipe.student_init == "teacher":
                model.load_state_dict(teacher.state_dict())
            print(f"toy {role}: SFT for {steps} steps ...", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            losses = sft(
                model,
                targets,
                steps=steps,
                batch_size=recipe.batch_size,
                lr=lr,
                warmup_steps=min(recipe.warmup_steps, steps // 4),
                seed=seed,
                pad_id=pad_id,
                desc=f"toy {role} SFT",
            )
            sft_s = time.perf_counter() - t0
            greedy = task_accuracy(model, tokenizer, eval_problems, recipe.max_response_tokens)
            sampled = task_accuracy(
                model, tokenizer, eval_problems, recipe.max_response_tokens, temperature=1.0
            )
            # the reasoning alone, the format choice taken out: the response forced to start the trace
            traced = task_accuracy(
                model,
                tokenizer,
                eval_problems,
                recipe.max_response_tokens,
                temperature=1.0,
                prefix=TRACE_START,
            )
            report[role] = {
                "sft_seconds": round(sft_s, 2),
                "final_loss": sum(losses[-20:]) / len(losses[-20:]),
                "greedy_accuracy": greedy["accuracy"],
                "greedy_step_format_rate": greedy["step_format_rate"],
                "sampled_accuracy": sampled["accuracy"],
                "sampled_step_format_rate": sampled["step_format_rate"],
                "trace_forced_sampled_accuracy": traced["accuracy"],
                "num_parameters": sum(p.numel() for p in model.parameters()),
            }
            print(
                f"toy {role}: {sft_s:.0f} s of SFT, greedy accuracy {greedy['accuracy']:.2f}, sampled "
                f"{sampled['accuracy']:.2f} (step format {sampled['step_format_rate']:.2f}; forced into the "
                f"trace: {traced['accuracy']:.2f})",
                file=sys.stderr,
                flush=True,
            )
            _save_model(model, tokenizer, os.path.join(out, role), eos_id, pad_id)
            teacher = model
    finally:
        torch.set_num_threads(threads)
    with open(os.path.join(out, "report.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    return report


def _paths(root: str, report: dict[str, Any]) -> ToyModels:
    return ToyModels(
        root=root,
        teacher=os.path.join(root, "teacher"),
        student=os.path.join(root, "student"),
        train_data=os.path.join(root, "data", "train.jsonl"),
        eval_data=os.path.join(root, "data", "eval.jsonl"),
        report=report,
    )


def make_toy_models(
    recipe: ToyRecipe | None = None, cache_dir: str = DEFAULT_CACHE_DIR, *, force: bool = False
) -> ToyModels:
    """The toy teacher, student and data for ``recipe``, built once and then read from ``cache_dir/<hash>``.

    Safe to call from several processes at once (a file lock; one builds, the others wait and reuse it).
    ``force`` rebuilds even when the cache entry exists.
    """
    recipe = recipe or ToyRecipe()
    os.makedirs(cache_dir, exist_ok=True)
    root = os.path.abspath(os.path.join(cache_dir, recipe.key()))
    report_path = os.path.join(root, "report.json")
    with open(os.path.join(cache_dir, f"{recipe.key()}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if force or not os.path.exists(report_path):
            tmp = root + ".tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            _build(recipe, tmp)
            shutil.rmtree(root, ignore_errors=True)
            os.replace(tmp, root)
        with open(report_path, encoding="utf-8") as f:
            report = json.load(f)
    return _paths(root, report)
