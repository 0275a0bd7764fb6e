"""The CPU main job's task (step-by-step addition), its character tokenizer and its tiny teacher and student."""

from megatron_opd.toy.addition import (
    AdditionProblem,
    check_answer,
    extract_answer,
    make_problems,
    response_length,
)
from megatron_opd.toy.models import DEFAULT_CACHE_DIR, ToyModels, ToyRecipe, make_toy_models
from megatron_opd.toy.tokenizer import build_char_tokenizer, save_char_tokenizer

__all__ = [
    "DEFAULT_CACHE_DIR",
    "AdditionProblem",
    "ToyModels",
    "ToyRecipe",
    "build_char_tokenizer",
    "check_answer",
    "extract_answer",
    "make_problems",
    "make_toy_models",
    "response_length",
    "save_char_tokenizer",
]
