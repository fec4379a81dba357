"""Config: defaults match RIFT.md, errors name their field, overrides validate like the file."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from rift_ray.cli import main
from rift_ray.config import ConfigError, load_config

SWEEPS = Path(__file__).resolve().parents[1] / "sweeps"


def test_defaults_follow_the_paper() -> None:
    cfg = load_config()
    assert cfg.attack.eps == pytest.approx(8 / 255) and cfg.attack.step_size == pytest.approx(
        2 / 255
    )
    assert cfg.attack.steps == 10
    assert (cfg.adv_train.epochs, cfg.adv_train.lr, cfg.adv_train.lr_milestones) == (
        110,
        0.1,
        [100, 105],
    )
    assert (cfg.mrc.epsilon, cfg.mrc.epochs, cfg.mrc.batch_size, cfg.mrc.lr) == (0.1, 10, 512, 1.0)
    assert cfg.mrc.projection == "epoch"
    assert (cfg.finetune.epochs, cfg.finetune.lr_milestones, cfg.finetune.batch_size) == (
        10,
        [5],
        128,
    )
    assert cfg.interpolate.alphas == pytest.approx([i / 10 for i in range(11)])
    assert cfg.interpolate.tolerance == 0.1
    assert cfg.data.dataset == "synthetic" and cfg.data.val_size is None


def test_config_is_frozen() -> None:
    cfg = load_config()
    with pytest.raises(ValidationError, match="frozen"):
        cfg.mrc.epsilon = 0.2  # type: ignore[misc]


@pytest.mark.parametrize(
    "override, message",
    [
        ("finetune.lrs=[0.001,0.005,-1]", "finetune.lrs[2]: must be > 0"),
        ("finetune.lrs=[]", "finetune.lrs: must not be empty"),
        ("mrc.epsilon=0", "mrc.epsilon: must be > 0"),
        ("attack.steps=-3", "attack.steps: must be > 0"),
        ("attack.eps=abc", "attack.eps:"),
        ("model.arch=vgg", "model.arch: must be one of"),
        ("data.dataset=mnist", "data.dataset: must be one of"),
        ("mrc.unknown=1", "mrc.unknown: unknown key"),
        ("bogus=1", "bogus: unknown key"),
        ("interpolate.alphas=[0.5,1.5]", "interpolate.alphas[1]: must be <= 1"),
        ("data.val_size=-1", "data.val_size: must be >= 0"),
        ("mrc.projection=sometimes", "mrc.projection: must be one of"),
        ("model={arch: wrn, depth: 33}", "model.depth: WideResNet depth must be 6n+4"),
        ("finetune.epochs=2.5", "finetune.epochs:"),
    ],
)
def test_errors_name_the_field(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[override])
    text = str(info.value)
    assert text.startswith(message), text
    assert "\n" not in text


def test_fractions_and_overrides() -> None:
    cfg = load_config(overrides=["attack.eps=4/255", "finetune.lrs=[0.001,0.005]", "name=abc"])
    assert cfg.attack.eps == pytest.approx(4 / 255)
    assert cfg.finetune.lrs == [0.001, 0.005]
    assert cfg.name == "abc"


def test_malformed_override() -> None:
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(overrides=["finetune.lrs"])
    with pytest.raises(ConfigError, match="^seed: "):
        load_config(overrides=["seed.x=1"])


def test_invalid_yaml_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("mrc: {epsilon: [\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(lst)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize("sweep", sorted(p.name for p in SWEEPS.glob("*.yaml")))
def test_shipped_sweeps_validate(sweep: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RIFT_CIFAR10_ARCHIVE", "/tmp/x.tar.gz")
    cfg = load_config(SWEEPS / sweep)
    assert cfg.name == Path(sweep).stem


def test_validate_cli(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["validate", str(SWEEPS / "smoke.yaml")]) == 0
    out = capsys.readouterr().out
    assert "name: smoke" in out and "epsilon: 0.1" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text("finetune:\n  lrs: [0.001, 0.0, 0.01]\n")
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "rift-ray: error: finetune.lrs[1]: must be > 0"
