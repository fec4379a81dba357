"""The commands around a finished sweep (issue 18): ``rift-ray compare``, the report's RiFT
views, ``rift-ray eval`` and ``rift-ray export``, on tests/test_sweep.py's ``smoke_run`` and
``seeds_run`` sweeps.

Not collected on its own (no ``test_`` prefix): tests/test_sweep.py imports these tests, so
they run in that module, on its fixtures' sweeps, built once per run (pytest-xdist's
``--dist loadfile`` keeps one module on one worker).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from rift_ray.cli import main

# -- rift-ray compare and the report's RiFT views (issue 18) ----------------------------------


def _chromium_dom(page: Path, profile: Path) -> str:
    """The page's DOM after load in headless Chromium (skips the test without one)."""
    import subprocess

    browser = shutil.which("chromium")
    if browser is None:
        pytest.skip("no chromium on PATH (.ci/run installs Debian's chromium)")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update",
             f"--user-data-dir={profile}", "--virtual-time-budget=5000"]  # fmt: skip
    return subprocess.run(
        [browser, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=60
    ).stdout


def test_compare_a_sweep_and_a_seeds_sweep(
    smoke_run: Path, seeds_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "compare.html"
    assert main(["compare", str(smoke_run), str(seeds_run), "-o", str(out)]) == 0
    text = out.read_text()
    for key in ("seeds", "finetune.asha.mode", "finetune.lrs", "adv_train.checkpoint"):
        assert f'<td class="l">{key}</td>' in text, key  # config fields that differ
    assert '<td class="l">data.dataset</td>' not in text  # the same in both
    assert 'id="fig-compare-interpolation"' in text and 'id="fig-compare-mrc"' in text
    assert text.count('src="data:image/png;base64,') == 2 and "Compare t vs s" in text
    csv = tmp_path / "csv"  # one seed's directory of a seeds sweep is a finished sweep too
    assert main(["compare", str(smoke_run), str(seeds_run / "seeds/0"), "--format", "csv",
                 "-o", str(csv)]) == 0  # fmt: skip
    assert "alpha*," in (csv / "summary.csv").read_text()
    half = tmp_path / "half"  # a sweep that has not finished: stage 1 only
    (half / "stages").mkdir(parents=True)
    shutil.copy(smoke_run / "config.yaml", half)
    shutil.copy(smoke_run / "stages/adv_train.json", half / "stages")
    capsys.readouterr()
    assert main(["compare", str(smoke_run), str(half)]) == 2
    assert f"{half}: not a finished sweep" in capsys.readouterr().err
    dom = _chromium_dom(out, tmp_path / "profile")
    assert "Config differences" in dom and 'data-loaded="2/2"' in dom  # both figures decoded


def test_report_has_the_rift_views(smoke_run: Path, tmp_path: Path) -> None:
    import re

    summary = json.loads((smoke_run / "summary.json").read_text())
    git = summary["environment"]["git"]  # recorded by the sweep (this checkout)
    assert re.fullmatch(r"[0-9a-f]{40}", git["sha"]) and isinstance(git["dirty"], bool)
    out = tmp_path / "report.html"
    assert main(["report", str(smoke_run), "-o", str(out)]) == 0
    text = out.read_text()
    for fid in ("fig-tradeoff", "fig-mrc-params", "fig-mrc-layers", "fig-corruption"):
        assert f'<figure id="{fid}"><img alt=' in text, fid
    assert "<h2>Clean vs robust trade-off</h2>" in text and "<h2>Provenance</h2>" in text
    assert git["sha"] in text and "wandb sync " + str(smoke_run / "wandb") in text
    interp = pq.read_table(smoke_run / "tables/interpolation.parquet").to_pylist()
    cells = [json.loads(r["corruption_cells"]) for r in interp if r["split"] == "test"]
    assert cells and all(set(c) == {f"{n}-{s}" for n in ("gaussian_noise", "contrast")
                                    for s in (1, 3)} for c in cells)  # fmt: skip
    for c, r in zip(cells, [r for r in interp if r["split"] == "test"]):
        assert r["corruption_acc"] == pytest.approx(sum(c.values()) / len(c))


# -- rift-ray eval and rift-ray export (issue 18) ----------------------------------------------


def test_eval_reproduces_the_sweeps_at_figures(
    smoke_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``rift-ray eval`` of the sweep's AT checkpoint with its config gives summary.json's AT
    figures exactly: the same loader, split, subsets, PGD seed and stage-4 Ray task."""
    summary = json.loads((smoke_run / "summary.json").read_text())
    capsys.readouterr()
    code = main(["eval", str(smoke_run / "checkpoints/at.pt"), "--config",
                 str(smoke_run / "config.yaml"), "--corruptions", "--json"])  # fmt: skip
    assert code == 0
    res = json.loads(capsys.readouterr().out)
    for split in ("val", "test"):
        for k in ("clean_acc", "robust_acc"):
            assert res[split][k] == summary["at"][split][k], (split, k)
        assert res[split]["n"] == 200
    assert res["test"]["corruption_acc"] == summary["at"]["test"]["corruption_acc"]
    assert res["config_hash"] == summary["config_hash"]


def test_eval_seed_reproduces_one_seed_of_a_seeds_sweep(
    seeds_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--seed N``: PGD starts as seed N's stage 4 drew them (the config: beside the checkpoint)."""
    per_seed = json.loads((seeds_run / "seeds/1/summary.json").read_text())
    capsys.readouterr()
    code = main(["eval", str(seeds_run / "checkpoints/at.pt"), "--seed", "1", "--split", "val",
                 "--json"])  # fmt: skip
    assert code == 0
    res = json.loads(capsys.readouterr().out)
    assert "test" not in res and res["protocol"]["seed"] == 1
    for k in ("clean_acc", "robust_acc"):
        assert res["val"][k] == per_seed["at"]["val"][k], k


def test_export_loads_into_the_model_and_equals_rift_pt(smoke_run: Path, tmp_path: Path) -> None:
    """Both formats hold rift.pt's tensors: strict into build_model(arch, num_classes), the same
    outputs; the .pt is a bare state dict RobustBench's loader takes; the card's figures are
    summary.json's."""
    from safetensors.torch import load_file

    from rift_ray.checkpoint import load_checkpoint
    from rift_ray.models import build_model

    sweep = tmp_path / "t"  # what export reads, copied: the fixture's directory stays as it was
    for rel in ("config.yaml", "summary.json", "manifest.json", "checkpoints/rift.pt"):
        (sweep / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(smoke_run / rel, sweep / rel)
    for fmt in ("safetensors", "robustbench"):
        assert main(["export", str(sweep), "--format", fmt]) == 0
    ref_state, meta = load_checkpoint(smoke_run / "checkpoints/rift.pt")
    ref = build_model(meta["arch"], meta["num_classes"]).eval()
    ref.load_state_dict(ref_state)
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(x)
    plain = torch.load(sweep / "export/model.pt", weights_only=True)
    # RobustBench's load_model: checkpoint["state_dict"], else the file itself, with any key
    # holding "module." or "model." cut: a bare dict without them loads unchanged
    assert "state_dict" not in plain and not any("module." in k or "model." in k for k in plain)
    for state in (plain, load_file(sweep / "export/model.safetensors")):
        assert set(state) == set(ref_state)
        assert all(torch.equal(state[k], ref_state[k]) for k in ref_state)
        model = build_model(meta["arch"], meta["num_classes"]).eval()
        model.load_state_dict(state, strict=True)
        with torch.no_grad():
            assert torch.equal(model(x), want)
    summary = json.loads((smoke_run / "summary.json").read_text())
    card = json.loads((sweep / "export/model.card.json").read_text())
    for who in ("at", "rift"):
        for split in ("val", "test"):
            assert card["results"][who][split] == summary[who][split], (who, split)
    assert (
        card["results"]["rift"]["test"]["autoattack_acc"]
        == summary["autoattack"]["rift"]["robust_acc"]
    )
    assert [card["rift"][k] for k in ("alpha", "modules", "lr", "trial")] == [
        summary[k] for k in ("alpha", "modules", "lr", "trial")
    ]
    assert card["config_hash"] == summary["config_hash"]
    assert [f["format"] for f in card["files"]] == ["safetensors", "robustbench"]
    assert "| RiFT | test |" in (sweep / "export/model.card.md").read_text()
