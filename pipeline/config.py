"""The params sections every stage reads, one dataclass each: the one place a params key is declared, with its
type (choices as `Literal`), range and description (`key(...)`). pipeline/params_schema.py writes
params.schema.yaml from these (and from the generators' `Config`, base and variants in pipeline/params.py);
a stage builds its section with `params.section`, which refuses a missing or unknown key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from pipeline.attacks import BnMode, Threat
from pipeline.aux_bn import AuxBnMode
from pipeline.cutmix import ApplyTo
from pipeline.cutmix import Scheme as CutmixScheme
from pipeline.ema import BufferMode
from pipeline.features import FeatureSpace
from pipeline.generators import GeneratorName
from pipeline.generators.ddpm import DdpmVariance, SamplerName
from pipeline.losses import AttackSpec, LossName, StartMode, TrainThreat
from pipeline.models import CheckpointKind, ModelName
from pipeline.params import LearnedThreat, key

if TYPE_CHECKING:
    from pipeline.latent_attack import LatentSet

AutoAttackVersion = Literal["standard", "apgd-ce"]   # pipeline/evaluate.py ATTACKS' keys
Autocast = Literal["auto", "bf16", "fp32"]
MemoryFormat = Literal["auto", "channels_last", "contiguous"]
MD5 = "^[0-9a-f]{32}$"


@dataclass(frozen=True)
class DataConfig:
    """params.yaml `data:`."""
    archive: str = key("URL or local path of the archive (svhn - folder or URL prefix of its .mat files)", minLength=1)
    md5: str | dict[str, str] = key(schema={
        "description": "md5 of the archive (svhn - a mapping from each file name to its md5)",
        "oneOf": [{"type": "string", "pattern": MD5},
                  {"type": "object", "minProperties": 1, "additionalProperties": {"type": "string", "pattern": MD5}}]})
    val_size: int = key("training images held out for validation", minimum=0)
    n_train: int = key("first n training images (0 = all)", minimum=0)
    n_test: int = key("first n test images (0 = all)", minimum=0)
    n_labelled: int = key("class-balanced training images that keep their labels, val_size of them held out for "
                          "validation (0 = all); the rest go unlabelled to unlabelled.h5 (the oracle generator's "
                          "pool)", minimum=0)


@dataclass(frozen=True)
class GenerateConfig:
    """params.yaml `generate:`."""
    generators: list[GeneratorName] = key(uniqueItems=True)  # generators the DAG expands over
    n_images: int = key(minimum=1)  # generated images per generator
    shard_size: int = key(minimum=1)  # images per shard (one job per shard)
    batch_size: int = key(minimum=1)  # images per network call (ddpm, edm: part of the shard's identity, see above)
    sampler: SamplerName = key()  # ddpm sampler: ddpm (ancestral), ddim or dpmsolver
    sampling_steps: int = key(minimum=1)  # ddpm sampling steps
    edm_steps: int = key("edm - Heun steps N of EDM's deterministic sampler, 2N - 1 network evaluations (EDM "
                         "CIFAR-10 - 18; DM-Improves-AT - 20)", minimum=2)
    ddpm_variance: DdpmVariance = key("per-step variance of the ancestral sampler (sampler ddpm) - fixedlarge "
                                      "(beta_t, Ho et al.) or fixedsmall (posterior variance); ddim and dpmsolver "
                                      "ignore it")
    grid_images: int = key(minimum=1)  # images in the sample grid PNG


@dataclass(frozen=True)
class TeacherConfig:
    """params.yaml `teacher:`; every field is required (no second defaults)."""
    model: ModelName = key()  # architecture from pipeline.models.MODELS (paper: wrn-28-10)
    epochs: int = key(minimum=1)  # passes over the training set
    batch_size: int = key(minimum=2)  # images per SGD step (the last incomplete batch of an epoch is dropped)
    lr: float = key(exclusiveMinimum=0)  # peak SGD learning rate at this batch size, cosine-decayed per step to 0
    momentum: float = key("SGD momentum", minimum=0, exclusiveMaximum=1)
    nesterov: bool = key("Nesterov momentum")
    weight_decay: float = key(minimum=0)  # on conv/linear weights only (not batch norm, not biases)
    checkpoint_every: int = key(minimum=1)  # epochs between resumable checkpoints in --workdir


@dataclass(frozen=True)
class PseudolabelConfig:
    """params.yaml `pseudolabel:`."""
    batch_size: int = key(minimum=1)  # images per teacher forward pass (memory only; labels do not depend on it)
    save_probs: bool = key()  # also store the full softmax probabilities (N x classes float32)
    label_source: Literal["teacher", "generator"] = key("label written for training and select - teacher (its "
                                                        "argmax, for every image) or generator (a shard's own "
                                                        "conditioning class where known, >= 0; the teacher's "
                                                        "elsewhere); the teacher's prediction is kept either way")


@dataclass(frozen=True)
class SelectConfig:
    """params.yaml `select:`."""
    class_balance: bool = key("same number of kept images per teacher class")
    top_fraction: float = key("most confident share kept per class", exclusiveMinimum=0, maximum=1)


@dataclass(frozen=True)
class AnalysisConfig:
    """params.yaml `analysis:`."""
    n_samples: int = key(minimum=2)  # images drawn from each of train, test and the generated set (all if fewer)
    # teacher (penultimate, default), pixels (diagnostic) or lpips (local weights)
    feature_space: FeatureSpace = key()
    lpips_weights: str = key()  # local LPIPS weights (file or folder) when feature_space is lpips
    # Beta(alpha, alpha) mixing weight of the mixup row (small: near one image)
    mixup_alpha: float = key(exclusiveMinimum=0)
    batch_size: int = key("images per feature-extraction batch", minimum=1)
    block_size: int = key("query rows per block of the exact 1-NN search", minimum=1)
    quality_n: int = key("generated and training images of FID, IS, KID, precision/recall and leakage (paper "
                         "protocol - 50000; all when fewer)", minimum=2)
    inception_weights: str = key("local torch-fidelity Inception-v3 weights (2015 TF, "
                                 "weights-inception-2015-12-05-6726825d.pth), never downloaded; empty - quality "
                                 "metrics in teacher features, labelled so")
    quality_k: int = key("k of precision/recall (Kynkaanniemi et al. 2019 - 3) and density/coverage", minimum=1)
    leakage_quantile: float = key("leakage threshold - this quantile of real images' nearest distances to the pool "
                                  "compared (test or train; the near-duplicate scale)", exclusiveMinimum=0,
                                  exclusiveMaximum=1)


@dataclass(frozen=True)
class TrainRobustConfig:
    """params.yaml `train_robust:`; every field is required (no second defaults)."""
    model: ModelName = key()
    loss: LossName = key()
    threat: TrainThreat = key("cvae: inside the learned perturbation set (needs the cvae generator)")
    beta: float = key(minimum=0)  # TRADES weight of the KL term (paper: 6)
    eps_255: float = key(exclusiveMinimum=0)  # attack radius in 1/255 units
    step_255: float = key(exclusiveMinimum=0)  # attack step in 1/255 units
    attack_steps: int = key(minimum=1)  # inner maximisation steps
    epochs: int = key(minimum=1)  # epochs of epoch_size samples
    epoch_size: int = key(minimum=1)  # samples (real + generated) per epoch
    batch_size: int = key(minimum=2)  # global batch, all ranks together
    # share of each batch that is generated (ignored by the baseline)
    generated_fraction: float = key(minimum=0, maximum=1)
    lr: float = key(exclusiveMinimum=0)  # peak learning rate at this batch size
    momentum: float = key(minimum=0, exclusiveMaximum=1)
    nesterov: bool = key()
    weight_decay: float = key(minimum=0)  # not on batch-norm and bias parameters
    warmup_epochs: int = key(minimum=0)  # linear warm-up epochs before cosine decay
    ema_decay: float = key(minimum=0, exclusiveMaximum=1)  # EMA decay, warm-up form min(decay, (1+t)/(10+t))
    label_smoothing: float = key(minimum=0, exclusiveMaximum=1)  # on generated labels only
    val_pgd_steps: int = key(minimum=1)  # PGD steps of the validation attack
    val_batch_size: int = key("validation images per attack batch on each rank (memory only)", minimum=1)
    checkpoint_every: int = key(minimum=1)  # steps between resumable checkpoints
    num_workers: int = key("DataLoader worker processes (0 = main process)", minimum=0)
    sync_bn: bool = key("SyncBatchNorm across ranks under torchrun")
    aux_bn: AuxBnMode = key("auxiliary batch norm (AdvProp) for adversarial or generated inputs")
    cutmix_alpha: float = key("CutMix Beta(alpha alpha) box areas (0 = off)", minimum=0)
    cutmix_apply_to: ApplyTo = key("rows of each batch CutMix mixes")
    cutmix_scheme: CutmixScheme = key("reference (JAX: one lam and box per batch, TRADES attack from the mixed "
                                      "labels; refuses loss pgd) or per_row (a box per row, attack from the clean "
                                      "prediction); pipeline/cutmix.py")
    attack_bn: BnMode = key("batch-norm statistics of the training attack (batch: the references)")
    attack_start: StartMode = key("start of the training attack (uniform in the ball: the references)")
    bn_momentum: float = key("batch-norm running-statistics momentum (the references: 0.01)", exclusiveMinimum=0,
                             maximum=1)
    ema_buffers: BufferMode = key("EMA model's batch-norm statistics (copy: the trained model's, the references)")
    compile: bool = key("torch.compile (inductor) the model of the attack and the training forwards; validation and "
                        "evaluation stay eager (docs/cluster.md)")
    autocast: Autocast = key("precision of the attack's, training and validation forwards (auto - bf16 on CUDA, "
                             "fp32 on the CPU)")
    memory_format: MemoryFormat = key("layout of the model and its inputs (auto - channels_last on CUDA, contiguous "
                                      "on the CPU)")
    init_checkpoint: str = key("empty (random initialisation) or a local RobustBench zoo file (DMWideResNet / "
                               "DMPreActResNet) the model starts from (docs/robustbench.md)")

    def epoch_end(self, epoch: int) -> int:
        """Global step at which epoch `epoch` (1-based) ends: epoch * epoch_size // batch_size, so an
        epoch is epoch_size samples on average and the run is the references' step count
        (deepmind-research adversarial_robustness/jax/experiment.py L57-L59: int(n * 50_000 / batch)),
        19,531 steps at paper scale rather than 400 * (50,000 // 1,024) = 19,200."""
        return epoch * self.epoch_size // self.batch_size

    @property
    def total_steps(self) -> int:
        return self.epoch_end(self.epochs)

    @property
    def warmup_steps(self) -> int:
        return self.epoch_end(self.warmup_epochs)   # the references' steps_from_epochs(10) = 488

    def attack(self, latent: LatentSet | None = None) -> AttackSpec:
        return AttackSpec(self.threat, self.eps_255 / 255, self.step_255 / 255, self.attack_steps,
                          latent, self.attack_bn, self.attack_start)


@dataclass(frozen=True)
class EvaluateConfig:
    """params.yaml `evaluate:`; every field is required (no second defaults)."""
    threats: list[Threat] = key(minItems=1, uniqueItems=True)  # threat models evaluated by the DAG (one job each)
    learned_threats: list[LearnedThreat] = key("learned perturbation sets each robust model is also evaluated under "
                                               "(cvae needs the cvae generator)", uniqueItems=True)
    # radius per threat, in 1/255 pixel units (paper: linf 8, l2 128)
    eps_255: dict[Threat, float] = key(values={"exclusiveMinimum": 0})
    n_eval: int = key("first n test images attacked", minimum=1)
    batch_size: int = key("images per attack batch", minimum=1)
    chunk_size: int = key("images per resumable AutoAttack call", minimum=1)
    version: AutoAttackVersion = key("AutoAttack version - standard (APGD-CE, APGD-T, FAB-T, Square) or apgd-ce "
                                     "(its first attack alone, the standard version's settings; an upper bound on "
                                     "standard's robust accuracy)")
    pgd_steps: int = key("steps of the PGD baseline attack", minimum=1)
    sweep_factors: list[float] = key("multiples of the threat's eps evaluated by PGD for the masking check",
                                     minItems=2, uniqueItems=True, items={"exclusiveMinimum": 0})
    n_sweep: int = key("test images of the eps sweep", minimum=1)
    tolerance: float = key("accuracy slack before a sanity check fires", minimum=0, maximum=1)
    max_pgd_gap: float = key("PGD minus AutoAttack accuracy that flags masking", minimum=0, maximum=1)
    checkpoint: CheckpointKind = key("robust model evaluated (best: chosen on the validation split, as the references)")
