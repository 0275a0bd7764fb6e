"""Build an ``OPDConfig`` from YAML files and command-line overrides, both generated from the tree.

Why it exists: no flag is written by hand. Every field of every section becomes ``--section.field`` (and, when
the field name is unique across the tree, the Megatron-style alias ``--field-name``, e.g.
``--tensor-model-parallel-size``); help text is the field's docstring. Unknown keys and bad values fail at
start-up naming the key and what is allowed.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

import yaml

from megatron_opd.config.base import ConfigError, coerce, field_docs, resolved_hints, type_name
from megatron_opd.config.tree import OPDConfig


def _sections(cls: type = OPDConfig) -> dict[str, type]:
    hints = resolved_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unique_aliases() -> dict[str, tuple[str, str]]:
    """Field names that occur in one section only -> (section, field)."""
    seen: dict[str, list[tuple[str, str]]] = {}
    for section, cls in _sections().items():
        for f in dataclasses.fields(cls):
            seen.setdefault(f.name, []).append((section, f.name))
    return {name: places[0] for name, places in seen.items() if len(places) == 1}


def _unknown(key: str, allowed: Sequence[str]) -> ConfigError:
    close = difflib.get_close_matches(key.split(".")[-1], allowed, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return ConfigError(f"unknown config key '{key}'.{hint} Allowed: {', '.join(sorted(allowed))}")


def _build_section(section: str, cls: type, raw: dict[str, Any]) -> Any:
    hints = resolved_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in hints:
            raise _unknown(f"{section}.{key}", [f"{section}.{n}" for n in names])
        kwargs[key] = coerce(f"{section}.{key}", value, hints[key])
    return cls(**kwargs)


def config_from_dict(raw: dict[str, Any] | None) -> OPDConfig:
    """Nested ``{section: {field: value}}`` -> validated ``OPDConfig``."""
    raw = raw or {}
    sections = _sections()
    built = {}
    for section, values in raw.items():
        if section not in sections:
            raise _unknown(section, list(sections))
        if not isinstance(values, dict):
            raise ConfigError(f"config section '{section}' must be a mapping of field: value, got {values!r}")
    for section, cls in sections.items():
        built[section] = _build_section(section, cls, raw.get(section) or {})
    return OPDConfig(**built)


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML config; a file may ``include:`` another (relative path) that it overrides."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ConfigError(f"config file '{path}' does not exist")
    with open(path, encoding="utf-8") as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file '{path}' is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of sections, got {type(data).__name__}")
    base = data.pop("include", None)
    data = _expand_env(data, path)
    if base is not None:
        parent = load_yaml(os.path.join(os.path.dirname(path), base))
        data = merge(parent, data)
    return data


_ENV_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _expand_env(value: Any, path: str, key: str = "") -> Any:
    """Replace ``${VAR}`` in string values by the environment's value; an unset variable is an error."""
    if isinstance(value, dict):
        return {k: _expand_env(v, path, f"{key}.{k}" if key else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v, path, key) for v in value]
    if isinstance(value, str):

        def sub(m: re.Match) -> str:
            if m.group(1) not in os.environ:
                raise ConfigError(
                    f"config key '{key}' in '{path}' uses ${{{m.group(1)}}}, which is not set in the environment; "
                    f"export {m.group(1)}=... or override the key on the command line"
                )
            return os.environ[m.group(1)]

        return _ENV_VAR.sub(sub, value)
    return value


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Section-wise merge: keys of ``override`` win."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k].update(v)
        else:
            out[k] = v
    return out


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The command line, generated from the tree: ``--config FILE`` plus one flag per field."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="megatron-opd: on-policy distillation with rollout-horizon control.",
        allow_abbrev=False,
    )
    parser.add_argument("--config", action="append", default=[], help="YAML config file(s), later ones win")
    aliases = _unique_aliases()
    for section, cls in _sections().items():
        group = parser.add_argument_group(section, field_docs(OPDConfig).get(section))
        hints = resolved_hints(cls)
        docs = field_docs(cls)
        default = cls()
        for f in dataclasses.fields(cls):
            flags = [f"--{section}.{f.name}"]
            if aliases.get(f.name) == (section, f.name):
                flags.append("--" + f.name.replace("_", "-"))
            group.add_argument(
                *flags,
                dest=f"{section}.{f.name}",
                default=argparse.SUPPRESS,
                metavar=_metavar(hints[f.name]),
                help=f"{docs.get(f.name, '')} (default: {getattr(default, f.name)!r})",
            )
    return parser


def _metavar(tp: Any) -> str:
    name = type_name(tp)
    if "'" in name:  # a Literal: show the choices
        return "{" + name.replace("'", "").replace(" | ", ",") + "}"
    return name.replace(" ", "").upper()


# A negative number as a value (``-1e-4``, ``-.5``, ``-inf``): argparse only knows ``-1`` and ``-1.5`` as numbers and
# reads the rest as an unknown option.
_NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|infinity|nan)$", re.IGNORECASE)


def _attach_negative_values(argv: Sequence[str]) -> list[str]:
    """``--flag -1e-4`` -> ``--flag=-1e-4`` so that argparse takes the number as the flag's value (validation then
    judges it like any other value)."""
    out: list[str] = []
    for arg in argv:
        prev = out[-1] if out else ""
        if _NEGATIVE_NUMBER.match(arg) and prev.startswith("--") and "=" not in prev:
            out[-1] = f"{prev}={arg}"
        else:
            out.append(arg)
    return out


def parse_config(argv: Sequence[str] | None = None, prog: str | None = None) -> OPDConfig:
    """YAML file(s) then command-line overrides -> validated ``OPDConfig``."""
    parser = build_parser(prog)
    args, unknown = parser.parse_known_args(_attach_negative_values(sys.argv[1:] if argv is None else argv))
    if unknown:
        flags = [a for a in unknown if a.startswith("--")]
        bad = flags[0] if flags else unknown[0]
        allowed = [a for action in parser._actions for a in action.option_strings if a.startswith("--")]
        close = difflib.get_close_matches(bad.split("=")[0], allowed, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown command-line argument '{bad}'.{hint} Run with --help for the full list.")
    raw: dict[str, Any] = {}
    for path in args.config:
        raw = merge(raw, load_yaml(path))
    overrides: dict[str, dict[str, Any]] = {}
    for dest, value in vars(args).items():
        if dest == "config":
            continue
        section, name = dest.split(".", 1)
        overrides.setdefault(section, {})[name] = value
    return config_from_dict(merge(raw, overrides))


def dump_yaml(cfg: OPDConfig) -> str:
    """The full resolved config as YAML (saved next to checkpoints and logs, reloadable by ``--config``)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
