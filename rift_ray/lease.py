"""One driver per sweep: a lease file in the sweep's storage, renewed while the sweep runs.

    with SweepLease(store):          # LeaseHeld (exit 2, one line) when another driver holds it
        ...                          # the stages run; a thread renews the heartbeat

``<sweep>/lease.json`` holds the holder's host, pid, start time, heartbeat and a random token.
A lease whose heartbeat is older than ``timeout`` seconds (its driver died without releasing
it), or whose holder ran on this machine and no longer exists (a killed driver, run again), is
taken over with a warning. On local disk a new lease is created with ``O_EXCL``, so two
drivers starting together cannot both create it; on object stores (no conditional writes in
pyarrow's filesystems) the lease is written and read back after a short pause, and the driver
whose token is not the one read back gives way: a best effort that closes the window to well
under a second. ``rift-ray status`` shows the holder.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from typing import Any

from rift_ray.store import LEASE, StorageError, Store

TIMEOUT_S = 120.0
"""A heartbeat older than this is a dead driver's."""


class LeaseHeld(StorageError):
    """Another driver runs this sweep (exit code 2, one line naming it)."""


def read_lease(store: Store) -> dict[str, Any] | None:
    """The lease in ``store`` (None when there is none or it cannot be read)."""
    lease = store.read_json_file(LEASE)
    return lease if isinstance(lease, dict) and "token" in lease else None


def describe(lease: dict[str, Any], now: float | None = None) -> str:
    """``host pid 123 since 2026-12-04 17:10:03 (heartbeat 4 s ago)``."""
    now = time.time() if now is None else now
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(lease.get("started", 0)))
    beat = max(0, int(now - float(lease.get("heartbeat", 0))))
    return f"{lease.get('host')} pid {lease.get('pid')} since {since} (heartbeat {beat} s ago)"


def _gone(lease: dict[str, Any]) -> bool:
    """The holder ran on this machine and its process no longer exists (a killed driver whose
    sweep is run again here: no need to wait out its heartbeat)."""
    if lease.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(lease.get("pid", 0)), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError, OverflowError):
        return False
    return int(lease.get("pid", 0)) <= 0


class SweepLease:
    """The lease of one sweep (see the module docstring); a context manager."""

    def __init__(self, store: Store, *, timeout: float = TIMEOUT_S) -> None:
        self.store, self.timeout = store, timeout
        self.token = uuid.uuid4().hex
        now = time.time()
        self.lease = {"host": socket.gethostname(), "pid": os.getpid(), "started": now,
                      "heartbeat": now, "token": self.token}  # fmt: skip
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._created: list[str] = []

    def __enter__(self) -> SweepLease:
        held = read_lease(self.store)
        if held is not None and held["token"] != self.token:
            age = time.time() - float(held.get("heartbeat", 0))
            gone = _gone(held)
            if age < self.timeout and not gone:
                raise LeaseHeld(self._busy(held))
            why = "is gone" if gone else "stopped renewing it"
            print(f"[rift-ray] warning: taking over the lease of a driver that {why}: "
                  f"{describe(held)}", file=sys.stderr, flush=True)  # fmt: skip
            self._write()
        else:
            self._create()
        time.sleep(0.0 if self.store.is_local else 0.5)  # object stores: let a racer land
        now_held = read_lease(self.store)
        if now_held is None or now_held["token"] != self.token:
            raise LeaseHeld(self._busy(now_held or {}))
        self._thread = threading.Thread(target=self._renew, name="rift-lease", daemon=True)
        self._thread.start()
        return self

    def _busy(self, held: dict[str, Any]) -> str:
        return (f"sweep {self.store.uri} is being run by another driver: {describe(held)}; "
                f"wait for it, or remove {self.store.uri}/{LEASE} if that driver is gone")  # fmt: skip

    def _create(self) -> None:
        """Create the lease; on local disk only if no other driver created it first."""
        if not self.store.is_local:
            self._write()
            return
        path = self.store.path(LEASE)
        d = os.path.dirname(path)
        while not os.path.isdir(d):
            self._created.insert(0, d)
            d = os.path.dirname(d)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            raise LeaseHeld(self._busy(read_lease(self.store) or {})) from None
        with os.fdopen(fd, "w") as f:
            json.dump(self.lease, f)

    def _write(self) -> None:
        self.store.write_file(LEASE, json.dumps(self.lease).encode())

    def _renew(self) -> None:
        while not self._stop.wait(self.timeout / 4):
            held = read_lease(self.store)
            if held is not None and held["token"] != self.token:
                print(f"[rift-ray] warning: another driver took over this sweep's lease: "
                      f"{describe(held)}", file=sys.stderr, flush=True)  # fmt: skip
                return
            self.lease["heartbeat"] = time.time()
            try:
                self._write()
            except Exception:  # noqa: BLE001 - renewal is retried at the next beat
                pass

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        held = read_lease(self.store)
        if held is not None and held["token"] == self.token:
            self.store.delete(LEASE)
        for d in reversed(self._created):  # a sweep refused at once leaves no directory
            if os.path.isdir(d) and not os.listdir(d):
                os.rmdir(d)
