"""The ``rift-ray`` subcommands around a sweep, one module each.

Every module here has ``register(sub)``, which adds its parser to ``rift-ray``'s subparsers
(``sub.add_parser(...)``, with ``set_defaults(func=...)``); ``rift_ray.cli.build_parser``
finds them all. ``func(args)`` returns the exit code; ConfigError, DataError, StorageError
and CheckpointError become one ``rift-ray: error: ...`` line and exit 2.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any


def register_all(sub: Any) -> None:
    """Add every command module's parser to ``sub`` (alphabetical order)."""
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        importlib.import_module(f"{__name__}.{info.name}").register(sub)
