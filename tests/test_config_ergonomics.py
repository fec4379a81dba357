"""Config ergonomics: ``extends:`` (merge, paths, cycles, hashes), the paper sweeps' shared
base, ``rift-ray schema``, ``rift-ray --version`` and ``rift-ray validate --diff``. No Ray."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

import rift_ray
from rift_ray.cli import main
from rift_ray.commands.schema import schema_text, sweep_schema
from rift_ray.config import ConfigError, SweepConfig, load_config, read_yaml, to_yaml
from rift_ray.config_text import deep_merge, nested_diff
from rift_ray.hashing import config_hash, stage_hashes

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = ROOT / "sweeps"
# The sweeps rewritten with extends:, as they were written flat before (frozen copies)
FLAT = Path(__file__).resolve().parent / "fixtures" / "flat_sweeps"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# --- extends: merge semantics ---------------------------------------------------------------


def test_deep_merge_merges_mappings_and_replaces_lists_and_scalars() -> None:
    base = {"a": 1, "m": {"x": 1, "y": [1, 2], "n": {"p": 1, "q": 2}}, "l": [1, 2, 3]}
    child = {"m": {"y": [9], "n": {"q": 5}, "z": None}, "l": [4], "b": 2}
    merged = deep_merge(base, child)
    assert merged == {
        "a": 1,
        "m": {"x": 1, "y": [9], "n": {"p": 1, "q": 5}, "z": None},
        "l": [4],
        "b": 2,
    }
    assert base["m"]["n"] == {"p": 1, "q": 2} and base["l"] == [1, 2, 3]  # untouched
    # a scalar over a mapping, and a mapping over a scalar, replace
    assert deep_merge({"m": {"x": 1}}, {"m": 3}) == {"m": 3}
    assert deep_merge({"m": 3}, {"m": {"x": 1}}) == {"m": {"x": 1}}


def test_extends_chain_relative_to_each_file(tmp_path: Path) -> None:
    # the child is in a/, its base in a/base/, the base's base one level up: each path is
    # relative to the file that names it, not to the working directory
    write(tmp_path / "a/root.yaml", "seed: 3\nfinetune: {lrs: [0.1, 0.2], epochs: 7}\n")
    write(
        tmp_path / "a/base/mid.yaml",
        "extends: ../root.yaml\nfinetune: {epochs: 5}\nmrc: {epochs: 2}\n",
    )
    child = write(
        tmp_path / "a/child.yaml",
        "extends: base/mid.yaml\nname: c\nfinetune: {lrs: [0.3]}\n",
    )
    raw = read_yaml(child)
    assert "extends" not in raw
    assert raw == {
        "seed": 3,
        "finetune": {"lrs": [0.3], "epochs": 5},
        "mrc": {"epochs": 2},
        "name": "c",
    }
    cfg = load_config(child)
    assert (cfg.seed, cfg.finetune.lrs, cfg.finetune.epochs, cfg.mrc.epochs) == (3, [0.3], 5, 2)
    assert "extends" not in to_yaml(cfg)


def test_extends_cycle_is_one_line_error_naming_the_file(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", "extends: b.yaml\nname: a\n")
    write(tmp_path / "b.yaml", "extends: a.yaml\nseed: 1\n")
    with pytest.raises(ConfigError, match=r"a\.yaml: extends cycle: .*a\.yaml -> .*b\.yaml -> "):
        load_config(tmp_path / "a.yaml")
    write(tmp_path / "self.yaml", "extends: ./self.yaml\n")
    with pytest.raises(ConfigError, match=r"self\.yaml: extends cycle") as e:
        load_config(tmp_path / "self.yaml")
    assert "\n" not in str(e.value)


def test_extends_missing_or_bad_base(tmp_path: Path) -> None:
    child = write(tmp_path / "s.yaml", "extends: nowhere/base.yaml\nname: s\n")
    with pytest.raises(ConfigError, match=r"s\.yaml: extends: nowhere/base\.yaml: base file not"):
        load_config(child)
    write(tmp_path / "t.yaml", "extends: [a.yaml, b.yaml]\n")
    with pytest.raises(ConfigError, match=r"t\.yaml: extends: expected the path of a base"):
        load_config(tmp_path / "t.yaml")
    write(tmp_path / "base.yaml", "seed: [\n")  # a broken base names the base
    write(tmp_path / "u.yaml", "extends: base.yaml\n")
    with pytest.raises(ConfigError, match=r"base\.yaml: invalid YAML"):
        load_config(tmp_path / "u.yaml")


def test_unknown_key_in_a_base_is_still_an_error(tmp_path: Path) -> None:
    write(tmp_path / "base.yaml", "finetune: {epochs: 3, lr_typo: 0.1}\n")
    child = write(tmp_path / "s.yaml", "extends: base.yaml\nname: s\n")
    with pytest.raises(ConfigError, match=r"^finetune\.lr_typo: unknown key$"):
        load_config(child)
    # extends is a top-level key only
    write(tmp_path / "n.yaml", "finetune: {extends: base.yaml}\n")
    with pytest.raises(ConfigError, match=r"finetune\.extends: unknown key"):
        load_config(tmp_path / "n.yaml")


def test_set_overrides_apply_to_the_resolved_config(tmp_path: Path) -> None:
    write(tmp_path / "base.yaml", "finetune: {epochs: 3, lrs: [0.1]}\nmrc: {epochs: 2}\n")
    child = write(tmp_path / "s.yaml", "extends: base.yaml\nname: s\nfinetune: {epochs: 4}\n")
    cfg = load_config(child, overrides=["finetune.lrs=[0.2,0.3]", "mrc.epochs=5"])
    assert (cfg.finetune.epochs, cfg.finetune.lrs, cfg.mrc.epochs) == (4, [0.2, 0.3], 5)
    with pytest.raises(ConfigError, match=r"--set 'extends=x\.yaml': the base is chosen in"):
        load_config(child, overrides=["extends=x.yaml"])


def test_extends_hashes_like_the_same_sweep_written_flat(tmp_path: Path) -> None:
    smoke = yaml.safe_load((SWEEPS / "smoke.yaml").read_text())
    base = {k: v for k, v in smoke.items() if k not in ("name", "finetune")}
    base["finetune"] = {k: v for k, v in smoke["finetune"].items() if k != "lrs"}
    base["finetune"]["lrs"] = [0.5]  # replaced by the child's list
    write(tmp_path / "base/b.yaml", yaml.safe_dump(base))
    child = {"extends": "base/b.yaml", "name": smoke["name"], "finetune": {"lrs": smoke["finetune"]["lrs"]}}  # fmt: skip
    write(tmp_path / "child.yaml", yaml.safe_dump(child))
    flat = load_config(SWEEPS / "smoke.yaml")
    resolved = load_config(tmp_path / "child.yaml")
    assert resolved == flat
    assert to_yaml(resolved) == to_yaml(flat)
    assert config_hash(resolved) == config_hash(flat)
    assert stage_hashes(resolved) == stage_hashes(flat)
    # and a change through the base does move the hashes (the test can fail)
    write(tmp_path / "base/b.yaml", yaml.safe_dump({**base, "seed": 1}))
    moved = load_config(tmp_path / "child.yaml")
    assert stage_hashes(moved)["adv_train"] != stage_hashes(flat)["adv_train"]


# --- the shipped sweeps ---------------------------------------------------------------------

REWRITTEN = sorted(p.name for p in FLAT.glob("*.yaml"))


def test_the_rewritten_sweeps_are_the_ones_expected() -> None:
    assert REWRITTEN == [
        "cifar10-cpu-fast-at.yaml",
        "resnet18-cifar10.yaml",
        "resnet18-cifar100.yaml",
        "resnet18-tinyimagenet.yaml",
        "wrn.yaml",
    ]
    for name in REWRITTEN:
        assert "extends" in yaml.safe_load((SWEEPS / name).read_text()), name


@pytest.mark.parametrize("name", REWRITTEN)
def test_rewritten_sweep_resolves_exactly_as_its_flat_version(name: str, capsys) -> None:
    new, old = load_config(SWEEPS / name), load_config(FLAT / name)
    hint = f"{name} resolves differently from tests/fixtures/flat_sweeps/{name}"
    assert new == old, hint
    assert to_yaml(new) == to_yaml(old), hint
    assert config_hash(new) == config_hash(old), hint
    assert stage_hashes(new) == stage_hashes(old), hint
    assert main(["validate", str(SWEEPS / name)]) == 0
    out_new = capsys.readouterr().out
    assert main(["validate", str(FLAT / name)]) == 0
    assert out_new == capsys.readouterr().out
    assert "extends" not in out_new


def test_paper_base_is_shared() -> None:
    base = SWEEPS / "base" / "paper.yaml"
    for name in ("wrn.yaml", "resnet18-cifar10.yaml", "resnet18-cifar100.yaml", "resnet18-tinyimagenet.yaml"):  # fmt: skip
        raw = yaml.safe_load((SWEEPS / name).read_text())
        assert (SWEEPS / raw["extends"]).resolve() == base.resolve(), name
        assert len((SWEEPS / name).read_text().splitlines()) < 25, name  # the duplication is gone


def test_smoke_stays_flat() -> None:
    assert "extends" not in yaml.safe_load((SWEEPS / "smoke.yaml").read_text())


# --- rift-ray schema ------------------------------------------------------------------------


def test_schema_command_prints_the_sweep_schema(capsys) -> None:
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    top = set(SweepConfig.model_fields)
    assert top <= set(schema["properties"]) and {"data", "finetune", "seed"} <= top
    assert set(schema["properties"]) - top == {"extends"}
    assert schema["additionalProperties"] is False
    eps = schema["$defs"]["AttackConfig"]["properties"]["eps"]
    assert {"type": "string"} in eps["anyOf"]  # "8/255"
    assert {"type": "number", "exclusiveMinimum": 0, "maximum": 1} in eps["anyOf"]
    assert "fnmatch" in schema["$defs"]["MRCConfig"]["properties"]["include"]["description"]


def test_committed_schema_is_up_to_date() -> None:
    committed = (SWEEPS / "schema.json").read_text()
    assert committed == schema_text(), (
        "sweeps/schema.json is out of date with rift_ray/config.py: run "
        "`rift-ray schema -o sweeps/schema.json`"
    )


def test_schema_output_file(tmp_path: Path, capsys) -> None:
    out = tmp_path / "s.json"
    assert main(["schema", "-o", str(out)]) == 0
    assert json.loads(out.read_text()) == sweep_schema()
    assert main(["schema", "-o", str(tmp_path / "no/such/dir/s.json")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_shipped_sweeps_validate_against_the_schema() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft202012Validator(sweep_schema())
    files = sorted(SWEEPS.glob("*.yaml")) + sorted((SWEEPS / "base").glob("*.yaml"))
    for f in files:
        errors = [e.message for e in validator.iter_errors(yaml.safe_load(f.read_text()))]
        assert errors == [], f
    bad = {"attack": {"eps": 2}, "data": {"datset": "cifar10"}}
    assert len(list(validator.iter_errors(bad))) == 2


# --- --version and validate --diff ----------------------------------------------------------


def test_version(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    line = capsys.readouterr().out.strip()
    assert re.fullmatch(
        rf"rift-ray {re.escape(rift_ray.__version__)} \(torch \S+, ray \S+, python [\d.]+\)", line
    ), line


def test_validate_diff_shows_only_changed_fields(capsys) -> None:
    assert main(["validate", str(SWEEPS / "smoke.yaml"), "--diff", "--set", "mrc.lr=0.5"]) == 0
    diff = yaml.safe_load(capsys.readouterr().out)
    assert diff["mrc"]["lr"] == 0.5 and diff["mrc"]["epochs"] == 3  # changed
    assert diff["finetune"]["asha"] == {"grace_period": 1}  # reduction_factor, mode: defaults
    assert "projection" not in diff["mrc"]  # smoke keeps the default "epoch"
    assert "attack" in diff and diff["attack"] == {"steps": 5}  # eps 8/255 is the default
    assert "compute" not in diff and "seed" not in diff
    assert diff["name"] == "smoke"
    # the diff applied over the defaults is the whole config again
    assert SweepConfig.model_validate(deep_merge(SweepConfig().to_dict(), diff)) == load_config(
        SWEEPS / "smoke.yaml", overrides=["mrc.lr=0.5"]
    )


def test_nested_diff() -> None:
    defaults = {"a": 1, "m": {"x": 1, "y": [1, 2]}, "n": {"p": 0}}
    assert nested_diff({"a": 1, "m": {"x": 1, "y": [1, 2]}, "n": {"p": 0}}, defaults) == {}
    assert nested_diff({"a": 2, "m": {"x": 1, "y": [1]}, "n": {"p": 0}}, defaults) == {
        "a": 2,
        "m": {"y": [1]},
    }
