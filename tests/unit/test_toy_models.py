"""The toy model maker with a tiny recipe: HF-format outputs, cache reuse, data files, generation."""

import json
import math
import os
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from megatron_opd.data import load_prompt_dataset
from megatron_opd.data.tokenizer import load_tokenizer
from megatron_opd.eval import HFGenerate, evaluate, load_eval_set
from megatron_opd.toy.models import ToyRecipe, _batch, make_toy_models


@pytest.fixture(scope="module")
def made(tiny_toy_models):
    """(models, cache folder, first build seconds) of the suite's shared tiny recipe (tests/conftest.py)."""
    return tiny_toy_models


def test_outputs_are_hf_checkpoints(made):
    m, _, _ = made
    for role in (m.teacher, m.student):
        for f in (
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
            "generation_config.json",
        ):
            assert os.path.isfile(os.path.join(role, f)), f
        cfg = json.load(open(os.path.join(role, "config.json")))
        assert cfg["architectures"] == ["Qwen2ForCausalLM"] and cfg["model_type"] == "qwen2"
        assert (
            cfg["hidden_size"],
            cfg["num_hidden_layers"],
            cfg["num_attention_heads"],
            cfg["num_key_value_heads"],
        ) == (
            64,
            2,
            4,
            2,
        )
        # 10 prompt + 27 response tokens -> the next power of 2; Qwen2's separate LM head
        assert cfg["max_position_embeddings"] == 64 and not cfg["tie_word_embeddings"]
        assert GenerationConfig.from_pretrained(role).eos_token_id == 1
        model = AutoModelForCausalLM.from_pretrained(role)
        assert (
            next(model.parameters()).dtype == torch.float32
            and model.config.vocab_size == m.report["vocab_size"]
        )
        for tok in (AutoTokenizer.from_pretrained(role), load_tokenizer(role)):
            prompt = "b1a2+B3A4:"
            assert tok(prompt, add_special_tokens=False)["input_ids"] == [
                tok.convert_tokens_to_ids(c) for c in prompt
            ]
            assert tok.eos_token_id == 1 and tok.pad_token_id == 0
    teacher = AutoModelForCausalLM.from_pretrained(m.teacher).state_dict()
    student = AutoModelForCausalLM.from_pretrained(m.student).state_dict()
    assert any(not torch.equal(teacher[k], student[k]) for k in teacher)  # the student was fine-tuned away


def test_report_and_training_happened(made):
    m, _, _ = made
    r = m.report
    assert r["recipe"]["teacher_steps"] == 30 and r["vocab_size"] == 3 + 14 + 4
    for role in ("teacher", "student"):
        # measured on the 8 held-out problems: whole eighths, one per problem solved
        for key in ("greedy_accuracy", "sampled_accuracy", "trace_forced_sampled_accuracy"):
            assert r[role][key] * 8 == round(r[role][key] * 8), (role, key, r[role][key])
        assert r[role]["sft_seconds"] > 0 and r[role]["num_parameters"] > 0
    assert r["teacher"]["final_loss"] < 0.7 * math.log(r["vocab_size"])  # well below a uniform guess


def test_second_call_is_served_from_the_cache(made):
    m, cache, first_s = made
    recipe = ToyRecipe(**m.report["recipe"])
    mtime = os.path.getmtime(os.path.join(m.root, "report.json"))
    t0 = time.perf_counter()
    again = make_toy_models(recipe, cache)
    assert again == m and time.perf_counter() - t0 < 0.5 * first_s
    assert os.path.getmtime(os.path.join(m.root, "report.json")) == mtime
    assert ToyRecipe(digits=2, seed=1).key() != recipe.key() and os.path.basename(m.root) == recipe.key()


def test_data_files_load_and_are_disjoint(made):
    m, _, _ = made
    tok = load_tokenizer(m.student)
    train = load_prompt_dataset(m.train_data, tok, max_prompt_length=64)
    ev = load_eval_set(m.eval_spec)
    assert len(train) == 24 and len(ev) == 8 and ev.prompts() == ev.problems
    assert not {e.prompt_text for e in train.examples} & set(ev.problems)
    assert all(len(e.prompt_ids) == 10 for e in train.examples)


def test_hf_generate_shapes_seeds_and_eos(made):
    m, _, _ = made
    tok = load_tokenizer(m.teacher)
    model = AutoModelForCausalLM.from_pretrained(m.teacher)
    gen = HFGenerate(model, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    prompts = [tok("b1a2+B3A4:")["input_ids"], tok("a5+A6:")["input_ids"]]  # unequal lengths: left padding
    a = gen(prompts, n=3, max_new_tokens=8, temperature=1.0, seed=7)
    b = gen(prompts, n=3, max_new_tokens=8, temperature=1.0, seed=7)
    c = gen(prompts, n=3, max_new_tokens=8, temperature=1.0, seed=8)
    assert len(a) == 6 and a == b and a != c
    for r in a:  # cut right after the first EOS, else the full budget
        assert tok.eos_token_id not in r[:-1] and (len(r) == 8 or r[-1] == tok.eos_token_id)
    g1 = gen(prompts, n=2, max_new_tokens=8, temperature=0.0, seed=1)
    assert g1[0] == g1[1] and g1 == gen(prompts, n=2, max_new_tokens=8, temperature=0.0, seed=2)
    res = evaluate(
        load_eval_set(m.eval_spec),
        gen,
        tok,
        n_samples=1,
        max_new_tokens=ToyRecipe(**m.report["recipe"]).max_response_tokens,
    )
    assert res.n_samples == 1 and len(res.correct) == 8 and set(res.correct) <= {0, 1}
    assert res.avg == sum(res.correct) / 8  # avg@1: the fraction of problems solved


def test_recipe_hash_keeps_old_cache_names_and_tells_the_first_token_variant_apart():
    # the shipped recipe's cache name from before student_shortcut_loss_tokens existed: its default keeps it
    assert ToyRecipe().key() == "236a391a1f365a21"
    assert ToyRecipe(student_shortcut_loss_tokens=1).key() != ToyRecipe().key()
    with pytest.raises(ValueError, match="student_shortcut_loss_tokens must be >= 0"):
        ToyRecipe(student_shortcut_loss_tokens=-1)


def test_sft_batch_trains_only_the_covered_response_tokens():
    # a bare-answer target trained on its first token only, beside a whole trace; pad id 0
    targets = [([5, 6], [7, 8, 9], 1), ([5, 6, 6], [3, 4], 2)]
    ids, mask, labels = _batch(targets, pad_id=0)
    assert ids.tolist() == [[5, 6, 7, 8, 9], [5, 6, 6, 3, 4]] and mask.tolist() == [[1] * 5, [1] * 5]
    assert labels.tolist() == [[-100, -100, 7, -100, -100], [-100, -100, -100, 3, 4]]
