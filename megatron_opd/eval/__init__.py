"""Evaluation: eval sets (shipped benchmarks or files), answer checkers, avg@k / pass@k, the evaluator."""

from megatron_opd.eval.benchmarks import BENCHMARKS, MATH_PROMPT_TEMPLATE, EvalSet, load_eval_set
from megatron_opd.eval.checkers import (
    Checker,
    exact_match_checker,
    extract_boxed,
    get_checker,
    math_verify_checker,
    register_checker,
)
from megatron_opd.eval.evaluator import EvalResult, evaluate, evaluate_sets, normalize_generation
from megatron_opd.eval.hf_generate import HFGenerate
from megatron_opd.eval.metrics import avg_at_k, mean_pass_at_k, pass_at_k

__all__ = [
    "BENCHMARKS",
    "MATH_PROMPT_TEMPLATE",
    "Checker",
    "EvalResult",
    "EvalSet",
    "HFGenerate",
    "avg_at_k",
    "evaluate",
    "evaluate_sets",
    "exact_match_checker",
    "extract_boxed",
    "get_checker",
    "load_eval_set",
    "math_verify_checker",
    "mean_pass_at_k",
    "normalize_generation",
    "pass_at_k",
    "register_checker",
]
