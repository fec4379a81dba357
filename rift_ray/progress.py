"""Progress a person can follow: a live bar on a terminal, plain lines in logs (CI).

    with Progress("interpolate", total=67, unit="alpha points") as bar:
        for ref in finished_tasks():
            bar.advance(points_in(ref))

    log("stage 2/4 mrc: 12 modules, one Tune trial each")   # one line, "[rift-ray] ..."

A bar is drawn (rich) only when stderr is a terminal, ``TERM`` is not ``dumb`` and
``CI`` is not set; otherwise a line is printed for the first and last item, each
10 % crossed, and at most every ``min_interval`` seconds in between.
"""

from __future__ import annotations

import os
import sys
import time
from typing import IO, Any


def log(msg: str) -> None:
    """One line for the person running the sweep, on stderr: ``[rift-ray] <msg>``."""
    print(f"[rift-ray] {msg}", file=sys.stderr, flush=True)


def duration(seconds: float | None) -> str:
    """12s, 3m05s, 2h14m."""
    if seconds is None:
        return ""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def interactive(stream: IO[str] | None = None) -> bool:
    """True when ``stream`` (default stderr) is a terminal a person is watching."""
    stream = stream or sys.stderr
    isatty = getattr(stream, "isatty", None)
    return bool(
        isatty and isatty() and os.environ.get("TERM") != "dumb" and not os.environ.get("CI")
    )


class Progress:
    """Counts finished work items out of ``total``; a context manager."""

    def __init__(
        self,
        label: str,
        total: int,
        unit: str = "",
        *,
        stream: IO[str] | None = None,
        live: bool | None = None,
        min_interval: float = 10.0,
    ) -> None:
        self.label, self.total, self.unit = label, max(int(total), 0), unit
        self.stream = stream or sys.stderr
        self.live = interactive(self.stream) if live is None else live
        self.min_interval = min_interval
        self.done = 0
        self._t0 = self._last = time.monotonic()
        self._bar: Any = None
        self._task: Any = None

    def __enter__(self) -> Progress:
        self._t0 = self._last = time.monotonic()
        if self.live:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn(f"[rift-ray] {self.label}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn(self.unit),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=Console(file=self.stream),
                transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task(self.label, total=self.total or None)
        return self

    def advance(self, n: int = 1) -> None:
        """``n`` more items are finished."""
        before, self.done = self.done, min(self.done + n, self.total or self.done + n)
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done)
            return
        now = time.monotonic()
        tenth = (lambda d: 10 * d // self.total) if self.total else (lambda d: 0)
        if (
            before == 0
            or self.done >= self.total
            or tenth(self.done) > tenth(before)
            or now - self._last >= self.min_interval
        ):
            self._last = now
            print(self.line(), file=self.stream, flush=True)

    def line(self) -> str:
        """``[rift-ray] interpolate: 12/67 alpha points (18%), 1m02s elapsed, ~4m44s left``."""
        elapsed = time.monotonic() - self._t0
        text = f"[rift-ray] {self.label}: {self.done}/{self.total} {self.unit}".rstrip()
        if self.total:
            text += f" ({100 * self.done // self.total}%)"
        text += f", {duration(elapsed)} elapsed"
        if 0 < self.done < self.total:
            text += f", ~{duration(elapsed / self.done * (self.total - self.done))} left"
        return text

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.stop()


class TrialBoard:
    """The trials of one Tune stage: on a terminal a compact table refreshed in place (the
    running trials and the latest ended ones, at most ``rows``); elsewhere a :class:`Progress`
    line as trials end. A context manager; :meth:`update` takes each report and each end."""

    def __init__(
        self,
        label: str,
        total: int,
        metric: str,
        *,
        stream: IO[str] | None = None,
        live: bool | None = None,
        rows: int = 8,
    ) -> None:
        self.label, self.total, self.metric, self.rows = label, total, metric, rows
        self.stream = stream or sys.stderr
        self.live = interactive(self.stream) if live is None else live
        self.trials: dict[str, dict[str, Any]] = {}
        self._progress = Progress(label, total, "trials ended", stream=self.stream, live=False)
        self._screen: Any = None
        self._t0 = time.monotonic()

    def __enter__(self) -> TrialBoard:
        self._t0 = time.monotonic()
        if self.live:
            from rich.console import Console
            from rich.live import Live

            self._screen = Live(
                self._table(), console=Console(file=self.stream), refresh_per_second=2
            )
            self._screen.start()
        return self

    def update(
        self, name: str, status: str, iteration: int | None = None, value: Any = None
    ) -> None:
        """A trial reported (``status`` running) or ended (finished, stopped, failed, done)."""
        was = self.trials.get(name, {}).get("status")
        t = self.trials.setdefault(name, {})
        t.update(status=status, order=len(self.trials) if was is None else t.get("order"))
        if iteration is not None:
            t["iter"] = iteration
        if value is not None:
            t["value"] = value
        if status != "running":
            t["ended"] = time.monotonic()
        if self._screen is not None:
            self._screen.update(self._table())
        elif status != "running" and was in (None, "running"):
            self._progress.advance(1)

    def _table(self) -> Any:
        from rich.table import Table

        ended = [t for t in self.trials.values() if t["status"] != "running"]
        failed = sum(t["status"] == "failed" for t in ended)
        title = (
            f"[rift-ray] {self.label}: {len(ended)}/{self.total} trials ended"
            + (f", {failed} failed" if failed else "")
            + f", {duration(time.monotonic() - self._t0)}"
        )
        from rich.text import Text

        table = Table(title=Text(title), title_justify="left", box=None, pad_edge=False)
        for col in ("trial", "status", "iter", self.metric):
            table.add_column(col, justify="left" if col in ("trial", "status") else "right")
        running = [(n, t) for n, t in self.trials.items() if t["status"] == "running"]
        done = sorted(
            ((n, t) for n, t in self.trials.items() if t["status"] != "running"),
            key=lambda x: -x[1]["ended"],
        )
        for name, t in (running + done)[: self.rows]:
            v = t.get("value")
            table.add_row(
                name,
                t["status"],
                str(t.get("iter", "")),
                f"{v:.4g}" if isinstance(v, float) else "",
            )
        return table

    def __exit__(self, *exc: Any) -> None:
        if self._screen is not None:
            self._screen.update(self._table())
            self._screen.stop()
