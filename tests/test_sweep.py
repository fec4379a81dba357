"""End to end: the smoke sweep through the CLI on a local Ray, then a re-run that reuses everything."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from smoke_settings import EVAL, FAST, SMOKE, STRATEGIES, WANDB  # noqa: E402

from rift_ray.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.ray]


@pytest.fixture(scope="module")
def smoke_run(ray_session, tmp_path_factory):
    storage = tmp_path_factory.mktemp("storage")
    code = main(
        ["sweep", SMOKE, "--storage", str(storage), "--name", "t", *FAST, *EVAL, *STRATEGIES,
         *WANDB]
    )  # fmt: skip
    assert code == 0
    return storage / "t"


def test_artifacts_exist(smoke_run: Path) -> None:
    for rel in ("config.yaml", "summary.json", "manifest.json", "tables/mrc.parquet", "tables/finetune.parquet",
                "tables/finetune_epochs.parquet", "tables/interpolation.parquet", "checkpoints/at.pt",
                "checkpoints/rift.pt", "artifacts/adv_set.pt", "artifacts/mrc_base.pt"):  # fmt: skip
        assert (smoke_run / rel).is_file(), rel


def test_stages_time_their_evaluations(smoke_run: Path) -> None:
    """What benchmarks/sweep_bench.py counts as compute: AT's per-epoch validation and the ASHA
    metric inside each fine-tuning epoch are timed, next to the training seconds."""
    history = json.loads((smoke_run / "stages/adv_train.json").read_text())["history"]
    assert history and all(0 < h["val_seconds"] < 120 for h in history)
    epochs = pq.read_table(smoke_run / "tables/finetune_epochs.parquet").to_pylist()
    assert epochs and all(0 < r["metric_seconds"] < 120 for r in epochs)


def test_mrc_table_covers_every_module(smoke_run: Path) -> None:
    from rift_ray.models import build_model, mrc_candidates

    rows = pq.read_table(smoke_run / "tables/mrc.parquet").to_pylist()
    expected = mrc_candidates(build_model("small_resnet", 10))
    assert sorted(r["module"] for r in rows) == sorted(expected)
    assert all(r["status"] == "done" for r in rows)
    mrcs = [r["mrc"] for r in rows]
    assert mrcs == sorted(mrcs)
    for r in rows:
        assert r["mrc"] == pytest.approx(r["loss_after"] - r["loss_before"], abs=1e-6)
        assert r["num_params"] > 0
    # the trials started from the stage's shared first step (rift_ray.rift.mrc_base)
    base = torch.load(smoke_run / "artifacts/mrc_base.pt", weights_only=True)
    assert sorted(base["first_grads"]) == sorted(expected)
    assert {(r["loss_before"], r["acc_before"]) for r in rows} == {
        (base["loss_before"], base["acc_before"])
    }
    # ... and got the reference procedure's answer, computed here alone for every module
    from rift_ray.advset import decode_adversarial_set
    from rift_ray.checkpoint import load_checkpoint
    from rift_ray.config import validate_config
    from rift_ray.rift import robust_criticality
    from rift_ray.stages.mrc import mrc_options

    cfg = validate_config(yaml.safe_load((smoke_run / "config.yaml").read_text()))
    blob = torch.load(smoke_run / "artifacts/adv_set.pt", weights_only=True)
    model = build_model("small_resnet", 10)
    model.load_state_dict(load_checkpoint(smoke_run / "checkpoints/at.pt")[0])
    opts = dataclasses.replace(mrc_options(cfg), fast=False)
    for r in rows:
        ref = robust_criticality(
            model, r["module"], decode_adversarial_set(blob), blob["targets"], opts
        )
        assert r["mrc"] == pytest.approx(ref.mrc, rel=1e-6, abs=1e-9), r["module"]
        assert r["acc_after"] == ref.acc_after, r["module"]


def test_summary_consistent_with_tables(smoke_run: Path) -> None:
    summary = json.loads((smoke_run / "summary.json").read_text())
    assert 0.0 <= summary["alpha"] <= 1.0
    interp = pq.read_table(smoke_run / "tables/interpolation.parquet").to_pylist()
    chosen = [r for r in interp if r["selected"]]
    assert {r["alpha"] for r in chosen} == {summary["alpha"]}
    assert {r["trial"] for r in chosen} == {summary["trial"]}
    test_row = next(r for r in chosen if r["split"] == "test")
    assert summary["rift"]["test"]["clean_acc"] == pytest.approx(test_row["clean_acc"])
    at_val = next(r for r in interp if r["alpha"] == 0.0 and r["split"] == "val")
    assert summary["at"]["val"]["robust_acc"] == pytest.approx(at_val["robust_acc"])
    # the paper's rule on validation: within tolerance of the AT robust accuracy
    rift_val = next(r for r in chosen if r["split"] == "val")
    assert rift_val["robust_acc"] >= at_val["robust_acc"] - 0.1 - 1e-9
    assert (
        summary["modules"][0]
        == pq.read_table(smoke_run / "tables/mrc.parquet").to_pylist()[0]["module"]
    )
    ft = pq.read_table(smoke_run / "tables/finetune.parquet").to_pylist()
    lowest = [r for r in ft if r["modules"] == summary["modules"][0]]
    assert len(lowest) == 2 and {r["lr"] for r in lowest} == {0.001, 0.02}


def test_strategy_comparison(smoke_run: Path) -> None:
    """One row per strategy; the final model is the primary (lowest) strategy's best trial."""
    summary = json.loads((smoke_run / "summary.json").read_text())
    rows = summary["strategies"]
    assert [r["strategy"] for r in rows] == ["lowest", "greedy", "bn_stats"]
    assert pq.read_table(smoke_run / "tables/strategies.parquet").to_pylist() == rows
    mrc = [r["module"] for r in pq.read_table(smoke_run / "tables/mrc.parquet").to_pylist()]
    by = {r["strategy"]: r for r in rows}
    low = by["lowest"]
    assert summary["primary"] == "lowest" and low["primary"] and not by["greedy"]["primary"]
    assert low["modules"] == mrc[0] == "+".join(summary["modules"])
    assert (low["trial"], low["alpha"]) == (summary["trial"], summary["alpha"])
    for split in ("val", "test"):
        for k, v in summary["rift"][split].items():
            if k != "autoattack_acc":  # AutoAttack: the final model only, not per strategy
                assert low[f"{split}_{k}"] == pytest.approx(v)
    bn = by.pop("bn_stats")  # one trial, no weight trained: only BatchNorm statistics moved
    assert (bn["trial"], bn["lr"], bn["modules"]) == ("bn_stats_lr0", 0.0, ":bn_stats")
    state = torch.load(smoke_run / "checkpoints/finetune/bn_stats_lr0.pt", weights_only=True)
    at = torch.load(smoke_run / "checkpoints/at.pt", weights_only=True)
    moved = {
        k for k in at["state_dict"] if not torch.equal(at["state_dict"][k], state["state_dict"][k])
    }
    assert moved and all(
        k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in moved
    )
    rows = list(by.values())
    for r in rows:  # every strategy has its best trial, at an alpha* within the tolerance
        assert r["trial"] and r["alpha"] is not None and r["lr"] in (0.001, 0.02)
        assert r["val_robust_acc"] >= summary["at"]["val"]["robust_acc"] - 0.1 - 1e-9
        assert 0 <= r["test_corruption_acc"] <= 100
    # the greedy set: the lowest module plus the candidate with the lowest joint MRC
    joint = pq.read_table(smoke_run / "tables/joint_mrc.parquet").to_pylist()
    assert [(r["step"], r["size"]) for r in joint] == [(1, 1), (2, 2), (2, 2)]
    assert joint[0]["modules"] == mrc[0] and [r["added"] for r in joint[1:]] == mrc[1:3]
    assert all(r["status"] == "done" and r["mrc"] >= 0 for r in joint)
    kept = next(r for r in joint if r["step"] == 2 and r["chosen"])
    assert kept["mrc"] == min(r["mrc"] for r in joint[1:])
    assert by["greedy"]["modules"] == kept["modules"] and by["greedy"]["set_mrc"] == kept["mrc"]
    # each strategy ran its own ASHA experiment
    ft = pq.read_table(smoke_run / "tables/finetune.parquet").to_pylist()
    sets = {r["modules"] for r in ft}
    assert len(ft) == 2 * (len(sets) - 1) + 1 and {mrc[0], kept["modules"], ":bn_stats"} == sets
    runs = {p.name.split("-", 2)[-1] for p in (smoke_run / "ray").glob("finetune-*-*")}
    assert runs == {"greedy", "bn_stats"}


def test_default_strategy_result_is_unchanged(
    smoke_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same sweep with only the default strategy (a copy, so the fixture is left alone):
    the primary strategy's trials compute the same numbers with or without the others."""
    shutil.copytree(smoke_run, tmp_path / "t", ignore=shutil.ignore_patterns("ray", "wandb"))
    alphas = yaml.safe_load((smoke_run / "config.yaml").read_text())["interpolate"]["alphas"]
    old_ft = json.loads((smoke_run / "stages/finetune.json").read_text())["hash"]
    old_table = (smoke_run / "tables/finetune.parquet").read_bytes()
    code = main(
        [
            "sweep",
            SMOKE,
            "--storage",
            str(tmp_path),
            "--name",
            "t",
            *FAST,
            "--set",
            f"interpolate.alphas={alphas}",
        ]
    )  # without EVAL: cheaper, same trials
    assert code == 0
    err = capsys.readouterr().err
    assert "stage 1/4 adv_train: done earlier" in err and "stage 2/4 mrc: done earlier" in err
    assert "stage 3/4 finetune: done earlier" not in err
    # the change was announced with the field that made it, and the old result kept
    (line,) = [ln for ln in err.splitlines() if "stage 3/4 finetune: config changed (" in ln]
    assert "finetune.strategies" in line and "moves to history/" in line, line
    kept = tmp_path / "t" / f"history/finetune-{old_ft}/tables/finetune.parquet"
    assert kept.read_bytes() == old_table
    full = json.loads((smoke_run / "summary.json").read_text())
    alone = json.loads((tmp_path / "t" / "summary.json").read_text())
    assert [r["strategy"] for r in alone["strategies"]] == ["lowest"]
    assert not (tmp_path / "t" / "ray").exists() or not list(
        (tmp_path / "t" / "ray").glob("*-greedy")
    )

    def epochs(sweep: Path) -> dict[tuple[str, int], float]:
        rows = pq.read_table(sweep / "tables/finetune_epochs.parquet").to_pylist()
        return {
            (r["trial"], r["epoch"]): r["val_score"]
            for r in rows
            if r["modules"] == alone["modules"][0]
        }

    a, b = epochs(tmp_path / "t"), epochs(smoke_run)
    both = set(a) & set(b)  # every trial's first epoch at least: ASHA stops after one
    assert len(both) >= 2 and all(a[k] == b[k] for k in both)  # bit for bit
    ft_full = {
        r["trial"]: r["status"]
        for r in pq.read_table(smoke_run / "tables/finetune.parquet").to_pylist()
    }
    ft_alone = {
        r["trial"]: r["status"]
        for r in pq.read_table(tmp_path / "t/tables/finetune.parquet").to_pylist()
    }
    # sync halving (smoke.yaml's default): the same rung decisions, so the same model
    assert all(ft_full[t] == s for t, s in ft_alone.items()), (ft_full, ft_alone)
    assert (alone["trial"], alone["alpha"]) == (full["trial"], full["alpha"])
    for split in ("val", "test"):
        for k in ("clean_acc", "robust_acc"):
            assert alone["rift"][split][k] == full["rift"][split][k]


def test_corruption_and_autoattack_in_the_final_evaluation(smoke_run: Path) -> None:
    summary = json.loads((smoke_run / "summary.json").read_text())
    for who in ("at", "rift"):
        assert 0.0 <= summary[who]["test"]["corruption_acc"] <= 100.0
        aa = summary["autoattack"][who]
        assert aa["n"] == 4 and aa["settings"]["version"] == "standard"
        assert aa["settings"]["implementation"] == "pyautoattack 0.2.0 (fra31/auto-attack)"
        # robust accuracy can never exceed clean accuracy on the same images
        assert aa["robust_acc"] <= aa["clean_acc"]
    assert summary["at"]["test"]["autoattack_acc"] == summary["autoattack"]["at"]["robust_acc"]
    assert summary["rift"]["test"]["autoattack_acc"] == summary["autoattack"]["rift"]["robust_acc"]
    # AutoAttack along the interpolation curve: alpha 0, alpha* and eval.autoattack.alphas=[1.0]
    trial, alpha = summary["trial"], summary["alpha"]
    names = (
        {"at"} | ({"rift"} if alpha > 0 else set()) | ({f"{trial}-alpha1"} if alpha < 1 else set())
    )
    assert {p.name for p in (smoke_run / "artifacts/autoattack").iterdir()} == names
    for name in names:
        shards = sorted(p.name for p in (smoke_run / "artifacts/autoattack" / name).iterdir())
        assert shards == ["shard-0.json", "shard-1.json"]
    assert [c["alpha"] for c in summary["autoattack_curve"]] == sorted({0.0, alpha, 1.0})
    interp = pq.read_table(smoke_run / "tables/interpolation.parquet").to_pylist()
    attacked = {
        (r["trial"], r["alpha"]): r["autoattack_acc"]
        for r in interp
        if r["autoattack_acc"] is not None
    }
    assert all(r["split"] == "test" for r in interp if r["autoattack_acc"] is not None)
    assert attacked[(trial, 1.0)] == summary["autoattack_curve"][-1]["robust_acc"]
    assert attacked[(trial, 0.0)] == summary["autoattack"]["at"]["robust_acc"]
    assert attacked[(trial, alpha)] == summary["autoattack"]["rift"]["robust_acc"]
    assert len(attacked) == len({0.0, alpha, 1.0}) + (
        len({r["trial"] for r in interp}) - 1
    )  # other trials: their alpha 0 row only
    assert all(r["corruption_acc"] is not None for r in interp if r["split"] == "test")
    assert all(r["corruption_acc"] is None for r in interp if r["split"] == "val")


def test_per_image_results_and_paired_intervals(smoke_run: Path) -> None:
    """Issue 21: every alpha point's per-image results are stored, and the summary's paired
    changes are computed from them: their point estimates are the summary's RiFT - AT."""
    from rift_ray.stages.per_image import images_of

    summary = json.loads((smoke_run / "summary.json").read_text())
    rows = pq.read_table(smoke_run / "tables/per_image.parquet").to_pylist()
    table = pq.read_table(smoke_run / "tables/interpolation.parquet").to_pylist()
    points = {(r["trial"], r["alpha"], r["split"]) for r in table if r["alpha"] > 0}
    points |= {("AT", 0.0, "val"), ("AT", 0.0, "test")}
    assert {(r["trial"], r["alpha"], r["split"]) for r in rows} == points
    for r in rows:  # the bits give back each row's accuracies
        acc = next(
            t for t in table if (t["trial"] == r["trial"] or r["trial"] == "AT")
            and t["alpha"] == r["alpha"] and t["split"] == r["split"]
        )  # fmt: skip
        im = images_of(r)
        assert 100 * im["clean"].mean() == pytest.approx(acc["clean_acc"])
        if im["robust"] is None:  # clean_first: clean accuracy only where PGD could not win
            assert acc["robust_acc"] is None and r["split"] == "val"
        else:
            assert 100 * im["robust"].mean() == pytest.approx(acc["robust_acc"])
        if r["split"] == "test":
            assert 100 * im["corruption"].mean() == pytest.approx(acc["corruption_acc"], abs=1e-4)
    paired = summary["paired"]
    for split in ("val", "test"):
        for k in ("clean_acc", "robust_acc"):
            iv = paired[split][k]
            delta = summary["rift"][split][k] - summary["at"][split][k]
            assert iv["diff"] == pytest.approx(delta) and iv["lo"] <= iv["diff"] <= iv["hi"]
    assert paired["test"]["corruption_acc"]["n"] == 200
    assert summary["rule"] == "paper" and summary["noise_floor"]["val_n"] == 200


def test_rift_checkpoint_is_the_interpolated_model(smoke_run: Path) -> None:
    import torch

    from rift_ray.checkpoint import load_checkpoint
    from rift_ray.rift import interpolate

    summary = json.loads((smoke_run / "summary.json").read_text())
    at, _ = load_checkpoint(smoke_run / "checkpoints/at.pt")
    ft, _ = load_checkpoint(smoke_run / f"checkpoints/finetune/{summary['trial']}.pt")
    rift, meta = load_checkpoint(smoke_run / "checkpoints/rift.pt")
    expected = interpolate(at, ft, summary["alpha"])
    assert all(torch.equal(rift[k], expected[k]) for k in expected)
    assert meta["arch"] == "small_resnet"


def test_rerun_reuses_every_stage(smoke_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = {
        p: p.stat().st_mtime_ns
        for p in smoke_run.rglob("*")
        if p.is_file() and "ray" not in p.parts
    }
    code = main(
        [
            "sweep",
            SMOKE,
            "--storage",
            str(smoke_run.parent),
            "--name",
            "t",
            *FAST,
            *EVAL,
            *STRATEGIES,
            *WANDB,
        ]
    )
    assert code == 0
    err = capsys.readouterr().err
    assert err.count("done earlier") == 4, err
    after = {p: p.stat().st_mtime_ns for p in before}
    changed = [str(p.relative_to(smoke_run)) for p in before if before[p] != after[p]]
    assert set(changed) <= {"config.yaml", "manifest.json", "logs/ray.log"}, changed
    # nothing new either: no W&B run (every stage was reused), no other file
    new = [p for p in smoke_run.rglob("*") if p.is_file() and "ray" not in p.parts]
    assert sorted(map(str, new)) == sorted(map(str, before))


def test_restart_interpolate_keeps_the_rest_and_the_old_result(
    smoke_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--restart interpolate`` on a copy: stages 1-3 reused, stage 4 computed again, the
    replaced stage-4 outputs kept under history/."""
    shutil.copytree(smoke_run, tmp_path / "t", ignore=shutil.ignore_patterns("ray", "wandb"))
    t = tmp_path / "t"
    at, before = (t / "checkpoints/at.pt").read_bytes(), (t / "summary.json").read_text()
    h4 = json.loads((t / "stages/interpolate.json").read_text())["hash"]
    code = main(["sweep", SMOKE, "--storage", str(tmp_path), "--name", "t", *FAST, *EVAL,
                 *STRATEGIES, "--restart", "interpolate"])  # fmt: skip
    assert code == 0
    err = capsys.readouterr().err
    for n, stage in enumerate(("adv_train", "mrc", "finetune"), 1):
        assert f"stage {n}/4 {stage}: done earlier" in err, err
    assert "stage 4/4 interpolate: done earlier" not in err
    assert (
        f"--restart interpolate: recomputing interpolate; earlier results kept in {t}/history/"
        in err
    )
    assert (t / "checkpoints/at.pt").read_bytes() == at
    assert (t / f"history/interpolate-{h4}/summary.json").read_text() == before
    old, new = json.loads(before), json.loads((t / "summary.json").read_text())
    assert (new["trial"], new["alpha"], new["rift"]) == (old["trial"], old["alpha"], old["rift"])

    # an edited interpolate.alphas: stage 4 alone is recomputed, announced with the field,
    # and the outputs it replaces (and the config they ran with) are kept under history/
    h4b = json.loads((t / "stages/interpolate.json").read_text())["hash"]
    replaced = (t / "tables/interpolation.parquet").read_bytes()
    code = main(["sweep", SMOKE, "--storage", str(tmp_path), "--name", "t", *FAST, *EVAL,
                 *STRATEGIES, "--set", "interpolate.alphas=[0.0,1.0]"])  # fmt: skip
    assert code == 0
    err = " ".join(capsys.readouterr().err.split())
    assert (
        f"stage 4/4 interpolate: config changed (interpolate.alphas): the stored result (hash "
        f"{h4b}) will be recomputed; it moves to history/" in err
    ), err[-3000:]
    kept = t / "history" / f"interpolate-{h4b}-2"
    assert (kept / "tables/interpolation.parquet").read_bytes() == replaced
    assert (t / "checkpoints/at.pt").read_bytes() == at
    alphas = {r["alpha"] for r in pq.read_table(t / "tables/interpolation.parquet").to_pylist()}
    assert alphas == {0.0, 1.0}
    # each config a re-run replaced (the W&B settings of the first run, then the alphas)
    configs = [yaml.safe_load(p.read_text()) for p in (t / "history").glob("config-*.yaml")]
    assert sorted(c["interpolate"]["alphas"] for c in configs) == [[0.0, 0.5, 1.0]] * 2
    # the confident rule (issue 21): stage 4 alone again (a held-out confirmation set would
    # also move fine-tuning: tests/test_paired.py covers it without Ray)
    code = main(["sweep", SMOKE, "--storage", str(tmp_path), "--name", "t", *FAST, *EVAL,
                 *STRATEGIES, "--set", "interpolate.alphas=[0.0,1.0]",
                 "--set", "interpolate.rule=confident"])  # fmt: skip
    assert code == 0
    out = " ".join(capsys.readouterr().out.split())
    conf = json.loads((t / "summary.json").read_text())
    assert conf["rule"] == "confident" and "alpha* rule: confident" in out
    assert all(c["reason"].startswith("confident rule") for c in conf["choices"])
    assert conf["noise_floor"] == {"val_n": 200, "robust_drop": 3.0, "tolerance": 0.1}
    assert "tolerance 0.1 is below the validation noise floor 3.00 points" in out
    images = pq.read_table(t / "tables/per_image.parquet").to_pylist()
    assert {r["split"] for r in images} == {"val", "test"}


def test_wandb_runs_logged_while_each_stage_ran(smoke_run: Path) -> None:
    """Offline runs under <sweep>/wandb/: every epoch, module and alpha point was logged
    before its stage ended (W&B is not dark until a stage is over)."""
    from wandb_offline import offline_run_dirs, read_offline_run

    runs = [read_offline_run(d, wait=30) for d in offline_run_dirs(str(smoke_run / "wandb"))]
    by_name = {r.info["name"]: r for r in runs}
    assert len(by_name) == len(runs)  # one run (one directory) per name on a fresh sweep
    ids = json.loads((smoke_run / "wandb/runs.json").read_text())["runs"]
    assert {e["id"] for e in ids.values()} == {r.info["id"] for r in runs}

    def ended(stage: str) -> float:
        rec = json.loads((smoke_run / f"stages/{stage}.json").read_text())
        return float(rec["started"]) + float(rec["seconds"])

    def row_times(name: str, key: str) -> list[float]:
        return [h["_timestamp"] for h in by_name[name].history if key in h]

    at = row_times("t-adv_train", "train/loss")
    assert len(at) == 2 and max(at) < ended("adv_train")
    mrc = row_times("t-mrc", "mrc")
    done = [r for r in pq.read_table(smoke_run / "tables/mrc.parquet").to_pylist()
            if r["status"] == "done"]  # fmt: skip
    assert len(mrc) == len(done)
    assert mrc and max(mrc) < ended("mrc")
    trials = pq.read_table(smoke_run / "tables/finetune.parquet").to_pylist()
    for t in trials:
        run = by_name[f"t-ft-{t['trial']}"]
        epochs = [h["epoch"] for h in run.history if "train/loss" in h]
        assert epochs == list(range(1, t["epochs"] + 1)), t["trial"]
        assert max(row_times(f"t-ft-{t['trial']}", "train/loss")) < ended("finetune")
        assert run.summary["asha/status"] == t["status"]
    points = row_times("t-interpolate", "val/clean_acc")
    assert points and max(points) < ended("interpolate")


def test_changed_config_recomputes_only_later_stages() -> None:
    """A changed field invalidates its stage and the later ones only (the pipeline skips a
    stage whose stored hash matches; test_default_strategy_result_is_unchanged runs that)."""
    from rift_ray.config import load_config
    from rift_ray.hashing import stage_hashes

    base = stage_hashes(load_config(SMOKE))
    order = ["adv_train", "mrc", "finetune", "interpolate"]
    for override, first in (
        ("interpolate.alphas=[0.0,1.0]", "interpolate"),
        ("finetune.lrs=[0.02]", "finetune"),
        ("mrc.epochs=2", "mrc"),
        ("adv_train.epochs=3", "adv_train"),
    ):
        changed = stage_hashes(load_config(SMOKE, overrides=[override]))
        i = order.index(first)
        assert all(changed[k] == base[k] for k in order[:i]), override
        assert all(changed[k] != base[k] for k in order[i:]), override


def test_status_command(smoke_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", str(smoke_run), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [s["status"] for s in out["stages"]] == ["done"] * 4
    assert out["summary"]["name"] == "t"


def test_dry_run_computes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["sweep", SMOKE, "--storage", str(tmp_path), "--name", "dry", "--dry-run", *FAST])
    assert code == 0
    out = capsys.readouterr().out
    assert "mrc" in out and "Tune trials" in out and "GPU-h" in out and "PFLOP" in out
    assert not (tmp_path / "dry" / "stages").exists()


# -- seeds: [0, 1] -----------------------------------------------------------------------------
# Smaller still: two MRC modules, one learning rate, two alphas, and no adversarial
# training: the seeds start from the main run's AT model (one TorchTrainer start less).
SEEDS_BASE = [
    *FAST,
    "--set", "mrc.include=[layer2.0.conv1,linear]",
    "--set", "finetune.lrs=[0.02]",
    "--set", "interpolate.alphas=[0.0,1.0]",
    "--set", "seeds=[0,1]",
    "--set", "finetune.asha.mode=async",  # Tune's ASHA still runs (and records its decision)
]  # fmt: skip


@pytest.fixture(scope="module")
def seeds_args(smoke_run: Path) -> list[str]:
    return [*SEEDS_BASE, "--set", f"adv_train.checkpoint={smoke_run / 'checkpoints/at.pt'}"]


@pytest.fixture(scope="module")
def seeds_run(ray_session, tmp_path_factory, seeds_args):
    storage = tmp_path_factory.mktemp("storage")
    assert main(["sweep", SMOKE, "--storage", str(storage), "--name", "s", *seeds_args]) == 0
    return storage / "s"


def test_seeds_sweep_layout_and_aggregate(seeds_run: Path) -> None:
    import statistics

    import torch

    from rift_ray.aggregate import figures

    assert (seeds_run / "checkpoints/at.pt").is_file()
    assert sorted(p.name for p in (seeds_run / "stages").iterdir()) == ["adv_train.json"]
    for rel in ("summary.json", "tables/summary.parquet", "tables/seeds.parquet"):
        assert (seeds_run / rel).is_file(), rel
    per_seed = {}
    for seed in (0, 1):
        d = seeds_run / "seeds" / str(seed)
        for rel in ("stages/mrc.json", "stages/finetune.json", "stages/interpolate.json",
                    "tables/mrc.parquet", "tables/interpolation.parquet", "checkpoints/rift.pt",
                    "artifacts/adv_set.pt", "manifest.json", "summary.json"):  # fmt: skip
            assert (d / rel).is_file(), (seed, rel)
        assert (d / "ray").is_dir()
        per_seed[seed] = json.loads((d / "summary.json").read_text())
        rungs = pq.read_table(d / "tables/finetune_rungs.parquet").to_pylist()
        assert [(r["rung"], r["decision"]) for r in rungs] == [(1, "kept")]  # one trial
        assert per_seed[seed]["seed"] == seed
        assert (d / f"checkpoints/finetune/{per_seed[seed]['trial']}.pt").is_file()
    # one validation split: the same images (labels) attacked with other PGD starts per seed
    adv = [torch.load(seeds_run / f"seeds/{s}/artifacts/adv_set.pt") for s in (0, 1)]
    assert torch.equal(adv[0]["targets"], adv[1]["targets"])
    assert not torch.equal(adv[0]["inputs"], adv[1]["inputs"])
    summary = json.loads((seeds_run / "summary.json").read_text())
    assert summary["seeds"] == [0, 1] and summary["n"] == 2
    assert [s["seed"] for s in summary["per_seed"]] == [0, 1]
    f0, f1 = figures(per_seed[0]), figures(per_seed[1])
    assert set(f0) == set(f1) and ("rift", "test", "clean_acc") in f0
    for path in f0:
        node_mean, node_std = summary["mean"], summary["std"]
        for k in path:
            node_mean, node_std = node_mean[k], node_std[k]
        assert node_mean == pytest.approx(statistics.fmean([f0[path], f1[path]])), path
        assert node_std == pytest.approx(statistics.stdev([f0[path], f1[path]])), path
    assert sum(summary["chosen"]["modules"].values()) == 2


def test_seeds_rerun_reuses_everything(
    seeds_run: Path, seeds_args: list[str], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    before = {
        p: p.stat().st_mtime_ns
        for p in seeds_run.rglob("*")
        if p.is_file() and "ray" not in p.parts
    }
    assert (
        main(["sweep", SMOKE, "--storage", str(seeds_run.parent), "--name", "s", *seeds_args]) == 0
    )
    cap = capsys.readouterr()
    assert cap.err.count("done earlier") == 1 + 2 * 3 + 1, cap.err
    assert "± " in cap.out and "(n=2)" in cap.out
    changed = [str(p.relative_to(seeds_run)) for p in before if before[p] != p.stat().st_mtime_ns]
    assert set(changed) <= {"config.yaml", "manifest.json", "logs/ray.log"}, changed
    # adding a seed: the plan reuses seeds 0 and 1 and runs only seed 2
    more = [*seeds_args, "--set", "seeds=[0,1,2]"]
    assert (
        main(
            ["sweep", SMOKE, "--storage", str(seeds_run.parent), "--name", "s", "--dry-run", *more]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert out.count("[done (will be reused)]") == 1 + 2 * 3 and out.count("[to run]") == 3, out
    assert "seed 2 -> " in out
    assert not (seeds_run / "seeds" / "2").exists()


# The commands around a finished sweep, on this module's sweeps (tests/sweep_commands.py)
from sweep_commands import (  # noqa: E402
    test_compare_a_sweep_and_a_seeds_sweep,
    test_eval_reproduces_the_sweeps_at_figures,
    test_eval_seed_reproduces_one_seed_of_a_seeds_sweep,
    test_export_loads_into_the_model_and_equals_rift_pt,
    test_report_has_the_rift_views,
)

__all__ = [
    "test_compare_a_sweep_and_a_seeds_sweep",
    "test_report_has_the_rift_views",
    "test_eval_reproduces_the_sweeps_at_figures",
    "test_eval_seed_reproduces_one_seed_of_a_seeds_sweep",
    "test_export_loads_into_the_model_and_equals_rift_pt",
]
