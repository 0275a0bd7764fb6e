"""Reading raw rows of a prompt dataset (jsonl or parquet), with errors that name the file and the row.

Why it exists: a run that dies on row 13,512 of a 17k-row file with a bare ``KeyError`` costs an hour of
searching. Every reader here yields ``(row_number, dict)`` and every problem becomes a ``DataError`` saying
which file, which row (1-based, as a text editor counts lines in jsonl; 1-based record number in parquet)
and what was wrong. Field lookup understands dotted paths (``reward_model.ground_truth``, the DAPO-Math-17K
layout) so the keys stay configurable (``TrainConfig.prompt_key`` / ``answer_key``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

from megatron_opd.utils.errors import OPDError

SUPPORTED_SUFFIXES = (".jsonl", ".json", ".parquet")


class DataError(OPDError, ValueError):
    """A dataset file or one of its rows is malformed; the message names the file and the row."""

    def __init__(self, path: str, row: int | None, reason: str) -> None:
        where = f"{path}, row {row}" if row is not None else path
        super().__init__(f"{where}: {reason}")
        self.path = path
        self.row = row
        self.reason = reason


_MISSING = object()


def get_field(row: dict[str, Any], key: str) -> Any:
    """``row[key]`` where ``key`` may be a dotted path (``a.b.c``); raises ``KeyError(key_part)`` when absent.

    A literal key containing dots wins over the path reading (``row["a.b"]`` before ``row["a"]["b"]``).
    """
    if key in row:
        return row[key]
    node: Any = row
    for part in key.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        else:
            raise KeyError(part)
    return node


def _iter_jsonl(path: str) -> Iterator[tuple[int, dict[str, Any]]]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(path, lineno, f"not valid UTF-8 ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(path, lineno, f"bad JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(path, lineno, f"expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


def _iter_json_array(path: str) -> Iterator[tuple[int, dict[str, Any]]]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except UnicodeDecodeError as e:
        raise DataError(path, None, f"not valid UTF-8 ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise DataError(path, None, f"bad JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if not isinstance(data, list):
        raise DataError(
            path, None, "a .json dataset must be a list of objects (use .jsonl for one object a line)"
        )
    for i, obj in enumerate(data, start=1):
        if not isinstance(obj, dict):
            raise DataError(path, i, f"expected a JSON object, got {type(obj).__name__}")
        yield i, obj


def _iter_parquet(path: str, batch_rows: int = 1024) -> Iterator[tuple[int, dict[str, Any]]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for unreadable files
        raise DataError(path, None, f"cannot read as parquet ({e})") from None
    row = 0
    for batch in pf.iter_batches(batch_size=batch_rows):
        for obj in batch.to_pylist():
            row += 1
            yield row, obj


def iter_rows(path: str | os.PathLike[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(row_number, row)`` for each record of a ``.jsonl``, ``.json`` (a list) or ``.parquet`` file.

    Row numbers are 1-based; for jsonl they are line numbers (blank lines are skipped but counted).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(path, None, "no such file")
    if path.endswith(".jsonl"):
        return _iter_jsonl(path)
    if path.endswith(".json"):
        return _iter_json_array(path)
    if path.endswith(".parquet"):
        return _iter_parquet(path)
    raise DataError(path, None, f"unknown dataset format; expected one of {', '.join(SUPPORTED_SUFFIXES)}")
