"""Prefix continuation (the paper's Fig. 9/10): the student completes teacher prefixes of ratio rho.

    .venv/bin/python tools/prefix_continuation.py --student STUDENT_HF --teacher TEACHER_HF --data aime24.jsonl \
        --ratios 0 0.1 0.25 0.5 --n 16 --max-new-tokens 15360 --checker math --out runs/prefix

Run it with the untrained student (Fig. 9) and with a TOPD-distilled one converted to HF (Fig. 10). Writes
``prefix_continuation.json`` (accuracy per ratio) and ``prefix_continuation.png``. Thin wrapper over
``megatron_opd.analysis.prefix`` with the embedded engine and an answer checker from ``megatron_opd.eval``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from megatron_opd.analysis.prefix import continuation_accuracy
from megatron_opd.data.prompts import load_prompt_dataset
from megatron_opd.data.tokenizer import load_tokenizer
from megatron_opd.eval.checkers import checker_names, get_checker
from megatron_opd.rollout.embedded import EmbeddedEngine


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student", required=True)
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--data", required=True, help="problems with answers (jsonl/json/parquet)")
    ap.add_argument("--prompt-key", default="prompt")
    ap.add_argument("--answer-key", default="answer")
    ap.add_argument("--no-chat-template", action="store_true")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.0, 0.1, 0.25, 0.5, 0.75])
    ap.add_argument("--n", type=int, default=16, help="teacher prefixes per problem")
    ap.add_argument("--max-new-tokens", type=int, required=True)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--checker", default="math", help=f"one of {checker_names()}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)

    tok = load_tokenizer(args.student)
    data = load_prompt_dataset(
        args.data, tok, prompt_key=args.prompt_key, answer_key=args.answer_key,
        apply_chat_template=not args.no_chat_template,
    )  # fmt: skip
    check = get_checker(args.checker)
    examples = list(data.examples)

    def is_correct(i: int, response_ids: list[int]) -> bool:
        return bool(check(tok.decode(response_ids, skip_special_tokens=True), examples[i].answer))

    acc = continuation_accuracy(
        EmbeddedEngine.from_hf_dir(args.teacher, device=args.device),
        EmbeddedEngine.from_hf_dir(args.student, device=args.device),
        [e.prompt_ids for e in examples],
        is_correct,
        ratios=args.ratios,
        max_new_tokens=args.max_new_tokens,
        n=args.n,
        temperature=args.temperature,
        seed=args.seed,
    )
    res = {"student": args.student, "teacher": args.teacher, "accuracy": {str(r): a for r, a in acc.items()}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "prefix_continuation.json").write_text(json.dumps(res))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot(list(acc), list(acc.values()), "o-")
    ax.set_xlabel("ratio of teacher-written prefix")
    ax.set_ylabel(f"accuracy ({args.checker})")
    fig.tight_layout()
    fig.savefig(args.out / "prefix_continuation.png", dpi=90)
    plt.close(fig)
    print(json.dumps(res["accuracy"]))
    return res


if __name__ == "__main__":
    main()
