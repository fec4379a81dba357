"""What Ray prints goes to the sweep's log file, so the console keeps to what a person reads.

    with RayOutput(store, verbose=False) as out:   # Ray's loggers: into the file
        ray.init(...)
        out.attach_workers()                         # Ray's forwarded worker output too
        ...                                          # the stages run
    out.path                                         # <sweep>/logs/ray.log (local storage)

While a sweep runs, two streams are redirected to ``<sweep>/logs/ray.log``:

- the output of Ray's workers and actors that Ray forwards to the driver (Tune trials, Ray
  Train's controller and workers, tasks; Ray's "Reporting training result", "Checkpoint
  successfully created" and autoscaling-coordinator messages among them);
- the records of the driver's own ``ray.*`` loggers (Tune and Train in this process).

With ``verbose`` (``rift-ray sweep -v``) both go to the console as well. With object storage
the file is written locally and uploaded to ``<sweep>/logs/ray.log`` when the sweep ends.
Both hooks are restored on exit, so a notebook or test session gets Ray's console back.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from typing import IO, Any

from rift_ray.store import RAY_LOG, Store

_shown = True
"""Whether Ray's own console output is wanted now (False inside a sweep without ``-v``)."""


def ray_console() -> bool:
    """True unless a sweep runs without ``verbose``: then Tune prints nothing of its own."""
    return _shown


class RayOutput:
    """A context manager: Ray's output into ``path`` (see the module docstring)."""

    def __init__(self, store: Store, *, verbose: bool = False) -> None:
        self.store, self.verbose = store, verbose
        self.path = (
            store.path(RAY_LOG)
            if store.is_local
            else os.path.join(tempfile.mkdtemp(prefix="rift-ray-logs-"), "ray.log")
        )
        self.file: IO[str] | None = None
        self._saved_handlers: list[Any] | None = None
        self._saved_loggers: list[tuple[logging.Logger, list[logging.Handler], bool]] = []
        self._file_handler: logging.Handler | None = None
        self._created: list[str] = []
        self._new_file = False

    @property
    def shown_path(self) -> str:
        """Where the user finds the log: in the sweep's storage (uploaded at the end)."""
        return f"{self.store.uri}/{RAY_LOG}"

    def __enter__(self) -> RayOutput:
        try:
            d, self._created = os.path.dirname(self.path), []
            while not os.path.isdir(d):  # what a refused sweep must not leave behind
                self._created.insert(0, d)
                d = os.path.dirname(d)
            self._new_file = not os.path.exists(self.path)
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            if not self.store.is_local and self.store.exists(RAY_LOG):  # earlier runs' output
                with open(self.path, "wb") as f:
                    f.write(self.store.read_bytes(RAY_LOG))
            self.file = open(self.path, "a", buffering=1, encoding="utf-8", errors="replace")
        except OSError as e:  # no log file: Ray's output stays on the console
            print(f"[rift-ray] warning: cannot write {self.path} ({e}); Ray's output stays on "
                  "the console", file=sys.stderr, flush=True)  # fmt: skip
            return self
        self.file.write(f"\n===== rift-ray sweep {time.strftime('%Y-%m-%d %H:%M:%S')} =====\n")
        self._redirect_loggers()
        global _shown
        self._was_shown, _shown = _shown, self.verbose
        return self

    def attach_workers(self) -> None:
        """Once Ray is initialised: Ray's driver-side dispatcher of forwarded worker output
        writes to our file instead of (with ``verbose``: besides) the console."""
        if self.file is None or self._saved_handlers is not None:
            return
        try:
            from ray._private.ray_logging import global_worker_stdstream_dispatcher as disp
        except ImportError:  # another Ray: its output stays on the console
            return
        f = self.file

        def to_file(data: dict[str, Any]) -> None:
            who = data.get("actor_name") or data.get("task_name") or ""
            ip = data.get("ip")
            where = f"({who} pid={data.get('pid')}{'' if ip == data.get('localhost') else f', ip={ip}'})"
            try:
                for line in data.get("lines", []):
                    f.write(f"{where} {line}\n")  # type: ignore[union-attr]
            except Exception:  # noqa: BLE001 - a log line never fails the sweep
                pass

        with disp._lock:
            self._saved_handlers = list(disp.handlers)
            kept = self._saved_handlers if self.verbose else []
            disp.handlers = [*kept, ("rift_ray_log_file", to_file)]

    def _redirect_loggers(self) -> None:
        """The driver's ``ray`` loggers: into the file; their console handlers off unless
        ``verbose``."""
        assert self.file is not None
        handler = logging.StreamHandler(self.file)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self._file_handler = handler
        names = ["ray", *(n for n in logging.Logger.manager.loggerDict if n.startswith("ray."))]
        for name in names:
            logger = logging.getLogger(name)
            if not logger.handlers and name != "ray":
                continue
            self._saved_loggers.append((logger, list(logger.handlers), logger.propagate))
            consoles = [
                h for h in logger.handlers
                if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
            ]  # fmt: skip
            if not self.verbose:
                for h in consoles:
                    logger.removeHandler(h)
            if name == "ray":
                logger.addHandler(handler)
            elif consoles:  # a child that printed on its own now writes to the file
                logger.addHandler(handler)
                logger.propagate = False

    def __exit__(self, *exc: Any) -> None:
        global _shown
        _shown = getattr(self, "_was_shown", _shown)
        if self._saved_handlers is not None:
            from ray._private.ray_logging import global_worker_stdstream_dispatcher as disp

            with disp._lock:
                disp.handlers = self._saved_handlers
        for logger, handlers, propagate in self._saved_loggers:
            for h in list(logger.handlers):
                logger.removeHandler(h)
            for h in handlers:
                logger.addHandler(h)
            logger.propagate = propagate
        if self.file is not None:
            self.file.close()
            if self._saved_handlers is None and self._new_file:  # refused before Ray ran
                os.unlink(self.path)
                for d in reversed(self._created):
                    if not os.listdir(d):
                        os.rmdir(d)
                return
            if not self.store.is_local:
                try:
                    with open(self.path, "rb") as fh:
                        self.store.write_file(RAY_LOG, fh.read())
                except Exception as e:  # noqa: BLE001 - the local copy stays
                    print(f"[rift-ray] warning: uploading {RAY_LOG} failed ({e}); it is in "
                          f"{self.path}", file=sys.stderr, flush=True)  # fmt: skip
