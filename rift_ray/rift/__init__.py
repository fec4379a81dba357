"""The RiFT method in plain PyTorch (no Ray), one stage per file:

1. ``train.py``        adversarial training, one epoch at a time (PGD-AT, TRADES)
2. ``mrc.py``          fixed adversarial set; module robust criticality of one module
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
    MRCResult,
    adversarial_set,
    decode_adversarial_set,
    encode_adversarial_set,
    module_robust_criticality,
    mrc_table,
    project_l2_ball,
)
from rift_ray.rift.train import adversarial_train_epoch

__all__ = [
    "AlphaChoice",
    "AlphaSearch",
    "MRCResult",
    "adversarial_set",
    "adversarial_train_epoch",
    "decode_adversarial_set",
    "encode_adversarial_set",
    "finetune",
    "interpolate",
    "module_robust_criticality",
    "mrc_table",
    "project_l2_ball",
    "search_alpha",
    "select_alpha",
    "trainable_parameters",
]
