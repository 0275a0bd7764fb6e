"""Row reading: jsonl/json/parquet, dotted keys, and errors that name the file and the row."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_opd.data.rows import DataError, get_field, iter_rows


def test_jsonl_rows_are_numbered_by_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"x": 1}\n\n{"x": 2}\n')
    assert list(iter_rows(p)) == [(1, {"x": 1}), (3, {"x": 2})]


def test_json_array_and_parquet(tmp_path):
    rows = [{"prompt": "a", "answer": "1"}, {"prompt": "b", "answer": "2"}]
    pj = tmp_path / "d.json"
    pj.write_text(json.dumps(rows))
    pp = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), pp)
    assert [r for _, r in iter_rows(pj)] == rows
    assert list(iter_rows(pp)) == [(1, rows[0]), (2, rows[1])]


def test_dotted_path_and_literal_key():
    row = {"reward_model": {"ground_truth": "7"}, "a.b": 1, "a": {"b": 2}}
    assert get_field(row, "reward_model.ground_truth") == "7"
    assert get_field(row, "a.b") == 1  # a literal dotted key wins over the path
    with pytest.raises(KeyError):
        get_field(row, "reward_model.style")


@pytest.mark.parametrize(
    "content, row, reason",
    [
        (b'{"x": 1}\n{"x": \n', 2, "bad JSON"),
        (b'{"x": 1}\n[1, 2]\n', 2, "expected a JSON object"),
        (b'{"x": 1}\n{"x": 2}\n{"x": "\xff\xfe"}\n', 3, "not valid UTF-8"),
    ],
)
def test_malformed_jsonl_names_file_and_row(tmp_path, content, row, reason):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(content)
    with pytest.raises(DataError) as e:
        list(iter_rows(p))
    assert (
        e.value.row == row
        and str(p) in str(e.value)
        and f"row {row}" in str(e.value)
        and reason in str(e.value)
    )


def test_unknown_suffix_and_missing_file(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("a,b\n")
    with pytest.raises(DataError, match="unknown dataset format"):
        iter_rows(p)
    with pytest.raises(DataError, match="no such file"):
        iter_rows(tmp_path / "nope.jsonl")
