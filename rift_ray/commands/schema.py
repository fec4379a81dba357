"""``rift-ray schema``: the JSON schema of a sweep file, for editors and other tools.

    rift-ray schema                          # print it
    rift-ray schema -o sweeps/schema.json    # write it (the committed copy; a test keeps it current)

With the YAML language server (VS Code's YAML extension, neovim, Helix, ...) a sweep file's
first line ``# yaml-language-server: $schema=schema.json`` (the path relative to that file)
gives completion, the field docstrings on hover and red marks on unknown keys: docs/config.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from rift_ray.config import ConfigError, SweepConfig
from rift_ray.config_text import EXTENDS

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def sweep_schema() -> dict[str, Any]:
    """pydantic's JSON schema of :class:`SweepConfig` (validation mode: what a file may say,
    e.g. ``eps: 8/255``), plus the top-level ``extends`` key that is resolved before validation."""
    schema = SweepConfig.model_json_schema()
    props = schema["properties"]
    schema["properties"] = {
        EXTENDS: {
            "type": "string",
            "title": "Extends",
            "description": "A base sweep file (path relative to this one): its keys, with this "
            "file's merged over them (mappings key by key; lists and scalars replace).",
        },
        **props,
    }
    return {"$schema": SCHEMA_DIALECT, **_bounds_on_numbers(schema)}


_BOUNDS = {"gt": "exclusiveMinimum", "ge": "minimum", "lt": "exclusiveMaximum", "le": "maximum"}


def _bounds_on_numbers(node: Any) -> Any:
    """pydantic leaves a fraction field's bounds as ``gt``/``le`` beside ``anyOf: [number,
    string]``, which JSON schema ignores: move them onto the number branch, as standard keys."""
    if isinstance(node, list):
        return [_bounds_on_numbers(x) for x in node]
    if not isinstance(node, dict):
        return node
    loose = "anyOf" in node  # only there: elsewhere a key named "le" could be a field
    out = {k: _bounds_on_numbers(v) for k, v in node.items() if not (loose and k in _BOUNDS)}
    if loose:
        bounds = {_BOUNDS[k]: v for k, v in node.items() if k in _BOUNDS}
        for branch in out["anyOf"]:
            if branch.get("type") == "number":
                branch.update(bounds)
    return out


def schema_text() -> str:
    """:func:`sweep_schema` as the text ``rift-ray schema`` prints (2-space JSON, newline)."""
    return json.dumps(sweep_schema(), indent=2) + "\n"


def cmd_schema(args: argparse.Namespace) -> int:
    text = schema_text()
    if args.output in (None, "-"):
        print(text, end="")
        return 0
    out = Path(args.output)
    if not out.parent.is_dir():
        raise ConfigError(f"-o {args.output}: directory {out.parent} does not exist")
    out.write_text(text)
    print(f"rift-ray: wrote the sweep schema to {out}")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser(
        "schema", help="the JSON schema of a sweep file (editor completion: docs/config.md)"
    )
    p.add_argument("-o", "--output", metavar="FILE", help="write it to FILE instead of printing it")
    p.set_defaults(func=cmd_schema)
