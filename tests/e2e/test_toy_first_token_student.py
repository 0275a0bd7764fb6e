"""The `first` toy variant (``ToyRecipe.student_shortcut_loss_tokens``): a student that errs only at its first token.

Its bare-answer SFT targets train only their ``=``, so it learns to prefer the shortcut format while its traces
stay the teacher's; the shipped recipe's student also learns to guess sums after ``=`` and its traces' answers
blur. Checked at CI size (2-digit addition, the e2e distillation test's recipe; both sets made in a temporary
cache, about 70 s on the shared 2-core machine): forced to start a trace, the `first` student reasons about as
well as the teacher and clearly better than the shipped-style student, while it still mostly takes the shortcut.
"""

import pytest

pytestmark = pytest.mark.e2e

RECIPE = dict(digits=2, num_train_prompts=256, num_eval_problems=64, teacher_steps=300, student_steps=80)
# Measured (2026-12-01, shared 2-core machine; sampled at T = 1, forced into the trace, 256 problems):
#   teacher 0.824, `first` student 0.801, shipped-style student 0.410 (greedy: 0.992, 0.988, 0.848);
#   `first` student's step format when free: 0.22 of samples on the 64 held-out problems (SFT mix: 0.2).
# One accuracy on 256 problems has a standard deviation of about 0.025, a difference of two about 0.035:
# TEACHER_GAP is about 3 sigma (models differ somewhat between CPUs, README), SHIPPED_GAP is half the measured gap.
TEACHER_GAP = 0.10
SHIPPED_GAP = 0.20
MAX_STEP_FORMAT = 0.35  # 0.2 expected; 64 samples have a standard deviation of 0.05


def test_first_token_student_reasons_like_the_teacher_but_takes_the_shortcut(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_opd.toy.addition import TRACE_START, make_problems
    from megatron_opd.toy.models import ToyRecipe, make_toy_models, task_accuracy

    problems = make_problems(256, RECIPE["digits"], seed=99)
    forced = {}
    for name, k in (("first", 1), ("shipped", 0)):
        recipe = ToyRecipe(**RECIPE, student_shortcut_loss_tokens=k)
        made = make_toy_models(recipe, str(tmp_path / "toy_models"))
        for role in ("teacher", "student"):
            path = getattr(made, role)
            model, tok = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
            acc = task_accuracy(
                model, tok, problems, recipe.max_response_tokens, temperature=1.0, prefix=TRACE_START
            )
            forced[name, role] = acc["accuracy"]
        if name == "first":
            step_format = made.report["student"]["sampled_step_format_rate"]
    print(forced, step_format)
    assert forced["first", "teacher"] == forced["shipped", "teacher"]  # one teacher recipe, one seed
    assert forced["first", "student"] >= forced["first", "teacher"] - TEACHER_GAP, forced
    assert forced["first", "student"] >= forced["shipped", "student"] + SHIPPED_GAP, forced
    assert step_format <= MAX_STEP_FORMAT, step_format
