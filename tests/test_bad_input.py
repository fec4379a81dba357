"""Bad input through the CLI: exit code 2, one line naming the field, no traceback, no storage.

Every case runs ``rift-ray sweep`` on a small synthetic sweep with one thing wrong and
checks: exit code 2, stderr is exactly one line ``rift-ray: error: <field>...``, and the
storage directory was never created (the writability probe removes what it made).
No case starts Ray or computes anything: config errors are found when the YAML is
validated, everything else (paths, checkpoints, module names, storage) in
``checks.preflight`` before any compute.

Unit tests elsewhere: checkpoint loading (weights-only, crafted pickles, truncated
files) in tests/test_checkpoint.py, archive members escaping the extraction dir in
tests/test_data.py::test_unsafe_archive_refused, checksums in tests/test_store.py.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from rift_ray.checkpoint import save_checkpoint
from rift_ray.cli import main
from rift_ray.models import build_model

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "sweeps" / "smoke.yaml")
TINY = [
    "--set", "data.synthetic.train_size=200",
    "--set", "data.synthetic.test_size=50",
    "--set", "data.val_size=50",
]  # fmt: skip


def _ckpt(arch: str = "small_resnet") -> bytes:
    buf = io.BytesIO()
    model = build_model(arch, 10)
    save_checkpoint(buf, model.state_dict(), arch=arch, num_classes=10, dataset="synthetic",
                    mean=[0.5] * 3, std=[0.25] * 3)  # fmt: skip
    return buf.getvalue()


class _RunsCode:
    """A pickle that creates a file when unpickled without weights_only (i.e. runs code)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.mkdir, (self.marker,))


def _yaml(tmp: Path, text: str) -> str:
    p = tmp / "sweep.yaml"
    p.write_text(text)
    return str(p)


def _file(tmp: Path, data: bytes, name: str = "at.pt") -> str:
    p = tmp / name
    p.write_bytes(data)
    return str(p)


def _truncated(tmp: Path) -> str:
    blob = _ckpt()
    return _file(tmp, blob[: len(blob) // 2])


def _crafted(tmp: Path) -> str:
    p = tmp / "at.pt"
    torch.save({"state_dict": {"w": _RunsCode(str(tmp / "pwned"))}}, p)
    return str(p)


def _cifar_c_root(tmp: Path) -> str:
    (tmp / "cifar-c").mkdir()
    (tmp / "cifar-c" / "labels.npy").write_bytes(b"")
    return str(tmp / "cifar-c")


# (id, sweep file or a function of tmp giving it, extra args (``{tmp}`` is replaced), field)
Case = tuple[str, str | Callable[[Path], str], list[str], str]
CASES: list[Case] = [
    # the file itself
    ("invalid-yaml", lambda t: _yaml(t, "name: x\ndata: [unclosed\n"), [], "{sweep}: invalid YAML"),
    ("not-a-mapping", lambda t: _yaml(t, "- a\n- b\n"), [], "{sweep}: the top level"),
    ("empty-file", lambda t: _yaml(t, ""), [], "{sweep}: the sweep file is empty"),
    ("comments-only", lambda t: _yaml(t, "# name: x\n"), [], "{sweep}: the sweep file is empty"),
    ("no-such-file", lambda t: str(t / "nope.yaml"), [], "{sweep}: sweep file not found"),
    ("binary-file", lambda t: _file(t, b"\xff\xfe\x00garbage", "s.yaml"), [], "{sweep}: not a text file"),
    # unknown keys and sections
    ("unknown-key-in-file", lambda t: _yaml(t, "adv_train: {epochz: 3}\n"), [], "adv_train.epochz: unknown key"),
    ("unknown-key", SMOKE, ["--set", "mrc.foo=1"], "mrc.foo: unknown key"),
    ("unknown-section", SMOKE, ["--set", "optimizer.lr=0.1"], "optimizer: unknown key"),
    ("malformed-set", SMOKE, ["--set", "finetune.lrs"], "--set 'finetune.lrs': expected KEY=VALUE"),
    ("set-into-scalar", SMOKE, ["--set", "seed.x=1"], "seed: is not a section"),
    # wrong types
    ("wrong-type-int", SMOKE, ["--set", "adv_train.epochs=two"], "adv_train.epochs:"),
    ("wrong-type-list", SMOKE, ["--set", "finetune.lrs=0.01"], "finetune.lrs:"),
    ("wrong-type-bool", SMOKE, ["--set", "data.augment=maybe"], "data.augment:"),
    ("wrong-type-section", SMOKE, ["--set", "attack=5"], "attack:"),
    ("fractional-int", SMOKE, ["--set", "mrc.epochs=2.5"], "mrc.epochs:"),
    # zero / negative
    ("negative-eps", SMOKE, ["--set", "attack.eps=-8/255"], "attack.eps: must be > 0"),
    ("zero-eps", SMOKE, ["--set", "attack.eps=0"], "attack.eps: must be > 0"),
    ("eps-above-1", SMOKE, ["--set", "attack.eps=2"], "attack.eps: must be <= 1"),
    ("zero-steps", SMOKE, ["--set", "attack.steps=0"], "attack.steps: must be > 0"),
    ("zero-epochs", SMOKE, ["--set", "adv_train.epochs=0"], "adv_train.epochs: must be > 0"),
    ("negative-at-lr", SMOKE, ["--set", "adv_train.lr=-0.1"], "adv_train.lr: must be > 0"),
    ("zero-ft-lr", SMOKE, ["--set", "finetune.lrs=[0.01,0]"], "finetune.lrs[1]: must be > 0"),
    ("zero-mrc-epsilon", SMOKE, ["--set", "mrc.epsilon=0"], "mrc.epsilon: must be > 0"),
    ("negative-mrc-epochs", SMOKE, ["--set", "mrc.epochs=-1"], "mrc.epochs: must be > 0"),
    ("zero-batch", SMOKE, ["--set", "finetune.batch_size=0"], "finetune.batch_size: must be > 0"),
    ("zero-val-size", SMOKE, ["--set", "data.val_size=0"], "data.val_size: must be > 0"),
    ("val-size-too-big", SMOKE, ["--set", "data.val_size=150"], "data.val_size:"),
    # empty lists
    ("empty-lrs", SMOKE, ["--set", "finetune.lrs=[]"], "finetune.lrs: must not be empty"),
    ("empty-alphas", SMOKE, ["--set", "interpolate.alphas=[]"], "interpolate.alphas: must not be empty"),
    ("empty-metric-alphas", SMOKE, ["--set", "finetune.metric_alphas=[]"], "finetune.metric_alphas: must not be empty"),
    # unknown architecture / dataset, bad name
    ("unknown-arch", SMOKE, ["--set", "model.arch=vgg16"], "model.arch: must be one of"),
    ("unknown-dataset", SMOKE, ["--set", "data.dataset=mnist"], "data.dataset: must be one of"),
    ("bad-name", SMOKE, ["--name", "../escape"], "name:"),
    # paths
    ("missing-checkpoint", SMOKE, ["--set", "adv_train.checkpoint={tmp}/nope.pt"], "adv_train.checkpoint: file not found"),
    ("unset-env-in-path", SMOKE, ["--set", "adv_train.checkpoint=${RIFT_TEST_UNSET}/at.pt"], "adv_train.checkpoint:"),
    ("missing-data-dir", SMOKE, ["--set", "data.dataset=imagefolder", "--set", "data.root={tmp}/nope"], "data.root:"),
    ("missing-cifar-no-download", SMOKE,
     ["--set", "data.dataset=cifar10", "--set", "data.root={tmp}/nope", "--set", "data.download=false"], "data.root:"),
    ("corruptions-without-root", SMOKE, ["--set", "eval.corruptions=[fog]"], "eval.cifar_c_root: required"),
    ("corruption-file-missing", SMOKE, ["--set", "eval.corruptions=[fog]", "--set", "eval.cifar_c_root={cifar_c}"],
     "eval.corruptions:"),
    ("storage-under-a-file", SMOKE, ["--storage", "{tmp}/a-file/storage"], "storage: "),
    ("storage-bad-uri", SMOKE, ["--storage", "nosuchscheme://bucket/x"], "storage: "),
    # modules
    ("module-not-in-model", SMOKE, ["--set", "mrc.include=[nope]"], "mrc.include: 'nope' matches no"),
    ("every-module-excluded", SMOKE, ["--set", "mrc.exclude=['*']"], "mrc.exclude:"),
    # checkpoints
    ("truncated-checkpoint", SMOKE, ["--set", "adv_train.checkpoint={truncated}"], "adv_train.checkpoint:"),
    ("garbage-checkpoint", SMOKE, ["--set", "adv_train.checkpoint={garbage}"], "adv_train.checkpoint:"),
    ("empty-checkpoint", SMOKE, ["--set", "adv_train.checkpoint={empty}"], "adv_train.checkpoint:"),
    ("wrong-arch-checkpoint", SMOKE, ["--set", "adv_train.checkpoint={wrong_arch}"], "adv_train.checkpoint:"),
    ("crafted-pickle", SMOKE, ["--set", "adv_train.checkpoint={crafted}"], "adv_train.checkpoint:"),
]  # fmt: skip


def _materialize(
    tmp: Path, sweep: str | Callable[[Path], str], args: list[str]
) -> tuple[str, list[str]]:
    (tmp / "a-file").write_text("a file where a directory is expected")
    files: dict[str, Callable[[Path], str]] = {
        "truncated": _truncated,
        "garbage": lambda t: _file(t, b"PK\x03\x04 this is not a checkpoint" * 10),
        "empty": lambda t: _file(t, b""),
        "wrong_arch": lambda t: _file(t, _ckpt("small_cnn")),
        "crafted": _crafted,
        "cifar_c": _cifar_c_root,
    }
    subs = {"tmp": str(tmp)}
    for key, make in files.items():
        if any("{" + key + "}" in a for a in args):
            subs[key] = make(tmp)
    out = []
    for a in args:
        for k, v in subs.items():
            a = a.replace("{" + k + "}", v)
        out.append(a)
    return (sweep(tmp) if callable(sweep) else sweep), out


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_line(
    case: Case, tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, sweep_src, args, field = case
    monkeypatch.delenv("RIFT_TEST_UNSET", raising=False)
    sweep, args = _materialize(tmp_path, sweep_src, args)
    storage = tmp_path / "storage"
    has_storage = any(a == "--storage" for a in args)
    argv = ["sweep", sweep, *TINY, *args] + ([] if has_storage else ["--storage", str(storage)])
    code = main(argv)
    out, err = capfd.readouterr()
    lines = err.splitlines()
    expected = "rift-ray: error: " + field.replace("{sweep}", sweep)
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith(expected), err
    assert "Traceback" not in out + err
    assert not storage.exists(), "storage written for bad input"
    assert not (tmp_path / "a-file" / "storage").exists()
    assert not (tmp_path / "pwned").exists(), "the crafted pickle ran code"
    if case[0] == "crafted-pickle":
        assert "refused" in lines[0] and "weights-only" in lines[0]


def test_bad_input_leaves_an_existing_sweep_untouched(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """A resumable sweep dir is not modified by a re-run whose config is refused."""
    sweep_dir = tmp_path / "storage" / "t"
    (sweep_dir / "stages").mkdir(parents=True)
    (sweep_dir / "config.yaml").write_text("seed: 0\n")
    (sweep_dir / "stages" / "mrc.json").write_text('{"status": "done"}')
    before = {p: p.read_bytes() for p in sweep_dir.rglob("*") if p.is_file()}
    for bad in (["--set", "mrc.include=[nope]"], ["--set", "attack.steps=0"]):
        code = main(
            ["sweep", SMOKE, *TINY, "--storage", str(tmp_path / "storage"), "--name", "t", *bad]
        )
        assert code == 2
    capfd.readouterr()
    after = {p: p.read_bytes() for p in sweep_dir.rglob("*") if p.is_file()}
    assert after == before


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, field",
    [
        (["--set", "finetune.lrs=[0.01,-1]"], "finetune.lrs[1]: must be > 0"),
        (["--set", "mrc.include=[layer9.conv1]"], "mrc.include: 'layer9.conv1' matches no"),
    ],
    ids=["config", "prepare"],
)
def test_real_process_prints_one_line_no_traceback(
    tmp_path: Path, args: list[str], field: str
) -> None:
    """The installed command in a fresh process: nothing else on stderr (no import noise)."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONWARNINGS": "default"}
    proc = subprocess.run(
        [sys.executable, "-m", "rift_ray.cli", "sweep", SMOKE, *TINY, *args,
         "--storage", str(tmp_path / "storage")],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [proc.stderr.strip()], proc.stderr
    assert proc.stderr.startswith(f"rift-ray: error: {field}"), proc.stderr
    assert not (tmp_path / "storage").exists()


def test_crafted_checkpoint_is_a_real_code_carrying_pickle(tmp_path: Path) -> None:
    """Guard for the crafted-pickle case: loading it without weights_only does run code."""
    path = _crafted(tmp_path)
    with open(path, "rb") as f:
        assert b"mkdir" in f.read()
    torch.load(path, weights_only=False)  # the unsafe load the sweep never does
    assert (tmp_path / "pwned").is_dir()


def test_unknown_until_stage_is_refused(capfd: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["sweep", SMOKE, "--until", "evaluate"])
    assert exc.value.code == 2
    last = capfd.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("rift-ray: error: argument --until: invalid choice: 'evaluate'")
    from rift_ray.config import load_config
    from rift_ray.errors import SweepError
    from rift_ray.pipeline import run_sweep

    with pytest.raises(SweepError, match=r"^until: must be one of adv_train, mrc, finetune"):
        run_sweep(load_config(SMOKE), until="evaluate")
