"""The text side of a sweep config: reading the YAML file (and the files it ``extends``),
``--set`` overrides, and pydantic's validation errors as one line naming the field
(``finetune.lrs[2]: must be > 0``). :mod:`rift_ray.config` holds the schema and re-exports
what is used elsewhere."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError


class ConfigError(ValueError):
    """A sweep config that cannot be used; the message is one line naming the field."""


_MESSAGES = {
    "greater_than": "must be > {gt}",
    "greater_than_equal": "must be >= {ge}",
    "less_than": "must be < {lt}",
    "less_than_equal": "must be <= {le}",
    "extra_forbidden": "unknown key",
    "too_short": "must not be empty",
}


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif str(part).startswith("function-") or part in ("float", "int", "str", "bool"):
            continue  # pydantic validator / union branch labels, not field names
        else:
            out += ("." if out else "") + str(part)
    return out or "<root>"


def format_validation_error(err: ValidationError) -> str:
    """The first error of a pydantic ValidationError as ``field.path: message``."""
    e = err.errors(include_url=False)[0]
    ctx = e.get("ctx") or {}
    template = _MESSAGES.get(e["type"])
    if template:
        try:
            msg = template.format(**ctx)
        except (KeyError, IndexError):
            msg = e["msg"]
    else:
        msg = e["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
    if e["type"] == "literal_error" and "expected" in ctx:
        msg = f"must be one of {ctx['expected']} (got {e.get('input')!r})"
    elif e["type"] not in _MESSAGES and "input" in e and not isinstance(e["input"], dict):
        msg = f"{msg} (got {e['input']!r})"
    loc = _loc(tuple(e["loc"]))
    # errors raised in a model validator carry "field: message" themselves
    if ": " in msg and e["type"] == "value_error" and not msg.startswith("must"):
        head, rest = msg.split(": ", 1)
        if re.fullmatch(r"[A-Za-z_][\w.\[\]]*", head):
            loc = f"{loc}.{head}" if loc != "<root>" else head
            msg = rest
    extra = len(err.errors()) - 1
    return f"{loc}: {msg}" + (
        f" (and {extra} more error{'s' if extra > 1 else ''})" if extra else ""
    )


def _set_path(d: dict[str, Any], path: str, value: Any) -> None:
    keys = path.split(".")
    cur = d
    for i, k in enumerate(keys[:-1]):
        nxt = cur.get(k)
        if nxt is None:
            nxt = cur[k] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"{'.'.join(keys[: i + 1])}: is not a section (cannot set {path})")
        cur = nxt
    cur[keys[-1]] = value


def apply_overrides(raw: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply ``KEY=VALUE`` overrides (VALUE parsed as YAML: ``finetune.lrs=[0.001,0.005]``)."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(
                f"--set {item!r}: expected KEY=VALUE, e.g. finetune.lrs=[0.001,0.005]"
            )
        key, text = item.split("=", 1)
        key = key.strip()
        if key.split(".")[0] == EXTENDS:
            raise ConfigError(
                f"--set {item!r}: the base is chosen in the file (extends:); --set changes "
                "fields of the resolved config"
            )
        if not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*", key):
            raise ConfigError(f"--set {item!r}: {key!r} is not a field path like finetune.lrs")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {key}: value is not valid YAML ({_first_line(e)})") from None
        _set_path(raw, key, value)
    return raw


def _first_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:200]


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The sweep file as a dict, with its ``extends:`` chain resolved: the base's keys, then
    this file's merged over them (:func:`deep_merge`); no ``extends`` key is left."""
    return _resolve(Path(path), ())


EXTENDS = "extends"


def deep_merge(base: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """``child`` over ``base``: mappings merge key by key, anything else (lists, scalars,
    null) replaces; neither argument is changed."""
    out = dict(base)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _resolve(p: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    here = p.resolve()
    if here in chain:
        loop = " -> ".join(os.path.relpath(q) for q in (*chain[chain.index(here) :], here))
        raise ConfigError(f"{p}: extends cycle: {loop}")
    raw = _read_mapping(p)
    if EXTENDS not in raw:
        return raw
    parent = raw.pop(EXTENDS)
    if not isinstance(parent, str) or not parent.strip():
        raise ConfigError(f"{p}: extends: expected the path of a base sweep file, got {parent!r}")
    base = Path(os.path.expanduser(parent))
    if not base.is_absolute():  # relative to the file that says it, not to the working dir
        base = p.parent / base
    if not base.is_file():
        raise ConfigError(f"{p}: extends: {parent}: base file not found ({base})")
    return deep_merge(_resolve(base, (*chain, here)), raw)


def nested_diff(values: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``values`` that differ from ``defaults``, nested as in ``values``:
    mappings are compared key by key, lists and scalars as wholes."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        default = defaults.get(key)
        if isinstance(value, dict) and isinstance(default, dict):
            inner = nested_diff(value, default)
            if inner:
                out[key] = inner
        elif key not in defaults or value != default:
            out[key] = value
    return out


def _read_mapping(p: Path) -> dict[str, Any]:
    if not p.is_file():
        raise ConfigError(f"{p}: sweep file not found")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: invalid YAML: {_first_line(e)}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not a text file") from None
    if raw is None:  # an empty file (or comments only) is almost always a mistake
        raise ConfigError(
            f"{p}: the sweep file is empty; write at least a name (see sweeps/smoke.yaml)"
        )
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{p}: the top level must be a mapping of sections, got {type(raw).__name__}"
        )
    return raw
