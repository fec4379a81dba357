"""One sweep = one YAML file, validated into a frozen, typed config.

    cfg = load_config("sweeps/smoke.yaml", overrides=["finetune.lrs=[0.001,0.005]"])

Unknown keys, wrong types and out-of-range values raise :class:`ConfigError`, whose
message names the field path, e.g. ``finetune.lrs[2]: must be > 0``.
Numbers may be written as fractions (``eps: 8/255``). Strings that name paths may
use environment variables (``root: ${RIFT_CIFAR10_ARCHIVE}``).
"""

from __future__ import annotations

import os
import re
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from rift_ray.config_text import ConfigError as ConfigError  # re-exported
from rift_ray.config_text import apply_overrides as apply_overrides
from rift_ray.config_text import format_validation_error as format_validation_error
from rift_ray.config_text import read_yaml as read_yaml

_FRACTION = re.compile(r"^\s*([0-9.eE+-]+)\s*/\s*([0-9.eE+-]+)\s*$")


def _fraction(value: Any) -> Any:
    """Accept ``"8/255"`` as a float; leave everything else to pydantic."""
    if isinstance(value, str):
        m = _FRACTION.match(value)
        if m:
            try:
                return float(m.group(1)) / float(m.group(2))
            except (ValueError, ZeroDivisionError):
                return value
    return value


# schema: a number or a string such as "8/255" (rift-ray schema, for editors)
_FromFraction = BeforeValidator(_fraction, json_schema_input_type=float | str)
Float = Annotated[float, _FromFraction]
PosFloat = Annotated[float, _FromFraction, Field(gt=0)]
NonNegFloat = Annotated[float, _FromFraction, Field(ge=0)]
PosInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]


class _Section(BaseModel):
    # attribute docstrings become the schema's descriptions (rift-ray schema)
    model_config = ConfigDict(
        extra="forbid", frozen=True, strict=False, use_attribute_docstrings=True
    )


class SyntheticConfig(_Section):
    """The offline default: class-dependent patterns plus noise, no files needed."""

    num_classes: Annotated[int, Field(ge=2)] = 10
    train_size: PosInt = 2000
    test_size: PosInt = 500
    image_size: Annotated[int, Field(ge=8)] = 32
    noise: NonNegFloat = 0.15


class DataConfig(_Section):
    dataset: Literal["synthetic", "cifar10", "cifar100", "tinyimagenet", "imagefolder"] = (
        "synthetic"
    )
    root: str | None = None
    """Directory (or, for imagefolder, a .tar/.tar.gz archive). torchvision datasets
    download here when ``download`` is true. Default: ``$RIFT_DATA_ROOT`` or ``~/.cache/rift-ray/data``."""
    download: bool = True
    cache_dir: str | None = None
    """Where archives are extracted and decoded arrays cached. Default ``~/.cache/rift-ray``."""
    val_size: NonNegInt | None = None
    """Images held out of train (seeded) for validation: checkpoint choice, MRC, alpha*.
    Default: 5,000 for CIFAR, 10,000 for Tiny-ImageNet, 10% of train otherwise."""
    train_subset: PosInt | None = None
    test_subset: PosInt | None = None
    augment: bool = True
    crop_padding: NonNegInt = 4
    """Pixels of (reflect) padding before the random crop of training images. Unset: the
    reference's, 8 for Tiny-ImageNet (64x64) and 4 otherwise; filled in when the config is
    read, so a Tiny-ImageNet sweep's config and stage hashes say 8 (stored Tiny-ImageNet
    sweeps of earlier versions, which padded 4, are recomputed)."""
    synthetic: SyntheticConfig = SyntheticConfig()

    @model_validator(mode="before")
    @classmethod
    def _reference_crop_padding(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("crop_padding") is None:
            pad = 8 if data.get("dataset") == "tinyimagenet" else 4
            data = {**data, "crop_padding": pad}
        return data


class ModelConfig(_Section):
    arch: Literal["resnet18", "resnet34", "wrn", "preact_resnet18", "small_resnet", "small_cnn"] = (
        "small_resnet"
    )
    depth: Annotated[int, Field(ge=10)] = 34
    widen_factor: PosInt = 10

    @model_validator(mode="after")
    def _wrn_depth(self) -> ModelConfig:
        if self.arch == "wrn" and (self.depth - 4) % 6 != 0:
            raise ValueError("depth: WideResNet depth must be 6n+4 (e.g. 28, 34)")
        return self


class AttackConfig(_Section):
    """L-inf PGD used for adversarial training, the MRC adversarial set and evaluation."""

    eps: Annotated[float, _FromFraction, Field(gt=0, le=1)] = 8 / 255
    step_size: Annotated[float, _FromFraction, Field(gt=0, le=1)] = 2 / 255
    steps: PosInt = 10
    random_start: bool = True


class AdvTrainConfig(_Section):
    checkpoint: str | None = None
    """An existing robust model: skips training. A file (our format, a plain or wrapped state
    dict, a RobustBench ``.pt``) or RobustBench's ``model_dir/<name>`` (docs/checkpoints.md)."""
    checkpoint_normalization: Literal["dataset", "none", "rift_reference", "robustbench"] = (
        "dataset"
    )
    """For a checkpoint without normalization keys, how its network normalized its inputs:
    with the dataset mean/std outside itself (``dataset``), not at all (``none``), as the RiFT
    reference code did (``rift_reference``: CIFAR-10 statistics for CIFAR-10 and CIFAR-100,
    ImageNet's for Tiny-ImageNet) or as RobustBench's model class does (``robustbench``)."""
    method: Literal["pgd", "trades", "fgsm_rs", "free"] = "pgd"
    """``pgd`` (PGD-AT on ``attack``), ``trades``, ``fgsm_rs``: FGSM from a random start,
    one step of ``fgsm_step`` x eps (Wong et al. 2020), about 2.5x faster per epoch than PGD-5
    (benchmarks/README.md), or ``free`` (Shafahi et al. 2019: every minibatch replayed
    ``free_replays`` times, the perturbation carried over; ``epochs`` counts passes, so set it
    to the PGD-AT epochs / free_replays). The stage's per-epoch validation PGD check keeps the
    best epoch and never one that collapsed (``rift_ray.rift.train.best_epoch``)."""
    trades_beta: PosFloat = 6.0
    fgsm_step: Annotated[float, _FromFraction, Field(gt=0, le=2)] = 1.25
    """FGSM-RS's step as a fraction of ``attack.eps`` (1.25: 10/255 at 8/255). At most 2: a
    longer step from the random start is clipped by the eps-ball anyway."""
    free_replays: Annotated[int, Field(ge=1, le=64)] = 8
    """``free``: replays of each minibatch (the paper's m; 8 for CIFAR-10)."""
    epochs: PosInt = 110
    batch_size: PosInt = 128
    lr: PosFloat = 0.1
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    weight_decay: NonNegFloat = 5e-4
    lr_milestones: list[PosInt] = [100, 105]
    lr_gamma: PosFloat = 0.1
    checkpoint_every: PosInt = 1
    max_failures: NonNegInt = 3
    sync_bn: bool | None = None
    """SyncBatchNorm over the adversarial-training workers: BatchNorm statistics of the whole
    batch (``batch_size``, as on one GPU in the paper) instead of each worker's share of it.
    Unset: on when ``resources.adv_train`` has more than one worker. torch's SyncBatchNorm
    trains on GPUs only, so on CPU workers unset means off (the start-up line says so) and
    ``true`` is an error. On, it changes the results, so it enters the adv_train hash (stored
    multi-GPU sweeps of earlier versions are recomputed); off, single-worker or on CPU, the
    hashes stay those of before (:meth:`uses_sync_bn`)."""

    def uses_sync_bn(self, resources: ATResources) -> bool:
        """Whether training converts BatchNorm to SyncBatchNorm on ``resources``: ``sync_bn``,
        or by default more than one worker; never with one worker (nothing to synchronise)
        nor on CPU. :class:`ConfigError` for ``sync_bn: true`` on CPU workers."""
        if self.sync_bn and not resources.use_gpu:
            raise ConfigError(
                "adv_train.sync_bn: true needs GPU workers (resources.adv_train.use_gpu: true); "
                "torch's SyncBatchNorm does not train on CPU"
            )
        wanted = resources.num_workers > 1 if self.sync_bn is None else self.sync_bn
        return wanted and resources.use_gpu and resources.num_workers > 1


class MRCConfig(_Section):
    epsilon: PosFloat = 0.1
    epochs: PosInt = 10
    batch_size: PosInt = 512
    lr: PosFloat = 1.0
    projection: Literal["epoch", "step"] = "epoch"
    shuffle: bool = True
    fast: bool = True
    """Cache what is frozen before the perturbed module (its block's input, inside residual
    blocks the frozen branch and shortcut) and run only the module onward; reuse each
    evaluation's first batch for the next ascent step; compute the unperturbed loss and the
    first step's gradient once for all modules (artifacts/mrc_base.pt); backpropagate the
    frozen batch norms' input gradient only (identical results on CPU;
    benchmarks/README.md). False = the reference procedure."""
    channels_last: bool = False
    """channels_last memory format in the ascent (faster on CPU/GPU, MRC differs ~1e-5).
    ``compute.channels_last`` turns it on for every stage, MRC included."""
    adv_set_format: Literal["float32", "uint16", "uint8"] = "float32"
    """How the fixed adversarial set is stored and shipped to trials: float32 (exact),
    uint16 (16-bit fixed point, half the size, values within 7.6e-6) or uint8 (a quarter,
    the perturbation rounded to the 1/255 grid). rift_ray.advset.encode_adversarial_set."""
    adv_set_size: PosInt | None = None
    """Images of the validation split attacked once to form the fixed adversarial set (default: all)."""
    include: list[str] = []
    """fnmatch patterns; empty = every Conv2d/Linear."""
    exclude: list[str] = []


class ASHAConfig(_Section):
    grace_period: PosInt = 2
    reduction_factor: Annotated[float, Field(gt=1)] = 2.0
    mode: Literal["sync", "async"] = "sync"
    """``sync``: successive halving, each rung decided once all its trials reported (the same
    sweep picks the same trials); ``async``: Tune's ASHA (faster on a busy cluster, but which
    trials go on depends on which report first). See ``rift_ray.stages.rungs``."""


Strategy = Literal[
    "lowest", "lowest_k", "greedy", "random", "highest", "full", "last_layer", "bn_stats",
    "first_block",
]  # fmt: skip
"""The closed set of module-selection strategies; what each means: ``rift_ray.rift.selection``."""


class GreedyConfig(_Section):
    """The ``greedy`` strategy: a set grown by joint MRC (``rift_ray.rift.greedy_joint_selection``)."""

    size: Annotated[int, Field(ge=2)] = 2
    """Modules in the set (the lowest-MRC module plus size - 1 added greedily)."""
    candidates: PosInt = 3
    """Per step, how many of the next-lowest single-MRC modules are scored with the set."""


class FinetuneConfig(_Section):
    top_k: PosInt = 1
    """The ``lowest_k`` strategy fine-tunes each of the top_k lowest-MRC modules (one trial
    set each; the best by validation wins). ``lowest`` is always the single lowest."""
    joint: bool = False
    """``lowest_k`` also fine-tunes the top_k modules together as one trial (the paper's top-k ablation)."""
    strategies: Annotated[list[Strategy], Field(min_length=1)] = ["lowest"]
    """Module selections to run and compare in this sweep: ``lowest`` (the paper's RiFT: the
    single lowest-MRC module), ``lowest_k`` (best of the top_k lowest), ``greedy`` (a set
    chosen by joint MRC), ``random`` (``random_draws`` seeded random modules), ``highest``
    (the most critical module), and the ablations ``full`` (every weight), ``last_layer``
    (the classifier), ``bn_stats`` (no weight; BatchNorm statistics re-estimated on clean
    data) and ``first_block`` (the first stage). See ``rift_ray.rift.selection``."""
    primary: Strategy = "lowest"
    """The strategy whose best trial is the sweep's final RiFT model; the others are comparisons."""
    greedy: GreedyConfig = GreedyConfig()
    random_draws: PosInt = 1
    """Modules the ``random`` strategy draws (each fine-tuned alone), seeded with the sweep seed."""
    lrs: Annotated[list[PosFloat], Field(min_length=1)] = [0.001, 0.005, 0.01]
    epochs: PosInt = 10
    batch_size: PosInt = 128
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    weight_decay: NonNegFloat = 5e-4
    lr_milestones: list[PosInt] = [5]
    lr_gamma: PosFloat = 0.1
    asha: ASHAConfig = ASHAConfig()
    metric_subset: PosInt = 1000
    """Validation images used for the per-epoch ASHA metric (interpolated-model gain)."""
    score: Literal["rule", "penalised"] = "rule"
    """The ASHA metric (``val_score``), which also picks the epoch that is interpolated:
    ``rule``: the paper's rule on the metric alphas (the largest clean gain among those whose
    robust drop is within interpolate.tolerance); a trial with no such alpha ranks below every
    trial with one, by its penalised score. ``penalised``: the penalised score over every
    metric alpha, feasible or not (sweeps before this field). See
    ``rift_ray.rift.finetune.asha_score``."""
    metric_penalty: NonNegFloat = 2.0
    """The penalised score: clean gain minus this x robust drop beyond interpolate.tolerance
    (points); with ``score: rule`` it only ranks trials that have no feasible alpha."""
    metric_alphas: Annotated[list[Annotated[float, Field(ge=0, le=1)]], Field(min_length=1)] = [
        0.5,
        0.7,
        0.9,
    ]

    @model_validator(mode="after")
    def _strategies(self) -> FinetuneConfig:
        for i, s in enumerate(self.strategies):
            if s in self.strategies[:i]:
                raise ValueError(f"strategies: {s!r} is listed twice")
        if self.primary not in self.strategies:
            raise ValueError(
                f"primary: {self.primary!r} is not one of finetune.strategies {self.strategies}"
            )
        if (self.top_k > 1 or self.joint) and "lowest_k" not in self.strategies:
            what = f"top_k: {self.top_k}" if self.top_k > 1 else "joint: true"
            raise ValueError(
                f"{what} applies to the lowest_k strategy (best of the top_k lowest-MRC "
                "modules by validation), which finetune.strategies does not list; `lowest` is "
                "the paper's single lowest-MRC module. Add lowest_k to finetune.strategies "
                "(and primary: lowest_k to keep it as the final model), or set top_k: 1"
            )
        return self

    def selection_settings(self) -> dict[str, Any]:
        """What the module selection depends on beyond top_k/joint; {} for the default
        (``strategies: [lowest]``), so sweeps from before the option keep their stage hashes."""
        if self.strategies == ["lowest"]:
            return {}
        out: dict[str, Any] = {"strategies": sorted(self.strategies)}
        if "greedy" in self.strategies:
            out["greedy"] = self.greedy.model_dump()
        if "random" in self.strategies:
            out["random_draws"] = self.random_draws
        return out


SELECTION_FIELDS = ("strategies", "primary", "greedy", "random_draws")
"""FinetuneConfig fields that stage hashes take through ``selection_settings`` (and primary)."""


def _default_alphas() -> list[float]:
    return [round(i / 10, 10) for i in range(11)]


class InterpolateConfig(_Section):
    alphas: Annotated[list[Annotated[float, Field(ge=0, le=1)]], Field(min_length=1)] = Field(
        default_factory=_default_alphas
    )
    tolerance: NonNegFloat = 0.1
    """Robust accuracy (points) the interpolated model may lose against the AT model."""
    alphas_per_task: PosInt = 4
    rule: Literal["paper", "confident"] = "paper"
    """How alpha* is chosen on validation. ``paper``: the largest clean gain whose robust drop
    is at most ``tolerance`` (the paper's rule, on point estimates). ``confident``: the largest
    clean gain whose paired 95% interval of the robust drop (bootstrap over the validation
    images) lies within ``tolerance`` and whose clean gain's interval lies above 0; otherwise
    alpha 0 (``rift_ray.rift.confidence``). Point estimates on a few thousand images are too
    noisy for a 0.1-point tolerance: the paper rule picks the alpha whose drop is most
    under-estimated (docs/evaluation.md, "Noise")."""
    confirm_size: NonNegInt = 0
    """Validation images held out of selection (the first N of the validation split): alpha*
    is confirmed on them before it is reported (0: no confirmation)."""
    search: Literal["clean_first", "grid", "monotone"] = "clean_first"
    """How much of the validation grid is measured. ``clean_first``: clean accuracy at every
    alpha, then PGD down the alphas in order of clean gain until the rule is met: always the
    grid's alpha*, with PGD only where it decides (``rift_ray.rift.clean_first``). ``grid``: PGD
    at every alpha (whole validation curves in the report). ``monotone``: a binary search for
    the last alpha within the tolerance (the grid's alpha* only when the curves are
    monotone; the whole grid when the measured points are not)."""
    test_curve: bool = False
    """Measure test PGD and corruptions at every alpha of every trial (the report then draws
    the test curves). Off: at alpha 0 and each trial's alpha* only, which is all the
    summary, the strategy table and the paired intervals use."""


class AutoAttackConfig(_Section):
    """AutoAttack, the official implementation (``pyautoattack``, "standard" version) at
    L-inf ``attack.eps`` (``docs/evaluation.md``). ``subset``: the first N test images (None = all);
    ``shard_size``: images per Ray task (each shard is stored as it finishes).
    """

    enabled: bool = False
    version: Literal["standard"] = "standard"
    subset: PosInt | None = 1000
    shard_size: PosInt = 250
    alphas: list[Annotated[float, Field(ge=0, le=1)]] = []
    """More points of the winning trial's interpolation curve to attack, besides the AT model
    (alpha 0) and alpha*; each result lands in ``tables/interpolation.parquet``
    (``autoattack_acc`` of its test row) and ``summary.json``."""


class EvalConfig(_Section):
    batch_size: PosInt = 256
    restarts: PosInt = 1
    """PGD restarts for robust accuracy, combined per image: an image counts as robust only
    if no restart fools the model (the per-image worst of N restarts). That is at most, and
    usually below, the paper's "worst of 3 runs" (the lowest of 3 whole-run accuracies)."""
    val_subset: PosInt | None = None
    test_subset: PosInt | None = None
    corruptions: list[str] = []
    """CIFAR-10-C / CIFAR-100-C corruption names; empty = no corruption evaluation."""
    severities: list[Annotated[int, Field(ge=1, le=5)]] = [1, 2, 3, 4, 5]
    cifar_c_root: str | None = None
    """The directory of the official .npy files. Unset: ``<data root>/CIFAR-10-C`` (or
    ``CIFAR-100-C``), where ``rift-ray data cifar10-c`` puts them (``rift_ray.downloads``)."""
    corruption_source: Literal["files", "generated"] = "files"
    """files: the official CIFAR-10-C / CIFAR-100-C .npy files (headline numbers); generated: regenerated on demand from the test split by ``rift_ray.corruptions``
    (CIFAR-10-C severity parameters, not bit-identical to the official files)."""
    corruption_subset: PosInt | None = None
    """Images per corruption cell: the first N of the evaluated test images (None = all of them).
    Each alpha point costs ``len(corruptions) x len(severities) x N`` clean forward passes."""
    autoattack: AutoAttackConfig = AutoAttackConfig()


class TrialResources(_Section):
    cpu: Annotated[float, Field(gt=0)] = 1.0
    gpu: NonNegFloat = 0.0
    """A fraction of one GPU (0.25: four trials share it) or a whole number of GPUs."""

    @field_validator("gpu")
    @classmethod
    def _gpu_fraction(cls, v: float) -> float:
        if v > 1 and v != int(v):
            raise ValueError("must be at most 1 (a share of one GPU) or a whole number")
        return v


class ATResources(_Section):
    num_workers: PosInt = 1
    use_gpu: bool = False
    cpus_per_worker: Annotated[float, Field(gt=0)] = 1.0
    gpus_per_worker: NonNegFloat = 0.0


class ResourcesConfig(_Section):
    num_cpus: PosInt | None = None
    """CPUs of the local Ray instance (default: the machine's)."""
    num_gpus: NonNegInt | None = None
    object_store_memory: PosInt | None = None
    torch_threads: PosInt | None = None
    """torch.set_num_threads inside each trial (default: the trial's CPU count)."""
    adv_train: ATResources = ATResources()
    mrc: TrialResources = TrialResources()
    finetune: TrialResources = TrialResources()
    interpolate: TrialResources = TrialResources()
    max_concurrent_trials: PosInt | None = None
    track_memory: bool = True
    """Record the peak memory of every MRC trial and interpolation point (``peak_mem_bytes``;
    rift_ray/memory.py). On CPU it runs a dispatch mode costing a few microseconds per op;
    off when ``compute.compile`` is on."""
    dashboard: bool = False
    """Start the Ray dashboard with a local instance (http://127.0.0.1:8265). Off by default:
    with several local Ray instances on one machine, Ray Train's placement-group cleaner can
    query the wrong instance's dashboard and tear down a healthy training run."""


class WandbConfig(_Section):
    enabled: bool = True
    project: str = "rift-ray"
    entity: str | None = None
    group: str | None = None
    """Default: the sweep name."""
    tags: list[str] = []
    mode: Literal["online", "offline", "disabled"] | None = None
    """Default: $WANDB_MODE, else online when an API key is set, else offline."""
    log_checkpoint: bool = True


class ComputeConfig(_Section):
    """Switches for the hot loops (rift_ray/compute.py), meant for GPU sweeps.

    The defaults keep today's exact (CPU bit-reproducible) results; changing any of them
    changes the stage hashes, so finished stages are recomputed with the new settings.
    """

    amp: Literal["none", "bf16"] = "none"
    """bf16 autocast in adversarial training, PGD evaluation, fine-tuning and the MRC ascent."""
    channels_last: bool = False
    """channels_last memory format for every stage's model (and ``mrc.channels_last``)."""
    compile: bool = False
    """torch.compile the model (``nn.Module.compile``; MRC compiles its ascent forward)."""


class SweepConfig(_Section):
    name: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")] = "rift"
    seed: NonNegInt = 0
    """Chooses the train/val split and drives adversarial training (and, without ``seeds``,
    every later stage's randomness)."""
    seeds: Annotated[list[NonNegInt], Field(min_length=1)] | None = None
    """Run the RiFT stages (MRC, fine-tuning, interpolation) once per seed, each seed driving
    their randomness; the split and the AT model stay those of ``seed``. Unset: one run."""
    storage: str = "./results"
    shared_storage: bool = False
    """A local ``storage`` path that every node of a multi-node cluster mounts (NFS). Without
    it, a local path on a cluster of more than one node is refused: use s3:// or gs://."""
    keep_history: bool = True
    """Results that a changed config or ``--restart`` replaces move to ``history/``; false:
    they are deleted (space back)."""
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    attack: AttackConfig = AttackConfig()
    adv_train: AdvTrainConfig = AdvTrainConfig()
    mrc: MRCConfig = MRCConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    interpolate: InterpolateConfig = InterpolateConfig()
    eval: EvalConfig = EvalConfig()
    resources: ResourcesConfig = ResourcesConfig()
    wandb: WandbConfig = WandbConfig()
    compute: ComputeConfig = ComputeConfig()

    @model_validator(mode="after")
    def _distinct_seeds(self) -> SweepConfig:
        if self.seeds is not None:
            twice = sorted({s for s in self.seeds if self.seeds.count(s) > 1})
            if twice:
                raise ValueError(f"seeds: must be distinct (repeated: {twice[0]})")
        return self

    @model_validator(mode="after")
    def _fgsm_rs_needs_a_pgd_check(self) -> SweepConfig:
        method = self.adv_train.method
        if method not in ("fgsm_rs", "free") or self.adv_train.checkpoint:
            return self
        if self.data.val_size == 0:  # the guard against catastrophic overfitting is validation
            raise ValueError(
                f"adv_train.method: {method} needs a validation split (data.val_size > 0): each "
                "epoch's PGD check on it guards against catastrophic overfitting"
            )
        if self.attack.steps < 2:
            raise ValueError(
                f"adv_train.method: {method} checks each epoch with PGD (attack.steps), which "
                "needs attack.steps >= 2 to see catastrophic overfitting"
            )
        return self

    @model_validator(mode="after")
    def _sync_bn_needs_gpus(self) -> SweepConfig:
        try:
            self.adv_train.uses_sync_bn(self.resources.adv_train)
        except ConfigError as e:  # as a ValueError, so the message keeps its one-line form
            raise ValueError(str(e)) from None
        return self

    def to_dict(self) -> dict[str, Any]:
        d = self.model_dump(mode="json")
        if d.get("seeds") is None:  # unset: the same dict, YAML and hash as before seeds existed
            d.pop("seeds", None)
        return d

    def for_seed(self, seed: int) -> SweepConfig:
        """The config the RiFT stages of one seed of ``seeds`` run under: ``seed`` replaced.

        The stages take their randomness (PGD starts, MRC batch order, fine-tuning order and
        augmentation) from ``cfg.seed``; the data split and the AT model come from the sweep's
        own ``seed`` and are made before this copy is used.
        """
        return self.model_copy(update={"seed": seed})


def validate_config(raw: dict[str, Any]) -> SweepConfig:
    try:
        return SweepConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e)) from None


def load_config(
    path: str | os.PathLike[str] | None = None,
    overrides: list[str] | None = None,
    **fields: Any,
) -> SweepConfig:
    """Read a sweep YAML (or defaults when ``path`` is None), apply overrides, validate."""
    raw = read_yaml(path) if path is not None else {}
    raw = apply_overrides(raw, overrides)
    for k, v in fields.items():
        if v is not None:
            raw[k] = v
    return validate_config(raw)


def expand_path(p: str | None) -> str | None:
    """Expand ``~`` and ``$VARS`` in a configured path; unset variables are an error."""
    if p is None:
        return None
    out = os.path.expanduser(os.path.expandvars(p))
    if "$" in out:
        raise ConfigError(f"{p}: environment variable in path is not set")
    return out


def to_yaml(cfg: SweepConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
