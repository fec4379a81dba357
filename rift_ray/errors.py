"""One line of error text for the user, a table row or a stage record."""

from __future__ import annotations

from typing import Any


class SweepError(RuntimeError):
    """A sweep that cannot go on; the message is one line for the user."""


class DataError(ValueError):
    """Data that cannot be loaded; the message is one line naming the path or field."""


class StageFailed(Exception):
    """A stage without a usable result: ``message`` (one line) for the user; ``record``: the
    fields its stage record keeps (e.g. ``error``)."""

    def __init__(self, message: str, **record: Any) -> None:
        super().__init__(message)
        self.record = record


TRACEBACK = "Traceback (most recent call last)"


def one_line(e: BaseException | str, *, typed: bool = False, limit: int = 300) -> str:
    """``e`` as one line of at most ``limit`` characters.

    A Ray task error is reduced to the exception it carries (``.cause``). A text that holds
    a traceback (Ray and Tune print the worker's) keeps its last line, which names the
    error; any other text keeps all its words, on one line. ``typed``: lead with the
    exception's type (``ValueError: ...``), as trial and task rows do.
    """
    if isinstance(e, BaseException) and getattr(e, "cause", None) is not None:
        e = e.cause  # type: ignore[attr-defined]
    text = str(e).strip()
    if TRACEBACK in text:
        lines = [line for line in text.splitlines() if line.strip()]
        return lines[-1].strip()[:limit]
    msg = " ".join(text.split())
    if typed and isinstance(e, BaseException):
        msg = f"{type(e).__name__}: {msg}"
    return msg[:limit]
