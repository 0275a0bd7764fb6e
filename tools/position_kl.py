"""Per-position KL(student || teacher) over student rollouts (the paper's Fig. 13).

    .venv/bin/python tools/position_kl.py --student STUDENT_HF --teacher TEACHER_HF --data prompts.jsonl \
        --num-prompts 500 --max-new-tokens 15360 --out runs/position_kl [--device cuda]

Writes ``position_kl.json`` (per-position mean KL and counts, bucket means) and ``position_kl.png``.
Thin wrapper over ``megatron_opd.analysis.position_kl`` with the embedded engine and scorer.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from megatron_opd.analysis.position_kl import position_kl
from megatron_opd.data.prompts import load_prompt_dataset
from megatron_opd.data.tokenizer import load_tokenizer
from megatron_opd.rollout.embedded import EmbeddedEngine
from megatron_opd.teacher.embedded import EmbeddedScorer


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student", required=True)
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--data", required=True, help="prompt dataset (jsonl/json/parquet), as train.data_path")
    ap.add_argument("--prompt-key", default="prompt")
    ap.add_argument("--answer-key", default="answer")
    ap.add_argument("--no-chat-template", action="store_true")
    ap.add_argument("--num-prompts", type=int, default=500)
    ap.add_argument("--n", type=int, default=1, help="student samples per prompt")
    ap.add_argument("--max-new-tokens", type=int, required=True)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--buckets", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)

    tok = load_tokenizer(args.student)
    data = load_prompt_dataset(
        args.data, tok, prompt_key=args.prompt_key, answer_key=args.answer_key,
        apply_chat_template=not args.no_chat_template,
    )  # fmt: skip
    g = torch.Generator().manual_seed(args.seed)
    pick = torch.randperm(len(data), generator=g)[: args.num_prompts].tolist()
    prompts = [data[i].prompt_ids for i in pick]
    engine = EmbeddedEngine.from_hf_dir(args.student, device=args.device)
    pk = position_kl(
        engine,
        EmbeddedScorer.from_hf_dir(args.student, device=args.device),
        EmbeddedScorer.from_hf_dir(args.teacher, device=args.device),
        prompts,
        n=args.n,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        seed=args.seed,
    )
    res = {
        "student": args.student,
        "teacher": args.teacher,
        "num_prompts": len(prompts),
        "n": args.n,
        "mean_kl": pk.means(),
        "counts": pk.counts.tolist(),
        "bucket_mean_kl": pk.bucket_means(args.buckets),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "position_kl.json").write_text(json.dumps(res))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(range(len(res["mean_kl"])), res["mean_kl"], lw=0.6, alpha=0.5, label="per position")
    width = args.max_new_tokens / args.buckets
    ax.plot(
        [(b + 0.5) * width for b in range(args.buckets)], res["bucket_mean_kl"], "o-", label="bucket mean"
    )
    ax.set_xlabel("position in the student's rollout")
    ax.set_ylabel("KL(student || teacher)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "position_kl.png", dpi=90)
    plt.close(fig)
    print(json.dumps({"bucket_mean_kl": res["bucket_mean_kl"]}))
    return res


if __name__ == "__main__":
    main()
