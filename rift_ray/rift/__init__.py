"""The RiFT method in plain PyTorch (no Ray), one stage per file:

1. ``train.py``        adversarial training, one epoch at a time (PGD-AT, TRADES)
2. ``mrc.py``          fixed adversarial set; module robust criticality of one module (or a set)
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
    JointMRCResult,
    MRCBase,
    MRCResult,
    adversarial_set,
    decode_adversarial_set,
    encode_adversarial_set,
    joint_robust_criticality,
    module_robust_criticality,
    mrc_base,
    mrc_table,
    project_l2_ball,
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
    "JointMRCResult",
    "MRCBase",
    "MRCResult",
    "STRATEGIES",
    "ScoredSet",
    "adversarial_set",
    "adversarial_train_epoch",
    "decode_adversarial_set",
    "encode_adversarial_set",
    "finetune",
    "greedy_joint_selection",
    "interpolate",
    "joint_robust_criticality",
    "module_robust_criticality",
    "mrc_base",
    "mrc_table",
    "project_l2_ball",
    "random_modules",
    "search_alpha",
    "select_alpha",
    "trainable_parameters",
]
