"""Machinery shared by every config section: errors, field docs, typed coercion and checks.

Why it exists: the config tree is the single source of truth for YAML keys, command-line flags and their help
text. Each section is a ``kw_only`` dataclass whose fields carry an attribute docstring (the string literal
under the field, as in Megatron's ``ModelParallelConfig``); this module reads those docstrings once so the
CLI and the docs never repeat them, and turns raw strings or YAML values into the field's declared type.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin

from megatron_opd.utils.errors import OPDError


class ConfigError(OPDError, ValueError):
    """A config key or value is wrong; the message names the key, what was given and what is allowed."""


def fail(key: str, value: Any, allowed: str) -> typing.NoReturn:
    """Raise a ``ConfigError`` in the one house format: key, offending value, what would be accepted."""
    raise ConfigError(f"config key '{key}': got {value!r}; allowed: {allowed}")


def check_range(
    key: str,
    value: float | int | None,
    lo: float | None = None,
    hi: float | None = None,
    *,
    lo_open: bool = False,
    hi_open: bool = False,
) -> None:
    """Check ``lo <(=) value <(=) hi``; ``None`` values pass (optional fields)."""
    if value is None:
        return
    ok = True
    if lo is not None:
        ok &= value > lo if lo_open else value >= lo
    if hi is not None:
        ok &= value < hi if hi_open else value <= hi
    if not ok:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        lo_s = "-inf" if lo is None else repr(lo)
        hi_s = "inf" if hi is None else repr(hi)
        fail(key, value, f"a number in {left}{lo_s}, {hi_s}{right}")


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Map each dataclass field of ``cls`` (and its bases) to the docstring written under it."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        body = ast.parse(source).body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(inspect.cleandoc(nxt.value.value).split())
    return docs


def resolved_hints(cls: type) -> dict[str, Any]:
    """Field name -> evaluated type annotation (the modules use ``from __future__ import annotations``)."""
    return typing.get_type_hints(cls)


def _is_optional(tp: Any) -> tuple[bool, Any]:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return True, args[0]
    return False, tp


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def coerce(key: str, value: Any, tp: Any) -> Any:
    """Turn ``value`` (a YAML scalar/list or a command-line string) into type ``tp`` or fail naming ``key``."""
    optional, inner = _is_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in {"none", "null", ""}):
        if optional:
            return None
        fail(key, value, f"a value of type {_type_name(tp)} (this key cannot be null)")
    tp = inner
    origin = get_origin(tp)
    if origin is Literal:
        choices = get_args(tp)
        for c in choices:
            if value == c or (isinstance(value, str) and str(c) == value):
                return c
        fail(key, value, "one of " + ", ".join(repr(c) for c in choices))
    if origin in (list, tuple):
        (elem,) = get_args(tp)[:1] or (str,)
        if isinstance(value, str):
            value = [v for v in (s.strip() for s in value.split(",")) if v]
        if not isinstance(value, (list, tuple)):
            fail(key, value, f"a list of {_type_name(elem)}")
        return [coerce(f"{key}[{i}]", v, elem) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        fail(key, value, "true or false")
    if tp is int:
        if isinstance(value, bool):
            fail(key, value, "an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(float(value)) if _looks_integral(value) else int(value)
            except ValueError:
                pass
        fail(key, value, "an integer")
    if tp is float:
        if isinstance(value, bool):
            fail(key, value, "a number")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        fail(key, value, "a number")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        fail(key, value, "a string")
    raise TypeError(f"config key '{key}': unsupported field type {tp!r}")


def _looks_integral(s: str) -> bool:
    try:
        f = float(s)
    except ValueError:
        return False
    return f.is_integer() and ("e" in s.lower())


def _type_name(tp: Any) -> str:
    optional, inner = _is_optional(tp)
    origin = get_origin(inner)
    if origin is Literal:
        name = " | ".join(repr(a) for a in get_args(inner))
    elif origin in (list, tuple):
        name = f"list[{_type_name(get_args(inner)[0])}]"
    else:
        name = getattr(inner, "__name__", str(inner))
    return f"{name} | None" if optional else name


def type_name(tp: Any) -> str:
    """Human-readable name of a field type, for help text."""
    return _type_name(tp)
