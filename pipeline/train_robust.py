"""Stage `train_robust`: adversarial training (TRADES or PGD-AT) on real + generated batches.

    python -m pipeline.train_robust --params params.yaml --run {run} \
        --train data/cifar10/train.h5 --val data/cifar10/val.h5 --threat-model models/threat/{run}.json \
        [--generated data/generated/{g} --labels data/pseudolabels/{g} [--selection data/selection/{g}/index.npy]] \
        --workdir work/train_robust/{run} \
        --out-model models/robust/{run}/last.pt --out-best models/robust/{run}/best.pt \
        --out-metrics results/train_robust/{run}/metrics.json --out-curve results/train_robust/{run}/curve.csv \
        [--out-figure results/figures/train_robust_{run}.png]
    torchrun --nproc_per_node 8 -m pipeline.train_robust -- --run {run} ...   # data-parallel, same flags
                                       # ("--" stops torchrun reading --run as its own --run-path)

Gowal et al. (2021): every batch holds a fixed fraction of generated images (pseudo-labelled, label
smoothing on those only), the rest real; an epoch is `epoch_size` samples whatever the data, so the
real-only `baseline` run and every generator run take the same number of steps. SGD Nesterov with
weight decay off batch-norm/bias, linear warm-up then cosine per step, an EMA of the weights (warm-up
form), and PGD-`val_pgd_steps` robust accuracy of the EMA model on the validation split each epoch
choosing best.pt; last.pt is the last EMA model. `evaluate.checkpoint` says which one is evaluated
(best by default, as the references' eval-aa.py loads weights-best.pt).

`threat: cvae` trains inside a learned perturbation set (Wong and Kolter, 2021): the inner maximisation
of TRADES or PGD-AT searches the CVAE's latent ball at its estimated radius (pipeline/latent_attack.py;
the pipeline.threat_model file --threat-model names says which CVAE), and validation uses the same
latent attack.

Resumable: a checkpoint (model, EMA, optimiser, scheduler, RNG states, step = loader position, curve so
far, the epoch's partial training sums) goes to --workdir every `checkpoint_every` steps, at the last
step and on SIGTERM (then the process exits with 143), by the rule every training loop shares
(pipeline/preemption.py); running the same command again resumes from it. Batches and attack noise
are functions of (seed, step), so on CPU a resumed run ends with exactly the weights of an
uninterrupted one. A non-finite loss stops the run with an error before anything is saved, keeping the
last good checkpoint: the losses stay on the device and are checked together at every checkpoint and
epoch end (so at most `checkpoint_every` steps apart), with no host synchronisation in between.

`compile: true` runs the attack's and the training forwards through torch.compile (inductor) of the same
module, so the two share parameters and checkpoints hold the plain module's state_dict; validation (and
evaluation, another stage) use the uncompiled EMA model. `autocast` and `memory_format` set the forwards'
precision and layout (validation's too), compiled or not: `auto` is bf16 autocast in channels-last layout
on CUDA and fp32 contiguous on the CPU (precision()).

Code layout: setup() (devices, data, model, resume) returns the fixed `Run` and the changing
`TrainState`; train_robust() loops train_step() over the loader's batches, calls end_epoch() at each
epoch's last step, and after every step applies the shared checkpoint rule.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import io
import json
import logging
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from pipeline import aux_bn, checkpoint, datasets, distributed, latent_attack, models, optim, seeding, shards
from pipeline import cutmix as cutmix_mod
from pipeline import loader as loader_mod
from pipeline import params as params_mod
from pipeline.attacks import robust_accuracy
from pipeline.config import TrainRobustConfig
from pipeline.distributed import Dist, agree, init_distributed, rank_share, sigterm_on_any_rank
from pipeline.ema import EMA
from pipeline.inference import predict_labels, to_float
from pipeline.latent_attack import LEARNED, LatentSet
from pipeline.losses import AttackSpec, TwoViews, adversarial_loss, norm_ball
from pipeline.preemption import SIGTERM_EXIT, NonFiniteLoss, Preempted, SigtermFlag, checkpoint_after_step
from pipeline.robustbench import initialise as init_from_zoo
from pipeline.shards import ShardError, atomic_path, file_sha256, read_attrs, read_imageset

log = logging.getLogger("pipeline.train_robust")
CURVE_FIELDS = ["epoch", "step", "lr", "train_loss", "train_ce", "train_kl", "train_acc",
                "val_clean_acc", "val_robust_acc"]


@dataclass(frozen=True)
class Metrics:
    """metrics.json of a finished run (main adds the checksums of the files it wrote); the field order is
    the JSON key order."""
    run: str
    generator: str | None           # the run's generated data (None for the real-data baseline)
    n_generated: int                # generated images the run could draw (after the selection and amount)
    amount: int | None              # variants.amounts entry the run draws on (None: the whole selection)
    seed_index: int                 # variants.seeds entry (0: trained with base.seed; `seed` is the seed used)
    generated_per_batch: int
    model: str
    loss: str
    threat: str
    eps_255: float | None           # None inside a learned set (latent_radius instead)
    latent_radius: float | None
    epochs: int
    steps: int
    seed: int
    world_size: int
    num_classes: int
    variant: str | None
    source_run: str
    aux_bn: str
    cutmix_alpha: float
    val_robust_acc_best: float
    best_epoch: int
    val_robust_acc_last: float | None
    val_clean_acc_last: float | None
    train_loss: float | None        # the last epoch's mean training loss
    config: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Result:
    """What a finished run hands to `main` for writing."""
    ema_model: nn.Module
    best_state: dict[str, torch.Tensor]
    curve: list[dict[str, Any]]
    metrics: Metrics


# --- data ---


@dataclass(frozen=True)
class Inputs:
    """The files a run reads: the CLI's --train, --val, --generated, --labels, --selection, --threat-model."""
    train: Path
    val: Path
    generated: list[Path]
    labels: list[Path]
    selection: Path | None = None
    threat_file: Path | None = None


def load_eval_set(path: Path, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """An image set as float NCHW in [0, 1] and labels, on `device`.

    Converted on the CPU and then moved, so the pixel values are the same on every device (a GPU divides
    by a scalar as a multiplication by its reciprocal, which can round differently); channels_last, the
    layout the stored NHWC pixels already have, so the conversion copies nothing.
    """
    images, labels = read_imageset(path)
    x = to_float(images, memory_format=torch.channels_last)
    return x.to(device), torch.from_numpy(labels).to(device)


def check_provenance(generated: list[Path], run: str, seed: int) -> None:
    """Refuse corrupt shards (sha256 over the pixels: one read, less than one epoch of I/O) and shards
    sampled by another generator or seed than this run says, before any training step."""
    for path in shards.expand(generated):
        attrs = shards.verify_imageset(path)
        if "generator" in attrs and attrs["generator"] != run:
            raise ShardError(f"{path}: sampled by generator {attrs['generator']!r}, but this is run {run!r}")
        if "seed" in attrs and int(attrs["seed"]) != seed:
            raise ShardError(f"{path}: sampled with seed {attrs['seed']}, but base.seed is {seed}")


def make_dataset(cfg: TrainRobustConfig, seed: int, train: Path, generated: list[Path],
                 labels: list[Path], selection: Path | None, ctx: Dist, amount: int | None = None,
                 shard_seed: int | None = None) -> loader_mod.MixedBatches:
    """Real pool plus, when `generated` is given, the generated pool at the configured fraction; `amount`
    cuts the selection to that many images, in an order fixed by `shard_seed` (base.seed) alone."""
    real = loader_mod.pool([train])
    gen_pool = None
    n_gen = 0
    if generated:
        index = np.load(selection) if selection else None
        if amount is not None:
            if index is None:
                raise ValueError("a data amount (variants.amounts) cuts the selection: pass --selection")
            index = loader_mod.subsample(index, amount, seeding.derive(
                seed if shard_seed is None else shard_seed, "train_robust", "amount"))
        gen_pool = loader_mod.pool(generated, labels or None, index)
        n_gen = loader_mod.split_batch(cfg.batch_size, cfg.generated_fraction)[1]
    if cfg.batch_size % ctx.world_size:
        raise ValueError(f"train_robust.batch_size {cfg.batch_size} not divisible by {ctx.world_size} ranks")
    spec = loader_mod.BatchSpec(cfg.batch_size, n_gen, seeding.derive(seed, "train_robust", "data"),
                                ctx.rank, ctx.world_size)
    return loader_mod.MixedBatches(real, gen_pool, spec)


def load_data(cfg: TrainRobustConfig, seed: int, entry: params_mod.Run, shard_seed: int, inputs: Inputs, ctx: Dist,
              device: torch.device) -> tuple[loader_mod.MixedBatches, tuple[torch.Tensor, torch.Tensor]]:
    """The training batches and the validation split, after checking the run gets the data it names
    (e.g. gaussian-cutmix trains on gaussian's shards; the baseline on real data only) and the shards were
    sampled with `shard_seed`."""
    if entry.generator is None and inputs.generated:
        raise ValueError(f"run {entry.name} trains on real data only; do not pass --generated")
    if entry.generator is not None and not inputs.generated:
        raise ValueError(f"run {entry.name!r} needs --generated shards")
    check_provenance(inputs.generated, entry.generator or "", shard_seed)
    dataset = make_dataset(cfg, seed, inputs.train, inputs.generated, inputs.labels, inputs.selection, ctx,
                           entry.amount, shard_seed)
    return dataset, load_eval_set(inputs.val, device)


def load_threat(cfg: TrainRobustConfig, threat_file: Path | None, device: torch.device) -> LatentSet | None:
    """The learned perturbation set the run trains in, or None for a norm ball."""
    if threat_file is None and cfg.threat in LEARNED:
        raise ValueError(f"train_robust.threat {cfg.threat} is a learned set: pass --threat-model "
                         f"(python -m pipeline.threat_model writes it)")
    return latent_attack.load(threat_file, cfg.threat, device) if threat_file is not None else None


def run_identity(cfg: TrainRobustConfig, seed: int, entry: params_mod.Run, inputs: Inputs) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: settings, seed and the checksums of every input
    (stored HDF5 sha256 attributes: header reads only, cheap at 100M images)."""
    return {
        "config": dataclasses.asdict(cfg), "seed": seed, "run": entry.name,
        **({"amount": entry.amount} if entry.amount is not None else {}),
        "train": read_attrs(inputs.train).get("sha256"), "val": read_attrs(inputs.val).get("sha256"),
        "generated": shards.set_sha256(shards.expand(inputs.generated)) if inputs.generated else "",
        "labels": shards.set_sha256(shards.expand(inputs.labels)) if inputs.labels else "",
        "selection": file_sha256(inputs.selection) if inputs.selection else "",
        "threat": file_sha256(inputs.threat_file) if inputs.threat_file else "",
        **({"init": file_sha256(Path(cfg.init_checkpoint))} if cfg.init_checkpoint else {}),
    }


# --- validation ---


def validate(model: nn.Module, val: tuple[torch.Tensor, torch.Tensor], cfg: TrainRobustConfig,
             seed: int, ctx: Dist = Dist(), latent: LatentSet | None = None,
             autocast: contextlib.AbstractContextManager[Any] | None = None) -> tuple[float, float]:
    """(clean accuracy, PGD-val_pgd_steps robust accuracy) of `model` on the validation split, under
    the training threat (the latent attack in a learned set).

    Every rank attacks its own share of the split in batches of `val_batch_size`, under the training
    autocast (bf16 on CUDA), and the counts are summed over ranks: at paper scale PGD-40 of a
    WRN-70-16 on the whole split at the training batch would not fit one GPU. Rank r's PGD noise comes
    from seed (rank 0) or a seed derived from (seed, r)."""
    x, y = val
    part = rank_share(len(x), ctx)
    x, y = x[part], y[part]
    rank_seed = seed if ctx.rank == 0 else seeding.derive(seed, "rank", ctx.rank)
    with autocast or nullcontext():
        clean = int((predict_labels(model, x, cfg.val_batch_size, x.device) == y.cpu().numpy()).sum())
        if latent is not None:
            robust = int(latent.robust_mask(model, x, y, cfg.val_pgd_steps, cfg.val_batch_size).sum())
        else:
            _, mask = robust_accuracy(model, x, y, norm_ball(cfg.threat), cfg.eps_255 / 255, cfg.val_pgd_steps,
                                      cfg.val_batch_size, seed=rank_seed)
            robust = int(mask.sum())
    counts = torch.tensor([clean, robust, len(x)], dtype=torch.float64, device=x.device)
    if ctx.world_size > 1:
        dist.all_reduce(counts)
    total = max(counts[2].item(), 1.0)
    return counts[0].item() / total, counts[1].item() / total


def _state_to_cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


def inference_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Weights of the network evaluation sees: with auxiliary batch norms, only the main ones."""
    plain = aux_bn.main_only(model) if aux_bn.duals(model) else model
    return _state_to_cpu(plain.state_dict())


# --- training: the run's fixed setup, its changing state, one step, the end of an epoch ---


@dataclass
class EpochSums:
    """This epoch's training sums so far, on this rank: loss, cross-entropy and KL term (each times the
    batch size), correct predictions and images.

    One float64 tensor underneath, in that order, so data-parallel ranks add theirs in one all-reduce and
    a checkpoint stores the tensor itself (`epoch_accumulators`)."""
    values: torch.Tensor

    @classmethod
    def zeros(cls, device: torch.device) -> EpochSums:
        return cls(torch.zeros(5, dtype=torch.float64, device=device))

    @property
    def loss(self) -> torch.Tensor:
        return self.values[0]

    @property
    def ce(self) -> torch.Tensor:
        return self.values[1]

    @property
    def kl(self) -> torch.Tensor:
        return self.values[2]

    @property
    def correct(self) -> torch.Tensor:
        return self.values[3]

    @property
    def count(self) -> torch.Tensor:
        return self.values[4]

    @torch.no_grad()
    def add(self, loss: torch.Tensor, parts: dict[str, torch.Tensor], y: torch.Tensor) -> None:
        """One batch: its mean loss and terms (adversarial_loss's) and its logits' correct predictions."""
        n = len(y)   # device ops and Python scalars only: no host-to-device copy, no synchronisation
        self.values[:3] += torch.stack([loss.detach().double(), parts["ce"].double(), parts["kl"].double()]) * n
        self.values[3] += (parts["logits"].argmax(1) == y).sum()
        self.values[4] += n

    def over_ranks(self, ctx: Dist) -> EpochSums:
        """The sums of every rank together (a copy; this rank's own stay as they are)."""
        totals = self.values.clone()
        if ctx.world_size > 1:
            dist.all_reduce(totals)
        return EpochSums(totals)

    def means(self) -> dict[str, float]:
        """The curve's training columns: per-image means of the sums."""
        return {"train_loss": (self.loss / self.count).item(), "train_ce": (self.ce / self.count).item(),
                "train_kl": (self.kl / self.count).item(), "train_acc": (self.correct / self.count).item()}


@dataclass
class TrainState:
    """Everything training changes, all of it in a checkpoint."""
    model: nn.Module
    ema: EMA
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    best: dict[str, Any]              # {"acc", "epoch", "state"}: best.pt's validation and weights so far
    sums: EpochSums
    step: int = 0                     # global steps done, which is also the loader's position
    curve: list[dict[str, Any]] = dataclasses.field(default_factory=list)   # one row per finished epoch
    unchecked: list[torch.Tensor] = dataclasses.field(default_factory=list)  # losses since the last check_finite
    last_loss: float | None = None    # the newest loss check_finite read (the progress bar shows it)


@dataclass
class Run:
    """What stays fixed while a run trains: settings, devices, data, the attack."""
    cfg: TrainRobustConfig
    seed: int
    name: str                         # the run's name in params' run table (baseline, gaussian-cutmix-s1, ...)
    entry: params_mod.Run             # the run in params' run table (its generator, variant, amount, seed index)
    ctx: Dist
    device: torch.device
    workdir: Path
    identity: dict[str, Any]          # what a checkpoint must match to be resumed (run_identity)
    dataset: loader_mod.MixedBatches
    val_set: tuple[torch.Tensor, torch.Tensor]
    latent: LatentSet | None
    attack: AttackSpec
    attack_model: nn.Module           # the model the attack runs: `compiled(state.model)` (the same parameters)
    forward: nn.Module                # the train-mode forward: TwoViews(model), DDP-wrapped when distributed
    autocast: contextlib.AbstractContextManager[Any]
    memory_format: torch.memory_format
    num_classes: int

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def build_state(cfg: TrainRobustConfig, seed: int, num_classes: int, ctx: Dist, device: torch.device,
                memory_format: torch.memory_format) -> TrainState:
    """Model (the same initial weights for every run), its EMA, optimiser and schedule, on `device`."""
    torch.manual_seed(seeding.derive(seed, "train_robust", "init"))
    model: nn.Module = models.build(cfg.model, num_classes, bn_momentum=cfg.bn_momentum)
    shadow: nn.Module = models.build(cfg.model, num_classes, bn_momentum=cfg.bn_momentum)
    if cfg.init_checkpoint:   # fine-tuning a zoo model (pipeline/robustbench.py); the EMA starts from it too
        init_from_zoo(model, cfg.init_checkpoint, cfg.model)
    if cfg.aux_bn != "none":  # main + auxiliary batch norms; the EMA averages both
        model, shadow = aux_bn.convert(model), aux_bn.convert(shadow)
    ema = EMA(model, cfg.ema_decay, shadow=shadow, buffers=cfg.ema_buffers)
    # Module.to takes a device and a memory format in one call (torch/nn/modules/module.py, _parse_to); the
    # stubs' overloads list them apart
    model.to(device, memory_format=memory_format)  # type: ignore[call-overload]
    ema.model.to(device, memory_format=memory_format)  # type: ignore[call-overload]
    optimizer = optim.sgd(model, cfg.lr, cfg.momentum, cfg.weight_decay, cfg.nesterov)
    return TrainState(model, ema, optimizer, optim.scheduler(optimizer, cfg.total_steps, cfg.warmup_steps),
                      best={"acc": -1.0, "epoch": 0, "state": inference_state(ema.model)},
                      sums=EpochSums.zeros(device))


def resume(state: TrainState, saved: dict[str, Any] | None, cfg: TrainRobustConfig, ctx: Dist,
           device: torch.device, workdir: Path) -> None:
    """Continue from a checkpoint of this same run (None: a fresh start). Another world size is an error:
    the batch split over ranks differs."""
    if saved is None:
        return
    if saved["world_size"] != ctx.world_size:
        raise ValueError(f"{workdir}: checkpoint from {saved['world_size']} ranks, this run has "
                         f"{ctx.world_size}; rerun on {saved['world_size']} or use a fresh --workdir")
    state.model.load_state_dict(saved["model"])
    state.ema.load_state_dict(saved["ema"])
    state.optimizer.load_state_dict(saved["optimizer"])
    state.schedule.load_state_dict(saved["scheduler"])
    checkpoint.set_rng_state(saved["rng"])
    state.step, state.curve, state.best = saved["step"], saved["curve"], saved["best"]
    if ctx.main:  # the sums of every rank since the epoch began (save() reduces them); the others start at 0
        state.sums = EpochSums(saved["epoch_accumulators"].to(device))
        log.info("resumed at step %d of %d", state.step, cfg.total_steps)


def setup(cfg: TrainRobustConfig, seed: int, device_name: str, entry: params_mod.Run, shard_seed: int,
          inputs: Inputs, workdir: Path, num_classes: int) -> tuple[Run, TrainState]:
    """Everything before the first step: devices, the threat, data, model, and the newest checkpoint of
    this same run if there is one.

    A rerun with other settings or inputs starts afresh (rank 0 moves the old checkpoints aside), never
    resumes, let alone returns, the old run."""
    refuse_unmeasured(cfg, distributed.world_size())
    ctx, device = init_distributed(device_name)
    if device.type == "cuda":  # fastest convolution kernels for the fixed shapes, as the diffusion loop does
        torch.backends.cudnn.benchmark = True
    latent = load_threat(cfg, inputs.threat_file, device)
    dataset, val_set = load_data(cfg, seed, entry, shard_seed, inputs, ctx, device)
    memory_format, autocast = precision(cfg, device)
    state = build_state(cfg, seed, num_classes, ctx, device, memory_format)
    identity = run_identity(cfg, seed, entry, inputs)
    resume(state, checkpoint.latest(workdir, map_location="cpu", identity=identity, move_aside=ctx.main),
           cfg, ctx, device, workdir)
    attack_model, forward = forwards(state.model, cfg, ctx, device)
    state.model.train()
    return Run(cfg, seed, entry.name, entry, ctx, device, workdir, identity, dataset, val_set, latent,
               cfg.attack(latent), attack_model, forward, autocast, memory_format, num_classes), state


def precision(cfg: TrainRobustConfig, device: torch.device
              ) -> tuple[torch.memory_format, contextlib.AbstractContextManager[Any]]:
    """(memory format, autocast) of the run's forwards. `auto` is bf16 autocast in channels-last layout on
    CUDA and fp32 contiguous on the CPU, where bf16 is only fast with native bf16 instructions
    (avx512_bf16, AMX): on an AVX2-only CPU a bf16 TRADES step took 9-15x as long (bench/README.md)."""
    cuda = device.type == "cuda"
    channels_last = cfg.memory_format == "channels_last" or (cfg.memory_format == "auto" and cuda)
    bf16 = cfg.autocast == "bf16" or (cfg.autocast == "auto" and cuda)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    return memory_format, autocast


def refuse_unmeasured(cfg: TrainRobustConfig, world_size: int) -> None:
    """Under torchrun, refuse the two settings no run has measured, before any rank starts working.

    `sync_bn` would make the inner attack and the clean pass use the global batch's statistics, while
    both references normalise per device (docs/fidelity.md, data parallelism); `compile` of the
    DDP-wrapped module (DDPOptimizer graph splits) has not run on any backend yet."""
    if world_size <= 1:
        return
    if cfg.sync_bn:
        raise ValueError(f"train_robust.sync_bn: true under torchrun ({world_size} ranks): SyncBatchNorm would "
                         "give the attack global-batch statistics, unlike both references (per-device batch "
                         "norm); set sync_bn: false")
    if cfg.compile:
        raise ValueError(f"train_robust.compile: true under torchrun ({world_size} ranks) has not been measured "
                         "(compiled DDP never ran); set compile: false for multi-GPU runs")


def compiled(module: nn.Module, enabled: bool) -> nn.Module:
    """torch.compile(module) (inductor) when enabled: a wrapper calling the same module, so parameters,
    buffers and state_dict stay the module's own; else the module itself."""
    return cast(nn.Module, torch.compile(module)) if enabled else module


def forwards(model: nn.Module, cfg: TrainRobustConfig, ctx: Dist, device: torch.device) -> tuple[nn.Module, nn.Module]:
    """(the attack's model, the train-mode forward). The attack runs the model without DDP (no gradient
    exchange); the clean and adversarial training passes go through one call of `forward`, DDP-wrapped
    when distributed. Compiled, single process: both use one compiled model; under DDP the DDP-wrapped
    module is compiled, as PyTorch recommends (its DDPOptimizer splits the graph at the gradient buckets:
    https://pytorch.org/docs/stable/notes/ddp.html, "TorchDynamo DDPOptimizer")."""
    attack_model = compiled(model, cfg.compile)
    if ctx.world_size == 1:
        return attack_model, TwoViews(attack_model)
    # with auxiliary batch norms a step may leave one set unused (source mode, a batch without one source)
    ddp = nn.parallel.DistributedDataParallel(TwoViews(model), device_ids=[device.index] if device.type == "cuda"
                                              else None, find_unused_parameters=cfg.aux_bn != "none")
    return attack_model, compiled(ddp, cfg.compile)


def check_finite(run: Run, state: TrainState) -> None:
    """Read the losses since the last check (one device-to-host copy) and stop at the first non-finite
    one of any rank with NonFiniteLoss, before anything of its steps is saved. Every rank calls it at the
    same steps (save, end_epoch) and the ranks agree on the step, so all of them stop together."""
    if not state.unchecked:
        return
    values = torch.stack(state.unchecked).float().cpu()
    first = state.step - len(values)
    bad = (~torch.isfinite(values)).nonzero()
    local = first + int(bad[0, 0]) if len(bad) else state.step
    worst = int(agree(float(local), run.ctx, "min"))
    state.unchecked.clear()
    state.last_loss = float(values[-1])
    if worst < state.step:
        value = f"{float(values[worst - first])}" if worst == local else "non-finite on another rank"
        raise NonFiniteLoss(f"run {run.name}: loss is {value} at step {worst} (lr now "
                            f"{state.schedule.get_last_lr()[0]:.4g}); stopped without saving, the last good "
                            f"checkpoint in {run.workdir} is kept. Lower train_robust.lr or check the data.")


def save(run: Run, state: TrainState) -> None:
    """Checkpoint the state at its step (rank 0 writes), unless a loss since the last check was not
    finite. Every rank calls it: the epoch's sums are reduced over the ranks first, so rank 0 stores, and
    on resume restores, the sum of all of them."""
    check_finite(run, state)
    totals = state.sums.over_ranks(run.ctx)
    if run.ctx.main:
        checkpoint.save(run.workdir, state.step, {
            "step": state.step, "total_steps": run.cfg.total_steps, "world_size": run.ctx.world_size,
            "model": state.model.state_dict(), "ema": state.ema.state_dict(),
            "optimizer": state.optimizer.state_dict(), "scheduler": state.schedule.state_dict(),
            "rng": checkpoint.rng_state(), "curve": state.curve, "best": state.best,
            "epoch_accumulators": totals.values.cpu(), "config": dataclasses.asdict(run.cfg), "run": run.name,
            "identity": run.identity})
    if run.ctx.world_size > 1:
        dist.barrier()


def train_step(run: Run, state: TrainState, images: torch.Tensor, y: torch.Tensor,
               is_generated: torch.Tensor) -> torch.Tensor:
    """One optimiser step on a loader batch (uint8 NCHW); returns the loss, left on the device (no host
    synchronisation: check_finite reads it later). The attack's noise and the CutMix boxes come from
    (seed, run, step, rank), so a resumed run draws what an uninterrupted one did."""
    cfg, device, step = run.cfg, run.device, state.step
    x = to_float(images, device, layout="NCHW", memory_format=run.memory_format, non_blocking=True)
    y = y.to(device, non_blocking=True)
    generated_rows = is_generated.to(device, non_blocking=True)
    smoothing = generated_rows.float() * cfg.label_smoothing
    attack_rng = seeding.torch_generator(run.seed, "train_robust", run.name, "attack", step, run.ctx.rank,
                                         device=device)
    mix = None
    if cfg.cutmix_alpha > 0:
        x, mix = cutmix_mod.cutmix(x, y, smoothing, cutmix_mod.selection(cfg.cutmix_apply_to, is_generated),
                                   cfg.cutmix_alpha, seeding.numpy_rng(run.seed, "train_robust", run.name, "cutmix",
                                                                       step, run.ctx.rank),
                                   cfg.cutmix_scheme, run.num_classes)
    # source routing: the loader's leading real rows through main, the generated rest through aux
    routes = None if cfg.aux_bn == "none" else aux_bn.routes_for(cfg.aux_bn, run.dataset.real_rows)
    with run.autocast:
        loss, parts = adversarial_loss(cfg.loss, run.attack_model, x, y, cfg.beta, run.attack,
                                       smoothing, attack_rng, run.forward, mix, routes)
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    state.optimizer.step()
    state.schedule.step()
    state.ema.update(state.model)
    state.sums.add(loss, parts, y)
    state.unchecked.append(loss.detach())
    state.step += 1
    return loss


def end_epoch(run: Run, state: TrainState) -> None:
    """At an epoch's last step: its curve row (training means over every rank, validation of the EMA
    model), best.pt's weights when validation improved, and fresh sums for the next epoch."""
    check_finite(run, state)
    epoch = len(state.curve) + 1
    row: dict[str, Any] = {"epoch": epoch, "step": state.step, "lr": state.schedule.get_last_lr()[0],
                           **state.sums.over_ranks(run.ctx).means()}
    row["val_clean_acc"], row["val_robust_acc"] = validate(
        state.ema.model, run.val_set, run.cfg, seeding.derive(run.seed, "train_robust", "val"), run.ctx, run.latent,
        run.autocast)
    if run.ctx.main:
        if row["val_robust_acc"] > state.best["acc"]:
            state.best = {"acc": row["val_robust_acc"], "epoch": epoch, "state": inference_state(state.ema.model)}
        log.info("epoch %d/%d: train loss %.4f, val clean %.3f, val PGD-%d %.3f", epoch, run.cfg.epochs,
                 row["train_loss"], row["val_clean_acc"], run.cfg.val_pgd_steps, row["val_robust_acc"])
    state.curve.append(row)
    state.sums.values.zero_()


def final_metrics(run: Run, state: TrainState) -> Metrics:
    """The finished run's metrics.json fields."""
    cfg, last = run.cfg, (state.curve[-1] if state.curve else {})
    generated = run.dataset.generated
    return Metrics(
        run=run.name, generator=run.entry.generator, amount=run.entry.amount, seed_index=run.entry.seed,
        n_generated=len(generated) if generated is not None else 0,
        generated_per_batch=run.dataset.spec.n_generated, model=cfg.model, loss=cfg.loss, threat=cfg.threat,
        eps_255=None if run.latent else cfg.eps_255, latent_radius=run.latent.radius if run.latent else None,
        epochs=cfg.epochs, steps=cfg.total_steps, seed=run.seed, world_size=run.ctx.world_size,
        num_classes=run.num_classes, variant=run.entry.variant, source_run=run.entry.generator or "baseline",
        aux_bn=cfg.aux_bn, cutmix_alpha=cfg.cutmix_alpha, val_robust_acc_best=state.best["acc"],
        best_epoch=state.best["epoch"], val_robust_acc_last=last.get("val_robust_acc"),
        val_clean_acc_last=last.get("val_clean_acc"), train_loss=last.get("train_loss"),
        config=dataclasses.asdict(cfg))


def train_robust(cfg: TrainRobustConfig, seed: int, device_name: str, name: str, train: Path, val: Path,
                 generated: list[Path], labels: list[Path], workdir: Path,
                 selection: Path | None = None, stop_after: int | None = None,
                 progress: bool = True, num_classes: int = 10, threat_file: Path | None = None,
                 entry: params_mod.Run | None = None, shard_seed: int | None = None) -> Result:
    """Train (or resume) run `name` and return the EMA model, best EMA weights, curve and metrics.

    setup() builds or resumes the state, train_step() takes one step, end_epoch() closes an epoch at its
    last step, and after every step the checkpoint rule all training loops share
    (preemption.checkpoint_after_step: every `checkpoint_every` steps, at the last step, on SIGTERM)
    saves, with SIGTERM agreed over the ranks. `threat_file` is the run's pipeline.threat_model file
    (required for a learned threat). `entry` is the run in params' run table (its generated data, amount,
    seed index); a direct call without one trains run `name` on the generator that sampled `generated`
    (real data only when none). `shard_seed` is the base.seed the shards were sampled with (default:
    `seed`). `stop_after` ends the call after that many global steps as if preempted (tests use it). The
    input files come one argument each, as the CLI flags name them; setup() groups them as `Inputs`.
    """
    if entry is None:
        sampled_by = read_attrs(shards.expand(generated)[0]).get("generator", name) if generated else None
        entry = params_mod.Run(name, None if sampled_by is None else str(sampled_by), None, None, 0)
    run, state = setup(cfg, seed, device_name, entry, seed if shard_seed is None else shard_seed,
                       Inputs(train, val, generated, labels, selection, threat_file), workdir, num_classes)
    stop = cfg.total_steps if stop_after is None else min(cfg.total_steps, stop_after)
    batches = loader_mod.loader(run.dataset, state.step, stop, cfg.num_workers, pin_memory=run.cuda)
    bar = tqdm(total=cfg.total_steps * cfg.batch_size, initial=state.step * cfg.batch_size, unit="img",
               unit_scale=True, disable=not (progress and run.ctx.main), desc=f"train_robust {name}")
    with SigtermFlag() as sigterm:
        for images, y, is_generated in batches:
            train_step(run, state, images, y, is_generated)
            bar.update(cfg.batch_size)
            if state.step == cfg.epoch_end(len(state.curve) + 1):
                end_epoch(run, state)
            checkpoint_after_step(sigterm_on_any_rank(sigterm.received, run.ctx), state.step,
                                  cfg.total_steps, cfg.checkpoint_every, lambda _: save(run, state), workdir, bar)
            if run.ctx.main and not state.unchecked and state.last_loss is not None:   # just checked
                bar.set_postfix(loss=f"{state.last_loss:.3f}", lr=f"{state.schedule.get_last_lr()[0]:.3g}")
    bar.close()
    if state.step < cfg.total_steps:  # stop_after ended the batches early: as if preempted there
        save(run, state)
        raise Preempted(SIGTERM_EXIT)
    ema_model = aux_bn.main_only(state.ema.model) if cfg.aux_bn != "none" else state.ema.model
    return Result(ema_model, state.best["state"], state.curve, final_metrics(run, state))


# --- outputs ---


def write_curve(path: Path, curve: list[dict[str, Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CURVE_FIELDS)
    writer.writeheader()
    for row in curve:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    with atomic_path(path) as tmp:
        tmp.write_text(buffer.getvalue())


def write_figure(path: Path, curve: list[dict[str, Any]], run: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    epochs = [r["epoch"] for r in curve]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    left.plot(epochs, [r["train_loss"] for r in curve], label="train loss")
    left.set_xlabel("epoch"), left.set_title(f"{run}: training loss"), left.legend()
    right.plot(epochs, [r["val_clean_acc"] for r in curve], label="val clean")
    right.plot(epochs, [r["val_robust_acc"] for r in curve], label="val robust (PGD)")
    right.set_xlabel("epoch"), right.set_ylabel("accuracy"), right.set_title("EMA model"), right.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def write_outputs(result: Result, cfg: TrainRobustConfig, args: argparse.Namespace) -> dict[str, Any]:
    """last.pt (last EMA), best.pt, curve.csv, metrics.json (last, so it marks completion); returns what
    metrics.json holds. Each model file names itself (`checkpoint`: last or best), so an evaluation can
    say what it attacked."""
    name, classes, metrics = cfg.model, result.metrics.num_classes, result.metrics
    extra = {"config": dataclasses.asdict(cfg), "run": args.run}
    models.save_checkpoint(args.out_model, result.ema_model, name, classes,
                           {**extra, "checkpoint": "last", "epoch": cfg.epochs,
                            "val_robust_acc": metrics.val_robust_acc_last})
    best = models.build(name, classes)
    best.load_state_dict(result.best_state)
    models.save_checkpoint(args.out_best, best, name, classes,
                           {**extra, "checkpoint": "best", "val_robust_acc": metrics.val_robust_acc_best,
                            "epoch": metrics.best_epoch})
    write_curve(args.out_curve, result.curve)
    if args.out_figure:
        write_figure(args.out_figure, result.curve, args.run)
    generated = shards.expand(args.generated) if args.generated else []
    written = {**metrics.to_json(), "model_sha256": file_sha256(args.out_model),
               "best_sha256": file_sha256(args.out_best),
               "generated_sha256": shards.set_sha256(generated) if generated else ""}
    with atomic_path(args.out_metrics) as tmp:
        tmp.write_text(json.dumps(written, indent=2) + "\n")
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.train_robust", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--run", required=True,
                        help="a run params defines (pipeline.params.run_table): baseline, gaussian-cutmix-s1, ...")
    parser.add_argument("--train", type=Path, required=True, help="real training set (HDF5)")
    parser.add_argument("--val", type=Path, required=True, help="validation split (HDF5)")
    parser.add_argument("--threat-model", type=Path,
                        help="the run's pipeline.threat_model file (required for a learned threat such as cvae)")
    parser.add_argument("--generated", type=Path, nargs="*", default=[], help="shard files or directories")
    parser.add_argument("--labels", type=Path, nargs="*", default=[], help="pseudo-label sidecars (files or dirs)")
    parser.add_argument("--selection", type=Path, help="pipeline.select index.npy (optional)")
    parser.add_argument("--workdir", type=Path, required=True, help="resumable checkpoints (not an output)")
    parser.add_argument("--out-model", type=Path, required=True)
    parser.add_argument("--out-best", type=Path, required=True)
    parser.add_argument("--out-metrics", type=Path, required=True)
    parser.add_argument("--out-curve", type=Path, required=True)
    parser.add_argument("--out-figure", type=Path)
    parser.add_argument("--stop-after", type=int, help=argparse.SUPPRESS)  # tests: simulate preemption
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg_all = params_mod.load(args.params)
    try:
        entry = params_mod.get_run(cfg_all, args.run)
        cfg = params_mod.section(TrainRobustConfig, params_mod.train_robust_for(cfg_all, args.run))
    except params_mod.ParamsError as error:
        sys.exit(f"error: {error}")
    base_seed = cfg_all["base"]["seed"]
    if args.generated and not args.labels:
        log.warning("no --labels: using the labels stored in the generated shards")
    try:
        result = train_robust(cfg, params_mod.training_seed(base_seed, entry), cfg_all["base"]["device"], args.run,
                              args.train, args.val, list(args.generated), list(args.labels), args.workdir,
                              args.selection, args.stop_after,
                              num_classes=datasets.num_classes(cfg_all["base"]["dataset"]),
                              threat_file=args.threat_model,
                              entry=entry, shard_seed=base_seed)
    except (NonFiniteLoss, ShardError, ValueError) as error:  # bad input or divergence: one clear line
        sys.exit(f"error: {error}")
    if distributed.rank() == 0:
        write_outputs(result, cfg, args)
        log.info("%s: best val robust acc %.4f (epoch %d), last %.4f", args.run, result.metrics.val_robust_acc_best,
                 result.metrics.best_epoch, result.metrics.val_robust_acc_last)
    distributed.finish()


if __name__ == "__main__":
    main()
