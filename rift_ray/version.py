"""``rift-ray --version``: this package's version and those of the two libraries that decide
what a sweep computes and how it runs (torch, ray), read from package metadata so that
printing them imports neither."""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
from importlib import metadata
from typing import Any

import rift_ray


def _installed(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def version_line() -> str:
    """E.g. ``rift-ray 0.1.0 (torch 2.14.1, ray 2.60.0, python 3.10.12)``."""
    return (
        f"rift-ray {rift_ray.__version__} (torch {_installed('torch')}, "
        f"ray {_installed('ray')}, python {platform.python_version()})"
    )


class VersionAction(argparse.Action):
    """``--version``: print :func:`version_line` and exit 0 (computed only when asked)."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        kwargs.setdefault(
            "help", "print the versions of rift-ray, torch, ray and python, then exit"
        )
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        print(version_line())
        parser.exit()


def git_info(path: str | None = None) -> dict[str, Any] | None:
    """``{"sha": <commit>, "dirty": <uncommitted changes to tracked files>}`` of the git
    checkout holding ``path`` (default: this package's source); None when it is not in one
    (an installed wheel) or git is missing."""
    where = path or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", where, *args], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        sha = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return {"sha": sha, "dirty": dirty} if sha else None
