"""The smoke sweep's settings in tests/test_sweep.py's end-to-end runs (``smoke_run``,
``seeds_run``): the shipped sweeps/smoke.yaml, made smaller and made to exercise more."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "sweeps" / "smoke.yaml")
# Smaller than the shipped smoke sweep so the suite stays quick; same flow.
FAST = [
    "--set", "adv_train.epochs=2",
    "--set", "data.synthetic.train_size=800",
    "--set", "data.val_size=200",
    "--set", "data.synthetic.test_size=200",
    "--set", "mrc.epochs=2",
    "--set", "mrc.adv_set_size=128",
    "--set", "finetune.lrs=[0.001,0.02]",
    "--set", "finetune.top_k=1",
    "--set", "finetune.epochs=2",
    "--set", "finetune.lr_milestones=[1]",
    "--set", "finetune.metric_subset=100",
    "--set", "finetune.metric_alphas=[0.5,1.0]",
    "--set", "interpolate.alphas=[0.0,0.5,1.0]",
    "--set", "wandb.enabled=false",  # W&B end to end: tests/test_faults.py, tests/test_tracking.py
]  # fmt: skip
# The main run also exercises regenerated corruptions and sharded AutoAttack on a few images.
EVAL = [
    "--set", "eval.corruptions=[gaussian_noise,contrast]",
    "--set", "eval.severities=[1,3]",
    "--set", "eval.corruption_source=generated",
    "--set", "eval.autoattack.enabled=true",
    "--set", "eval.autoattack.subset=4",
    "--set", "eval.autoattack.shard_size=2",
    "--set", "eval.autoattack.alphas=[1.0]",
]  # fmt: skip

# ... and compares the module selections (README "Module selection strategies").
STRATEGIES = [
    "--set", "finetune.strategies=[lowest,greedy,bn_stats]",  # random, highest: test_selection.py
    "--set", "finetune.greedy.candidates=2",
]  # fmt: skip

# ... and logs to W&B offline, live (README "Weights & Biases").
WANDB = ["--set", "wandb.enabled=true", "--set", "wandb.mode=offline"]
