"""``seeds: [...]``: config, stage hashes, storage layout, the mean/std over seeds, and how
report, status, the printed summary and W&B show them (no Ray; the sweep is in test_sweep.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from rift_ray import store as layout
from rift_ray.aggregate import aggregate, mean_std, mean_std_text, seeds_summary
from rift_ray.cli import main, print_summary
from rift_ray.config import ConfigError, SweepConfig, load_config, to_yaml
from rift_ray.hashing import config_hash, stage_hashes
from rift_ray.report import render_html
from rift_ray.results import SEEDS_SCHEMA, SEEDS_SUMMARY_SCHEMA, SweepResults, summary_table
from rift_ray.status import status_lines, sweep_status
from rift_ray.store import Store

SMOKE = Path(__file__).resolve().parents[1] / "sweeps" / "smoke.yaml"


# -- config ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, message",
    [
        ("seeds=[]", "seeds: must not be empty"),
        ("seeds=[0,-1]", "seeds[1]: must be >= 0"),
        ("seeds=[1,2,1]", "seeds: must be distinct (repeated: 1)"),
        ("seeds=abc", "seeds: Input should be a valid list"),
        ("seeds=[0.5]", "seeds[0]: Input should be a valid integer"),
        ("seeds=3", "seeds: Input should be a valid list"),
    ],
)
def test_bad_seeds_are_one_line_errors_naming_seeds(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[override])
    text = str(info.value)
    assert text.startswith(message), text
    assert "\n" not in text


def test_unset_seeds_change_nothing() -> None:
    """Without seeds the config dict and YAML have no seeds key, and the stage hashes are those
    from before seeds existed: fields added since leave the hashes alone at the value every
    sweep ran before them (hashing.NEW_DEFAULTS), so stored sweeps stay valid. The pinned
    values are those commit 6242904 computed for sweeps/smoke.yaml with top_k 1 (558e6d1's
    adv_train and MRC hashes)."""
    cfg = load_config(SMOKE)
    assert cfg.seeds is None and "seeds" not in cfg.to_dict() and "seeds" not in to_yaml(cfg)
    # finetune.asha.mode / finetune.score: what every sweep ran before the fields existed
    # (async ASHA, the penalised score, the whole grid measured on test too) hashes as then
    old = ["finetune.asha.mode=async", "finetune.score=penalised"]
    grid = ["interpolate.search=grid", "interpolate.test_curve=true"]
    before = load_config(SMOKE, overrides=old + grid)
    assert stage_hashes(before) == {
        "adv_train": "b8a6f920c317",
        "mrc": "f9b7d0fb3abb",
        "finetune": "07e980b17eb4",
        "interpolate": "6e8eaf533581",
    }
    # ... the new defaults (sync halving, the rule's score) change fine-tuning's results, so
    # its hash, on purpose
    now = stage_hashes(cfg)
    assert now["mrc"] == "f9b7d0fb3abb" and now["finetune"] != "07e980b17eb4"
    # stage 4's new defaults (clean_first, no test curve) store fewer rows: only its hash moves
    stage4 = stage_hashes(load_config(SMOKE, overrides=old))
    assert stage4["finetune"] == "07e980b17eb4" and stage4["interpolate"] != "6e8eaf533581"
    rule_async = stage_hashes(load_config(SMOKE, overrides=["finetune.asha.mode=async"]))
    assert rule_async["finetune"] not in ("07e980b17eb4", now["finetune"])
    # a new field away from its default does change the hashes it belongs to
    searched = stage_hashes(load_config(SMOKE, overrides=["interpolate.search=monotone"]))
    assert searched["mrc"] == "f9b7d0fb3abb" and searched["interpolate"] != now["interpolate"]


def test_seed_hashes_share_adv_training_and_ignore_the_other_seeds() -> None:
    two = load_config(SMOKE, overrides=["seeds=[0,1]"])
    three = load_config(SMOKE, overrides=["seeds=[0,1,2]"])
    single = stage_hashes(load_config(SMOKE))
    h0, h1 = stage_hashes(two, 0), stage_hashes(two, 1)
    assert h0["adv_train"] == h1["adv_train"] == single["adv_train"]  # one AT model
    for stage in ("mrc", "finetune", "interpolate"):
        assert len({h0[stage], h1[stage], single[stage]}) == 3
    assert stage_hashes(three, 1) == h1  # adding seed 2 leaves seed 1's results valid
    s1 = two.for_seed(1)
    assert (s1.seed, s1.seeds, two.seed) == (1, [0, 1], 0)
    assert s1.model_dump(exclude={"seed"}) == two.model_dump(exclude={"seed"})


# -- aggregation ---------------------------------------------------------------------------------


def seed_summary(seed: int, at_clean: float, rift_clean: float, alpha: float, **kw: Any) -> dict:
    return {
        "name": "fake",
        "seed": seed,
        "modules": kw.get("modules", ["conv1"]),
        "lr": kw.get("lr", 0.01),
        "trial": f"{kw.get('modules', ['conv1'])[0]}_lr{kw.get('lr', 0.01):g}",
        "alpha": alpha,
        "clean_gain_val": rift_clean - at_clean,
        "robust_drop_val": 0.0,
        "reason": "ok",
        "choices": [{"trial": "conv1_lr0.01", "alpha": alpha, "feasible": True}],
        "at": {
            "val": {"clean_acc": at_clean, "robust_acc": 40.0},
            "test": {"clean_acc": at_clean, "robust_acc": 39.0 + seed},
        },
        "rift": {
            "val": {"clean_acc": rift_clean, "robust_acc": 40.0},
            "test": {"clean_acc": rift_clean, "robust_acc": 39.0 + seed},
        },
        "failures": kw.get("failures", []),
        "seconds": {"mrc": 1.0, "finetune": 2.0, "interpolate": 3.0, "total": 6.0},
        **({"autoattack": kw["autoattack"]} if "autoattack" in kw else {}),
    }


PER_SEED = [
    seed_summary(0, 78.0, 80.0, 0.5, autoattack={"at": {"robust_acc": 30.0, "clean_acc": 78.0}}),
    seed_summary(1, 78.0, 82.0, 0.7, autoattack={"at": {"robust_acc": 31.0, "clean_acc": 78.0}}),
    seed_summary(
        2, 81.0, 84.0, 0.9, modules=["fc"], failures=[{"stage": "mrc", "name": "x", "error": "e"}]
    ),
]


def test_mean_and_sample_std_by_hand() -> None:
    agg = aggregate(PER_SEED)
    mean, std, count = agg["mean"], agg["std"], agg["count"]
    assert agg["n"] == 3
    # rift test clean 80, 82, 84: mean 82, deviations -2, 0, 2 -> sqrt(8 / 2) = 2
    assert mean["rift"]["test"]["clean_acc"] == pytest.approx(82.0)
    assert std["rift"]["test"]["clean_acc"] == pytest.approx(2.0)
    # at test clean 78, 78, 81: mean 79, deviations -1, -1, 2 -> sqrt(6 / 2) = sqrt(3)
    assert mean["at"]["test"]["clean_acc"] == pytest.approx(79.0)
    assert std["at"]["test"]["clean_acc"] == pytest.approx(math.sqrt(3))
    # per-seed gains 2, 4, 3: mean 3, std 1 (also clean_gain_val)
    assert (mean["delta"]["test"]["clean_acc"], std["delta"]["test"]["clean_acc"]) == (
        pytest.approx(3.0),
        pytest.approx(1.0),
    )
    assert (mean["clean_gain_val"], std["clean_gain_val"]) == (3.0, 1.0)
    # alpha* 0.5, 0.7, 0.9 -> 0.7 +- 0.2; robust 39, 40, 41 -> 40 +- 1; constant -> std 0
    assert (mean["alpha"], std["alpha"]) == (pytest.approx(0.7), pytest.approx(0.2))
    assert (mean["at"]["test"]["robust_acc"], std["at"]["test"]["robust_acc"]) == (40.0, 1.0)
    assert (mean["rift"]["val"]["robust_acc"], std["rift"]["val"]["robust_acc"]) == (40.0, 0.0)
    # AutoAttack measured on two seeds only: n = 2, std of 30, 31 = sqrt(0.5)
    assert count["autoattack"]["at"]["robust_acc"] == 2 and count["alpha"] == 3
    assert mean["autoattack"]["at"]["robust_acc"] == 30.5
    assert std["autoattack"]["at"]["robust_acc"] == pytest.approx(math.sqrt(0.5))
    assert "corruption_acc" not in mean["at"]["test"]  # never measured: no figure
    assert agg["chosen"] == {
        "modules": {"conv1": 2, "fc": 1},
        "lr": {"0.01": 3},
        "trial": {"conv1_lr0.01": 2, "fc_lr0.01": 1},
    }


def test_one_seed_has_no_std_and_text_format() -> None:
    assert mean_std([5.0]) == (5.0, None)
    s = seeds_summary({"name": "x", "seeds": [0, 1, 2]}, PER_SEED, {"total": 1.0})
    assert mean_std_text(s, "rift", "test", "clean_acc") == "82.00 ± 2.00 (n=3)"
    assert mean_std_text(s, "alpha", n=False) == "0.70 ± 0.20"
    assert mean_std_text(s, "at", "test", "corruption_acc") == "-"
    one = seeds_summary({"name": "x", "seeds": [4]}, PER_SEED[:1], {"total": 1.0})
    assert mean_std_text(one, "rift", "test", "clean_acc") == "80.00 (n=1)"
    assert s["failures"] == [{"seed": 2, "stage": "mrc", "name": "x", "error": "e"}]
    assert [p["seed"] for p in s["per_seed"]] == [0, 1, 2]


# -- storage layout -----------------------------------------------------------------------------


def test_each_seed_has_its_own_sweep_directory(tmp_path: Path) -> None:
    store = Store.open(str(tmp_path), "sw")
    s3 = store.for_seed(3)
    assert s3.root == str(tmp_path / "sw" / "seeds" / "3") and s3.uri.endswith("sw/seeds/3")
    s3.put_table(layout.MRC_TABLE, [{"module": "conv1", "mrc": 0.1}], stage_hash="h")
    s3.write_stage("mrc", status="done", hash="h")
    assert (tmp_path / "sw/seeds/3/tables/mrc.parquet").is_file()
    assert (tmp_path / "sw/seeds/3/stages/mrc.json").is_file()
    assert (tmp_path / "sw/seeds/3/manifest.json").is_file()
    assert s3.stage_done("mrc", "h") and not store.stage_done("mrc", "h")
    assert s3.ray_storage()[0] == str(tmp_path / "sw/seeds/3/ray")
    store.for_seed(10).put_text("x.txt", "x")
    (tmp_path / "sw/seeds/notes").mkdir()
    assert store.seed_dirs() == [3, 10]


# -- report, status, printed summary, W&B ---------------------------------------------------------


def make_seeds_sweep(root: Path) -> Store:
    """A finished two-seed sweep directory as the pipeline writes it."""
    cfg = SweepConfig.model_validate({"name": "fake", "storage": str(root), "seeds": [0, 1]})
    store = Store.open(str(root), "fake")
    store.put_text(layout.CONFIG, to_yaml(cfg))
    store.write_stage("adv_train", status="done", hash="h1", seconds=10.0, history=[])
    per_seed = PER_SEED[:2]
    for seed, summ in zip((0, 1), per_seed):
        s = store.for_seed(seed)
        s.put_table(
            layout.MRC_TABLE,
            [
                {"module": "conv1", "mrc": 0.05 + seed, "status": "done", "error": ""},
                {"module": "fc", "mrc": 0.2, "status": "done", "error": ""},
            ],
        )
        s.write_stage("mrc", status="done", hash=f"m{seed}", seconds=5.0)
        s.put_table(
            layout.FINETUNE_TABLE,
            [{"trial": "conv1_lr0.01", "modules": "conv1", "lr": 0.01, "status": "finished"}],
        )
        s.put_table(
            layout.FINETUNE_EPOCHS_TABLE,
            [
                {"trial": "conv1_lr0.01", "epoch": e, "train_loss": 1.0, "train_acc": 60.0}
                for e in (1, 2)
            ],
        )
        s.write_stage("finetune", status="done", hash=f"f{seed}", seconds=7.0)
        s.put_table(
            layout.INTERPOLATION_TABLE,
            [
                {
                    "trial": "conv1_lr0.01",
                    "alpha": a,
                    "split": sp,
                    "clean_acc": 70.0 + a + seed,
                    "robust_acc": 40.0 - a,
                }
                for sp in ("val", "test")
                for a in (0.0, 0.5, 1.0)
            ],
        )
        s.put_json(layout.SUMMARY, summ)
        s.write_stage("interpolate", status="done", hash=f"i{seed}", seconds=3.0)
    summary = seeds_summary(
        {"name": "fake", "seed": 0, "seeds": [0, 1], "config_hash": config_hash(cfg)},
        per_seed,
        {"adv_train": 10.0, "seed 0": 6.0, "seed 1": 6.0, "total": 22.0},
    )
    store.put_json(layout.SUMMARY, summary)
    store.put_table(layout.SUMMARY_TABLE, summary_table(summary))
    from rift_ray.results import seeds_table

    store.put_table(layout.SEEDS_TABLE, seeds_table(summary))
    return store


def test_tables_and_exports_of_a_seeds_sweep(tmp_path: Path) -> None:
    store = make_seeds_sweep(tmp_path)
    rows = pq.read_table(tmp_path / "fake" / layout.SUMMARY_TABLE)
    assert rows.schema == SEEDS_SUMMARY_SCHEMA
    rift_test = next(r for r in rows.to_pylist() if (r["model"], r["split"]) == ("rift", "test"))
    # rift test clean 80, 82 -> 81 +- sqrt(2); alpha 0.5, 0.7 -> 0.6 +- sqrt(0.02)
    assert rift_test["clean_acc"] == 81.0 and rift_test["clean_acc_std"] == pytest.approx(2**0.5)
    assert rift_test["alpha"] == pytest.approx(0.6) and rift_test["n"] == 2
    assert rift_test["alpha_std"] == pytest.approx(0.02**0.5)
    per_seed = pq.read_table(tmp_path / "fake" / layout.SEEDS_TABLE)
    assert per_seed.schema == SEEDS_SCHEMA and per_seed.num_rows == 8  # 2 seeds x 2 models x 2
    res = SweepResults.load(store)
    assert sorted(res.seeds) == [0, 1]
    mrc = res.rows("mrc")
    assert [(r["seed"], r["module"]) for r in mrc] == [
        (0, "conv1"),
        (0, "fc"),
        (1, "conv1"),
        (1, "fc"),
    ]
    assert main(["report", store.root, "--format", "csv"]) == 0
    export = tmp_path / "fake" / "export"
    assert {p.name for p in export.iterdir()} >= {"mrc.csv", "interpolation.csv", "summary.csv",
                                                  "seeds.csv"}  # fmt: skip
    assert (export / "mrc.csv").read_text().splitlines()[0].startswith("seed,module")


def test_html_status_and_printed_summary_show_mean_and_std(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = make_seeds_sweep(tmp_path)
    html = render_html(SweepResults.load(store))
    assert "81.00 ± 1.41" in html  # RiFT test clean over seeds 0 and 1
    assert "seed 1: interpolate" in html and "<h2>Per seed</h2>" in html
    for fid in ("fig-before-after", "fig-mrc", "fig-finetune", "fig-interpolation"):
        assert f'id="{fid}"' in html, fid
    status = sweep_status(store)
    assert [(s.get("seed"), s["stage"], s["status"]) for s in status["stages"]] == [
        (None, "adv_train", "done"),
        *((seed, st, "done") for seed in (0, 1) for st in ("mrc", "finetune", "interpolate")),
    ]
    lines = status_lines(status)
    assert any(line.strip().startswith("s1 interpolate") and "alpha* 0.7" in line for line in lines)
    assert main(["status", store.root]) == 0
    out = capsys.readouterr().out
    assert "81.00 ± 1.41" in out and "alpha* 0.60 ± 0.14 (n=2)" in out
    assert "mean ± std over n=2 seeds" in out
    assert "seed 1: conv1, lr 0.01, alpha* 0.7" in out
    print_summary(json.loads((tmp_path / "fake" / layout.SUMMARY).read_text()))
    assert "AutoAttack (test): AT 30.50 ± 0.71 (n=2)" in capsys.readouterr().out


def test_wandb_summary_run_logs_mean_and_std(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from wandb_offline import offline_run_dirs, read_offline_run

    from rift_ray.hashing import stage_hashes
    from rift_ray.tracking import Tracker

    wb = tmp_path / "wb"
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(wb))
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_PROJECT", "WANDB_RUN_GROUP"):
        monkeypatch.delenv(var, raising=False)
    cfg = SweepConfig.model_validate({"name": "tiny", "storage": str(tmp_path), "seeds": [0, 1]})
    store = Store.open(str(tmp_path), "tiny")
    t = Tracker(cfg, store)
    child = t.for_seed(cfg.for_seed(1), store.for_seed(1), stage_hashes(cfg, 1))
    child.log_mrc([{"module": "conv1", "mrc": 0.1, "status": "done", "error": ""}])
    summary = seeds_summary({"name": "tiny", "seeds": [0, 1]}, PER_SEED[:2], {"total": 1.0})
    t.log_seeds(summary)
    t.finish()
    runs = {
        r.info["name"]: r
        for r in (
            read_offline_run(d, wait=30) for d in offline_run_dirs(str(tmp_path / "tiny/wandb"))
        )
    }
    assert set(runs) == {"tiny-s1-mrc", "tiny-summary"}
    assert runs["tiny-s1-mrc"].config["seed"] == 1
    assert (store.for_seed(1).read_stage("mrc") or {})["wandb"][0]["name"] == "tiny-s1-mrc"
    s = runs["tiny-summary"].summary
    assert s["mean/rift/test/clean_acc"] == 81.0
    assert s["std/rift/test/clean_acc"] == pytest.approx(2**0.5)
    assert s["n/rift/test/clean_acc"] == 2 and s["n"] == 2
    assert s["mean/autoattack/at/robust_acc"] == 30.5
    assert s["chosen/modules/conv1"] == 2 and s["chosen/lr/0.01"] == 2
    rows = runs["tiny-summary"].table("seeds/per_seed")
    assert [r["seed"] for r in rows] == [0, 1]
