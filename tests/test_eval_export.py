"""``rift-ray eval`` and ``rift-ray export`` without Ray: bad input is one line and exit 2,
and the export's pieces (card, formats, checks of the sweep) on a hand-made sweep directory.
The end-to-end checks on a finished smoke sweep are in tests/sweep_commands.py (run in tests/test_sweep.py)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
import yaml

from rift_ray.checkpoint import save_checkpoint
from rift_ray.cli import main
from rift_ray.config import ConfigError, load_config, to_yaml
from rift_ray.export import (
    eps_text,
    export_sweep,
    load_snippet,
    merged_card,
    model_card,
)
from rift_ray.models import build_model
from rift_ray.store import StorageError, Store

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "sweeps" / "smoke.yaml")


def _error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("rift-ray: error: ")
    return err[0]


def _checkpoint(path: Path, arch: str = "small_resnet", num_classes: int = 10) -> Path:
    torch.manual_seed(0)
    model = build_model(arch, num_classes)
    save_checkpoint(path, model.state_dict(), arch=arch, num_classes=num_classes,
                    dataset="synthetic", mean=(0.5,) * 3, std=(0.5,) * 3)  # fmt: skip
    return path


# -- eval: bad input, before any Ray -----------------------------------------------------------


def test_eval_missing_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", str(tmp_path / "nope.pt"), "--config", SMOKE]) == 2
    assert f"{tmp_path / 'nope.pt'}: no such checkpoint file" in _error(capsys)


def test_eval_needs_a_config_outside_a_sweep(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = _checkpoint(tmp_path / "m.pt")
    assert main(["eval", str(ckpt)]) == 2
    assert "--config: required" in _error(capsys)
    assert main(["eval", str(ckpt), "--config", str(tmp_path / "none.yaml")]) == 2
    assert f"--config: no such file: {tmp_path / 'none.yaml'}" in _error(capsys)


def test_eval_finds_the_config_of_the_sweep_beside_its_checkpoint(tmp_path: Path) -> None:
    from rift_ray.evaluation_cmd import sweep_config_path

    (tmp_path / "checkpoints" / "finetune").mkdir(parents=True)
    (tmp_path / "config.yaml").write_text("name: x\n")
    for rel in ("checkpoints/at.pt", "checkpoints/finetune/conv1_lr0.01.pt"):
        assert sweep_config_path(str(tmp_path / rel), None) == str(tmp_path / "config.yaml")
    assert sweep_config_path(str(tmp_path / "checkpoints/at.pt"), "other.yaml") == "other.yaml"


def test_eval_wrong_architecture(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = _checkpoint(tmp_path / "cnn.pt", arch="small_cnn")
    assert main(["eval", str(ckpt), "--config", SMOKE]) == 2
    err = _error(capsys)
    assert "a small_cnn checkpoint with 10 classes, but the config builds small_resnet" in err
    # a plain state dict (no metadata) that does not fit: the loader's own message
    torch.save(build_model("small_cnn", 10).state_dict(), tmp_path / "plain.pt")
    assert main(["eval", str(tmp_path / "plain.pt"), "--config", SMOKE]) == 2
    assert "state dict does not match the model" in _error(capsys)


def test_eval_bad_split(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = _checkpoint(tmp_path / "m.pt")
    with pytest.raises(SystemExit) as e:
        main(["eval", str(ckpt), "--config", SMOKE, "--split", "train"])
    assert e.value.code == 2
    assert "argument --split: invalid choice: 'train'" in capsys.readouterr().err
    # test-only measurements asked of the validation split alone
    for flag in ("--corruptions", "--autoattack"):
        assert main(["eval", str(ckpt), "--config", SMOKE, "--split", "val", flag]) == 2
        assert f"{flag}: measured on test only" in _error(capsys)
    # the smoke config names no corruptions
    assert main(["eval", str(ckpt), "--config", SMOKE, "--corruptions"]) == 2
    assert "--corruptions: the config names none" in _error(capsys)


def test_eval_split_the_config_does_not_have() -> None:
    from rift_ray.data import load_dataset
    from rift_ray.evaluation_cmd import check_request

    cfg = load_config(SMOKE, overrides=["data.val_size=0"])
    data = load_dataset(cfg.data, seed=cfg.seed)
    with pytest.raises(ConfigError, match=r"--split val: this config has no val images"):
        check_request(cfg, data, ("val",), corruptions=False, autoattack=False)
    check_request(cfg, data, ("test",), corruptions=False, autoattack=False)


# -- export: a hand-made finished sweep --------------------------------------------------------


SUMMARY = {
    "name": "hand",
    "seed": 0,
    "config_hash": "abc",
    "modules": ["layer2.0.conv1"],
    "lr": 0.01,
    "trial": "layer2.0.conv1_lr0.01",
    "alpha": 0.5,
    "reason": "largest clean gain",
    "rule": "paper",
    "at": {"val": {"clean_acc": 40.0, "robust_acc": 20.5}, "test": {"clean_acc": 39.0,
           "robust_acc": 19.0, "corruption_acc": 30.25, "autoattack_acc": 12.5}},
    "rift": {"val": {"clean_acc": 42.0, "robust_acc": 20.5}, "test": {"clean_acc": 41.5,
             "robust_acc": 18.5, "corruption_acc": 31.0, "autoattack_acc": 12.0}},
    "paired": {"val": {"clean_acc": {"n": 200}}, "test": {"clean_acc": {"n": 400}}},
    "corruption_source": "generated",
    "corruption_label": "corruption (regenerated)",
    "autoattack": {"at": {"n": 8, "settings": {"version": "standard", "implementation": "x"}}},
    "versions": {"rift_ray": "0.1.0"},
}  # fmt: skip


def _sweep(tmp_path: Path, *, summary: bool = True, trial: str | None = None) -> Path:
    cfg = load_config(SMOKE, overrides=["eval.corruptions=[contrast]"])
    store = Store.open(str(tmp_path), "hand")
    store.put_text("config.yaml", to_yaml(cfg))
    if summary:
        store.put_json("summary.json", SUMMARY)
        buf = io.BytesIO()
        torch.manual_seed(1)
        model = build_model("small_resnet", 10, mean=(0.4, 0.5, 0.6), std=(0.2, 0.2, 0.3))
        save_checkpoint(buf, model.state_dict(), arch="small_resnet", num_classes=10,
                        dataset="synthetic", mean=(0.0,) * 3, std=(1.0,) * 3, config_hash="abc",
                        extra={"trial": trial or SUMMARY["trial"], "alpha": 0.5})  # fmt: skip
        store.put("checkpoints/rift.pt", buf.getvalue())
    return tmp_path / "hand"


def test_export_unknown_format(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["export", str(_sweep(tmp_path)), "--format", "onnx"])
    assert e.value.code == 2 and "invalid choice: 'onnx'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="--format: must be one of safetensors, robustbench"):
        export_sweep(str(tmp_path / "hand"), "onnx")


def test_export_unfinished_sweep(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sweep = _sweep(tmp_path, summary=False)
    assert main(["export", str(sweep), "--format", "safetensors"]) == 2
    assert "no final model yet" in _error(capsys)
    assert not (sweep / "export").exists()
    assert main(["export", str(tmp_path), "--format", "robustbench"]) == 2
    assert "not a sweep directory" in _error(capsys)


def test_export_refuses_a_seeds_aggregate_and_a_stale_checkpoint(tmp_path: Path) -> None:
    sweep = _sweep(tmp_path, trial="other_lr0.1")
    with pytest.raises(StorageError, match="trial other_lr0.1.*summary.json's final model is"):
        export_sweep(str(sweep), "robustbench")
    store = Store.open(str(tmp_path), "hand")
    store.put_json("summary.json", {"name": "hand", "per_seed": [], "seeds": [0, 1]})
    store.write_file("seeds/0/summary.json", b"{}")
    with pytest.raises(
        StorageError, match=r"one final model per seed: export .*seeds/<seed> \(seeds: 0\)"
    ):
        export_sweep(str(sweep), "robustbench")


def test_export_both_formats_share_one_card(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sweep = _sweep(tmp_path)
    for fmt in ("safetensors", "robustbench"):
        assert main(["export", str(sweep), "--format", fmt]) == 0
    out = capsys.readouterr().out
    assert f"{sweep}/export/model.pt (" in out and f"{sweep}/export/model.card.md" in out
    card = json.loads((sweep / "export/model.card.json").read_text())
    assert [f["file"] for f in card["files"]] == ["model.safetensors", "model.pt"]
    state = torch.load(sweep / "export/model.pt", weights_only=True)
    model = build_model("small_resnet", 10)
    model.load_state_dict(state, strict=True)
    # the card states the normalization the model applies (its buffers), not the file's label
    assert state["normalize.mean"].flatten().tolist() == pytest.approx([0.4, 0.5, 0.6])
    assert card["model"]["normalization"]["mean"] == pytest.approx([0.4, 0.5, 0.6])
    assert card["model"]["normalization"]["std"] == pytest.approx([0.2, 0.2, 0.3])
    md = (sweep / "export/model.card.md").read_text()
    assert "| RiFT | test | 41.50 | 18.50 | 31.00 | 12.00 |" in md
    assert "eps 8/255; PGD-5, step 2/255" in md and "```python" in md
    # -o: a file elsewhere, its card named after its stem
    assert (
        main(["export", str(sweep), "--format", "robustbench", "-o", str(tmp_path / "o/rb.pt")])
        == 0
    )
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [
        "rb.card.json",
        "rb.card.md",
        "rb.pt",
    ]


def test_model_card_figures_are_the_summary(tmp_path: Path) -> None:
    config = yaml.safe_load(to_yaml(load_config(SMOKE, overrides=["eval.corruptions=[contrast]"])))
    meta = {"arch": "small_resnet", "num_classes": 10, "dataset": "synthetic",
            "mean": [0.4, 0.5, 0.6], "std": [0.2, 0.2, 0.3]}  # fmt: skip
    card = model_card(SUMMARY, config, meta, fmt="robustbench", file="m.pt", data=b"xy", sweep="s")
    for who in ("at", "rift"):
        assert card["results"][who] == SUMMARY[who]
    assert card["rift"] == {k: SUMMARY[k] for k in ("alpha", "modules", "lr", "trial", "reason")}
    assert card["threat_model"]["eps_text"] == "8/255" and card["threat_model"]["steps"] == 5
    assert card["protocol"]["n"] == {"val": 200, "test": 400}
    assert card["protocol"]["autoattack"]["n"] == 8
    assert card["protocol"]["corruptions"]["names"] == ["contrast"]
    assert card["model"]["normalization"]["mean"] == [0.4, 0.5, 0.6]
    assert card["config_hash"] == "abc" and card["files"][0]["bytes"] == 2
    # a second file of another model is not merged into this card; one of the same model is
    other = card | {"rift": card["rift"] | {"alpha": 1.0}}
    assert merged_card(card, other)["files"] == card["files"]
    again = card | {"files": [card["files"][0] | {"file": "m.safetensors"}]}
    assert [f["file"] for f in merged_card(card, again)["files"]] == ["m.safetensors", "m.pt"]


def test_eps_text_and_load_snippet() -> None:
    assert eps_text(8 / 255) == "8/255" and eps_text(0.1) == "0.1" and eps_text(0.0) == "0"
    wrn = {"arch": "wrn", "num_classes": 100, "depth": 28, "widen_factor": 4,
           "normalization": {"mean": [0.5] * 3}}  # fmt: skip
    snippet = load_snippet("safetensors", "m.safetensors", wrn)
    assert snippet.count("\n") == 2
    assert 'build_model("wrn", 100, depth=28, widen_factor=4)' in snippet
    assert 'load_file("m.safetensors")' in snippet
    ns: dict[str, object] = {}
    exec(snippet.rsplit("\n", 1)[0], ns)  # the imports work here
