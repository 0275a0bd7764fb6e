"""Prompt datasets: both layouts, chat templates, row-level errors, over-long prompts skipped or refused."""

import json
import string

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_opd.config import RolloutConfig, TrainConfig
from megatron_opd.data import DataError, load_prompt_dataset, load_train_dataset, render_prompt
from megatron_opd.toy.tokenizer import build_char_tokenizer

TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer(string.ascii_letters + string.digits + " <>.?+=:,$\\{}")


@pytest.fixture(scope="module")
def chat_tok():
    t = build_char_tokenizer(string.ascii_letters + string.digits + " <>.?+=:,$\\{}")
    t.chat_template = TEMPLATE
    return t


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_plain_layout_without_template(tmp_path, tok):
    p = write_jsonl(
        tmp_path / "d.jsonl", [{"problem": "1+1?", "answer": 2}, {"problem": "2+3?", "answer": "5"}]
    )
    ds = load_prompt_dataset(p, tok)  # prompt_key 'prompt' falls back to 'problem'
    assert len(ds) == 2 and ds.num_rows == 2
    assert ds[0].prompt_text == "1+1?" and ds[0].answer == "2"
    assert tok.decode(ds[1].prompt_ids) == "2+3?"


def test_dapo_layout_parquet_with_chat_template(tmp_path, chat_tok):
    rows = [
        {
            "prompt": [{"role": "user", "content": "What is 3+4?"}],
            "reward_model": {"ground_truth": "7", "style": "rule"},
        },
        {
            "prompt": [{"role": "user", "content": "Add 1 and 1."}],
            "reward_model": {"ground_truth": "2", "style": "rule"},
        },
    ]
    p = tmp_path / "dapo.parquet"
    pq.write_table(pa.Table.from_pylist(rows), p)
    ds = load_prompt_dataset(p, chat_tok, answer_key="reward_model.ground_truth")
    assert ds[0].prompt_text == "<user>What is 3+4?<assistant>"
    assert chat_tok.decode(ds[0].prompt_ids) == ds[0].prompt_text
    assert [e.answer for e in ds.examples] == ["7", "2"]
    # apply_chat_template=False reads the message contents as plain text
    raw = load_prompt_dataset(p, chat_tok, answer_key="reward_model.ground_truth", apply_chat_template=False)
    assert raw[0].prompt_text == "What is 3+4?"


def test_string_prompt_becomes_a_user_message(chat_tok):
    assert render_prompt("hi", chat_tok) == ("<user>hi<assistant>", True)


@pytest.mark.parametrize(
    "bad_row, reason",
    [
        ({"answer": "1"}, "missing prompt field 'prompt'"),
        ({"prompt": "x"}, "missing answer field 'answer'"),
        ({"prompt": "   ", "answer": "1"}, "the prompt is empty"),
        ({"prompt": 5, "answer": "1"}, "must be a string or a list of chat messages"),
        ({"prompt": [{"role": "user"}], "answer": "1"}, "message 0"),
        ({"prompt": [], "answer": "1"}, "empty message list"),
        ({"prompt": "x", "answer": None}, "the answer must be a string or a number"),
        ({"prompt": "x", "answer": ""}, "the answer is empty"),
    ],
)
def test_malformed_row_names_file_and_row(tmp_path, tok, bad_row, reason):
    p = write_jsonl(
        tmp_path / "d.jsonl", [{"prompt": "ok", "answer": "1"}, {"prompt": "ok2", "answer": "2"}, bad_row]
    )
    with pytest.raises(DataError) as e:
        load_prompt_dataset(p, tok)
    assert e.value.row == 3 and f"{p}, row 3" in str(e.value) and reason in str(e.value)


def test_over_long_prompts_skipped_and_counted_or_refused(tmp_path, tok):
    rows = [{"prompt": "a" * n, "answer": "1"} for n in (3, 9, 4, 12, 5)]
    p = write_jsonl(tmp_path / "d.jsonl", rows)
    ds = load_prompt_dataset(p, tok, max_prompt_length=5)
    assert [len(e.prompt_ids) for e in ds.examples] == [3, 4, 5]
    assert [e.index for e in ds.examples] == [0, 1, 2] and [e.row for e in ds.examples] == [1, 3, 5]
    assert ds.num_too_long == 2 and ds.too_long_rows == [2, 4]
    with pytest.raises(DataError, match=r"row 2: the prompt is 9 tokens, longer than max_prompt_length=5"):
        load_prompt_dataset(p, tok, max_prompt_length=5, over_long_prompts="error")
    with pytest.raises(DataError, match="all 5 prompts are longer"):
        load_prompt_dataset(p, tok, max_prompt_length=2)


def test_from_config_sections(tmp_path, tok):
    p = write_jsonl(
        tmp_path / "d.jsonl", [{"q": {"text": "abc"}, "sol": "3"}, {"q": {"text": "abcdefgh"}, "sol": "4"}]
    )
    train = TrainConfig(data_path=str(p), prompt_key="q.text", answer_key="sol")
    ds = load_train_dataset(train, RolloutConfig(max_prompt_length=4), tok)
    assert len(ds) == 1 and ds.num_too_long == 1 and ds[0].answer == "3"
    with pytest.raises(DataError, match="train.data_path"):
        load_train_dataset(TrainConfig(), RolloutConfig(), tok)
