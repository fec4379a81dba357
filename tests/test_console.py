"""The console of a sweep as a person sees it (a terminal, and ``TERM=dumb``), where Ray's own
output goes instead, and that a W&B key given to the driver is found nowhere.

Two drivers on the session's Ray instance: one under a pseudo-terminal (adversarial training
included, so its epoch lines show), one with ``TERM=dumb`` from a starting checkpoint up to MRC, online
W&B with a made-up key against a port where nothing listens.
"""

from __future__ import annotations

import os
import pty
import re
import select
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from test_faults import DRIVER, FOUR_MODULES, NO_WANDB, SMOKE, TINY, _env

ROOT = Path(__file__).resolve().parents[1]
KEY = "fedcba9876543210fedcba9876543210fedcba98"  # made up, 40 characters
WIDTH = 120
pytestmark = [pytest.mark.slow, pytest.mark.ray]


def screen_lines(raw: str, width: int = WIDTH) -> list[str]:
    """The non-empty lines a terminal of ``width`` columns shows once ``raw`` is written to
    it: carriage returns, cursor up/down, erase-line and wrapping applied (what a live table
    redraws in place counts once)."""
    lines, row, col, i = [""], 0, 0, 0
    while i < len(raw):
        c = raw[i]
        if c == "\x1b":
            m = re.match(r"\x1b\[([0-9;?]*)([A-Za-z])", raw[i:]) or re.match(
                r"\x1b\][^\x07\x1b]*(\x07|\x1b\\)", raw[i:]
            )
            if m and m.re.pattern.startswith("\\x1b\\["):
                arg, cmd = m.groups()
                n = int(arg) if arg.isdigit() else 1
                if cmd == "A":
                    row = max(0, row - n)
                elif cmd == "B":
                    row += n
                elif cmd == "K":
                    lines[row] = "" if arg == "2" else lines[row][:col]
                elif cmd == "G":
                    col = n - 1
            i += m.end() if m else 1
            while len(lines) <= row:
                lines.append("")
            continue
        if c == "\r":
            col = 0
        elif c == "\n" or col >= width:
            row, col = row + 1, 0
            if c != "\n":
                i -= 1  # wrap, then write the character on the next line
        else:
            line = lines[row].ljust(col)
            lines[row] = line[:col] + c + line[col + 1 :]
            col += 1
        while len(lines) <= row:
            lines.append("")
        i += 1
    return [ln for ln in lines if ln.strip()]


def run_in_pty(argv: list[str], env: dict[str, str], timeout: float = 600) -> str:
    """``argv`` with a pseudo-terminal of WIDTH columns as stdin, stdout and stderr."""
    import fcntl
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, WIDTH, 0, 0))
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=ROOT)
    os.close(slave)
    out, deadline = bytearray(), time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # the child closed the terminal
                    break
                if not data:
                    break
                out += data
            elif proc.poll() is not None:
                break
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        os.close(master)
    return out.decode(errors="replace")


@pytest.fixture(scope="module")
def consoles(ray_session: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    import torch

    from rift_ray.checkpoint import save_checkpoint
    from rift_ray.models import build_model

    tmp = tmp_path_factory.mktemp("console")
    torch.manual_seed(0)
    ckpt = tmp / "at.pt"
    save_checkpoint(ckpt, build_model("small_resnet", 10).state_dict(), arch="small_resnet",
                    num_classes=10, dataset="synthetic", mean=[0.5] * 3, std=[0.25] * 3)  # fmt: skip
    address = ray_session.get_runtime_context().gcs_address
    base = [
        *TINY,
        *FOUR_MODULES,
        "--set",
        "adv_train.epochs=2",
        "--set",
        "adv_train.lr_milestones=[2]",
    ]

    def argv(*sweep: str) -> list[str]:
        import json

        return [sys.executable, "-c", DRIVER, address, json.dumps([["sweep", SMOKE, *sweep]])]

    env = _env(TERM="xterm-256color", COLUMNS=str(WIDTH))
    env.pop("CI", None)  # a person at a terminal
    tty = run_in_pty(argv(*base, *NO_WANDB, "--storage", str(tmp), "--name", "tty"), env)

    wandb_env = {"WANDB_API_KEY": KEY, "WANDB_BASE_URL": "http://127.0.0.1:9",
                 "WANDB_INIT_TIMEOUT": "3", "TERM": "dumb"}  # fmt: skip
    dumb = subprocess.run(
        argv(*base, "--set", f"adv_train.checkpoint={ckpt}", "--set", "wandb.mode=null",
             "--storage", str(tmp), "--name", "dumb", "--until", "mrc"),
        env={k: v for k, v in _env(**wandb_env).items() if k != "WANDB_MODE"},
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    from ray._private.worker import _global_node

    return {"tmp": tmp, "tty": tty, "dumb": dumb, "session": _global_node.get_session_dir_path()}


def test_terminal_console_is_short_and_readable(consoles: dict[str, Any]) -> None:
    raw = consoles["tty"]
    shown = screen_lines(raw)
    text = "\n".join(shown)
    assert "=== exit 0 ===" in text, text[-3000:]
    print(f"{len(shown)} lines on the terminal ({raw.count(chr(10))} newlines written)")
    assert len(shown) <= 100, text
    for epoch in (1, 2):  # each adversarial-training epoch once
        assert len(re.findall(rf"adv_train: epoch {epoch}/2 ", text)) == 1, text
    for noise in ("Configuration for experiment", "Trial status", "Reporting training result",
                  "Checkpoint successfully created", "View detailed results", "TrainingReport"):  # fmt: skip
        assert noise not in raw, noise
    assert "RiFT sweep tty" in text and "mrc: 4/4 trials ended" in text, text
    log = (consoles["tmp"] / "tty/logs/ray.log").read_text()
    assert "Reporting training result" in log or "Checkpoint successfully created" in log


def test_dumb_terminal_gets_plain_lines(consoles: dict[str, Any]) -> None:
    proc = consoles["dumb"]
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "=== exit 0 ===" in out, out[-3000:]
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert len(lines) <= 100, out
    assert "\x1b[" not in out  # no cursor movement or colour on a dumb terminal
    warnings = [ln for ln in lines if "warning: W&B" in ln]
    assert len(warnings) == 1 and "cannot reach W&B" in warnings[0], warnings
    assert "Traceback" not in out


def test_wandb_key_is_found_nowhere(consoles: dict[str, Any]) -> None:
    """Given to the driver only; not in the output, the sweep's storage (config, tables, W&B
    runs, logs) or the Ray session's files (its logs, the job's runtime env)."""
    proc = consoles["dumb"]
    assert KEY not in proc.stdout + proc.stderr
    roots = [consoles["tmp"] / "dumb", Path(consoles["session"])]
    checked = 0
    for root in roots:
        for dirpath, _, files in os.walk(root):
            for f in files:
                path = Path(dirpath, f)
                if path.is_symlink() or not path.is_file() or path.suffix == ".sock":
                    continue
                try:
                    data = path.read_bytes()
                except OSError:
                    continue
                checked += 1
                assert KEY.encode() not in data, path
    assert checked > 20
    assert (consoles["tmp"] / "dumb/wandb/runs.json").is_file()  # W&B did log (offline)
