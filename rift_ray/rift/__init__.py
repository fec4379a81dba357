"""The RiFT method in plain PyTorch (no Ray), one stage per file:

1. ``train.py``        adversarial training, one epoch at a time (PGD-AT, TRADES, FGSM-RS)
2. ``mrc.py``          fixed adversarial set; robust criticality of one module or a set
   ``mrc_fast.py``     its fast path: frozen batch norms, the cache, evaluation passes
   ``selection.py``    which module set(s) to fine-tune: lowest / greedy by joint MRC / random / highest
3. ``finetune.py``     fine-tune the chosen modules on clean data, one dict per epoch
4. ``interpolate.py``  interpolate AT and fine-tuned weights; choose alpha
"""

from rift_ray.rift.finetune import finetune, trainable_parameters
from rift_ray.rift.interpolate import (
    AlphaChoice,
    AlphaSearch,
    interpolate,
    search_alpha,
    select_alpha,
)
from rift_ray.rift.mrc import (
    MRCBase,
    MRCOptions,
    MRCResult,
    adversarial_set,
    mrc_base,
    mrc_table,
    project_l2_ball,
    robust_criticality,
)
from rift_ray.rift.selection import (
    STRATEGIES,
    ScoredSet,
    greedy_joint_selection,
    random_modules,
)
from rift_ray.rift.train import adversarial_train_epoch

__all__ = [
    "AlphaChoice",
    "AlphaSearch",
    "MRCBase",
    "MRCOptions",
    "MRCResult",
    "STRATEGIES",
    "ScoredSet",
    "adversarial_set",
    "adversarial_train_epoch",
    "finetune",
    "greedy_joint_selection",
    "interpolate",
    "mrc_base",
    "mrc_table",
    "project_l2_ball",
    "random_modules",
    "robust_criticality",
    "search_alpha",
    "select_alpha",
    "trainable_parameters",
]
