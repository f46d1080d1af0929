"""The training loop the diffusion generators share (DDPM, EDM): one copy of data parallelism, mixed
precision, EMA, learning-rate warm-up, checkpoints, SIGTERM and divergence handling.

A generator supplies a `Recipe`: how to draw step `step`'s global batch from (seed, step) alone, its loss
on one rank's slice of that batch, and its EMA decay and learning rate as functions of the step. The loop:

- Data parallel under torchrun (WORLD_SIZE > 1; gloo on CPU, nccl on CUDA; pipeline/distributed.py):
  every rank draws the whole global batch of `batch_size` images from the same (seed, step) generator
  and keeps its contiguous slice, and DDP averages the gradients of the per-rank mean losses, so one
  rank and N ranks take the same step up to float summation order (tests/test_train_generator.py).
  Dropout masks come from (seed, step, rank): those, and only those, differ with the rank count.
- On CUDA: the forward pass under bf16 autocast (weights, optimiser and EMA stay float32), the model and
  its inputs channels-last. On CPU: float32, contiguous, bit-reproducible.
- Adam; the learning rate of each step is a pure function of the step, and so is the EMA decay: a run
  resumed from a checkpoint (pipeline/checkpoint.py, written by rank 0) takes exactly the steps the
  uninterrupted run took, whatever the number of ranks it resumes on.
- No host synchronisation per step: a non-finite loss is remembered on the device (the first step that
  produced one) and looked at every SYNC_EVERY steps and before every checkpoint, together with SIGTERM
  (pipeline/preemption.py), all ranks agreeing in one collective. A divergence stops the run with one
  line naming the step; the weights it touched are never saved, so the last good checkpoint is kept.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from pipeline import checkpoint, distributed, seeding
from pipeline.distributed import Dist
from pipeline.preemption import NonFiniteLoss, SigtermFlag, checkpoint_after_step

log = logging.getLogger("pipeline.generators.diffusion_training")
SYNC_EVERY = 10   # steps between the looks at SIGTERM and the loss (also at every checkpoint and the end)
Batch = tuple[torch.Tensor, ...]



def unet_shape(block_out_channels: list[int], layers_per_block: int, attention: bool, dropout: float
               ) -> dict[str, Any]:
    """UNet2DModel arguments shared by the DDPM and the EDM: 32x32x3 in and out, level i at 32 / 2**i
    pixels, self-attention only at 16x16, one attention head, GroupNorm(32) when the widths allow."""
    levels = len(block_out_channels)
    attn = [attention and 32 // 2**i == 16 for i in range(levels)]
    return dict(
        sample_size=32, in_channels=3, out_channels=3,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        attention_head_dim=block_out_channels[min(1, levels - 1)],
        dropout=dropout, norm_num_groups=min(32, math.gcd(*block_out_channels)),
    )

@dataclass(frozen=True)
class Recipe:
    """What one diffusion generator's training is; `train` does the rest."""
    name: str                                     # generator name: seeds, messages, the progress bar
    batch_size: int                               # global batch, over all ranks together
    train_steps: int
    checkpoint_every: int
    draw: Callable[[int], Batch]                  # step -> the global batch's tensors (CPU, batch-first)
    loss: Callable[[nn.Module, Batch], torch.Tensor]  # (forward, this rank's slice on device) -> scalar
    learning_rate: Callable[[int], float]         # Adam's rate at (0-based) step
    ema_decay: Callable[[int], float]             # EMA decay at step: ema <- decay ema + (1 - decay) model
    grad_clip: float | None = None                # max gradient norm (Ho et al.: 1); None: no clipping
    clean_grads: bool = False                     # EDM's nan_to_num of the gradients before each step
    hint: str = ""                                # what to change on divergence, e.g. "train_generator.ddpm.lr"


def draw_images(images: torch.Tensor, gen: torch.Generator, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Training images in [-1, 1] NCHW, each flipped left-right with probability 1/2, and their indices.

    Draws the indices, then the flips, from `gen` (the order is part of DDPM's bytes)."""
    idx = torch.randint(len(images), (batch_size,), generator=gen)
    x = images[idx].permute(0, 3, 1, 2).float().div(127.5).sub(1)
    flip = torch.rand(batch_size, generator=gen) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x), idx


def lerp_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, over the parameters (the UNets have no float buffers)."""
    with torch.no_grad():
        ema_params: list[torch.Tensor] = list(ema.parameters())
        torch._foreach_lerp_(ema_params, [p.detach() for p in model.parameters()], 1 - decay)


def warmup_lr(lr: float, warmup_steps: int, step: int) -> float:
    """lr * min(step / warmup_steps, 1): 0 at the first step, lr from step `warmup_steps` on (0: lr)."""
    return lr if warmup_steps == 0 else lr * min(step / warmup_steps, 1.0)


def unet_config(unet: Any) -> dict[str, Any]:
    """A diffusers model's config for model.pt, with the same bytes in every process: diffusers lists the
    keys left at their defaults (`_use_default_values`) in set order, which changes with the hash seed."""
    config = dict(unet.config)
    if "_use_default_values" in config:
        config["_use_default_values"] = sorted(config["_use_default_values"])
    return config


def setup_ranks(device: torch.device) -> tuple[Dist, torch.device]:
    """The process group when launched by torchrun (the rank's own GPU on CUDA), else one rank on `device`."""
    if distributed.world_size() == 1:
        return Dist(), device
    return distributed.init_distributed(device.type)


def memory_format(device: torch.device) -> torch.memory_format:
    """Channels-last on CUDA (tensor-core convolutions); on CPU the layout the tensors already have (the
    training images arrive NHWC-strided, and another layout would round the convolutions differently)."""
    return torch.channels_last if device.type == "cuda" else torch.preserve_format


def local_slice(batch: Batch, ctx: Dist, device: torch.device, layout: torch.memory_format) -> Batch:
    """This rank's contiguous part of the global batch, on its device (images in `layout`)."""
    if len(batch[0]) % ctx.world_size:
        raise ValueError(f"batch_size {len(batch[0])} is not a multiple of the {ctx.world_size} ranks")
    share = distributed.rank_share(len(batch[0]), ctx)
    # pinned host memory makes the copy asynchronous: the host prepares the next step while the GPU works
    parts = [t[share].pin_memory() if device.type == "cuda" else t[share] for t in batch]
    return tuple(t.to(device, non_blocking=True, memory_format=layout if t.dim() == 4 else torch.preserve_format)
                 for t in parts)


@dataclass
class Loop:
    """The fixed parts of one run (model, optimiser, ranks) and its progress."""
    recipe: Recipe
    seed: int
    ctx: Dist
    device: torch.device
    workdir: Path
    identity: dict[str, Any]
    model: nn.Module
    forward: nn.Module                            # `model`, DDP-wrapped when data parallel
    ema: nn.Module
    optimizer: torch.optim.Optimizer
    first_bad: torch.Tensor                       # on the device, int64: first step with a non-finite loss, or -1
    step: int = 0                                 # steps done when the run started (resumed)
    last_loss: torch.Tensor | None = None         # on the device: read only at sync points

    def loss_value(self) -> float:
        return float("nan") if self.last_loss is None else float(self.last_loss)

    def save(self, done: int) -> None:
        """Rank 0 writes the checkpoint of `done` steps; every rank waits for it."""
        if self.ctx.main:
            checkpoint.save(self.workdir, done, {
                "step": done, "seed": self.seed, "config": self.identity["config"], "identity": self.identity,
                "unet": self.model.state_dict(), "ema": self.ema.state_dict(),
                "optimizer": self.optimizer.state_dict(), "loss": self.loss_value(), "world_size": self.ctx.world_size})
        distributed.barrier(self.ctx)


def build_loop(recipe: Recipe, model: nn.Module, seed: int, identity: dict[str, Any], workdir: Path,
               device: torch.device) -> Loop:
    """Ranks, devices, EMA copy, optimiser, and the newest checkpoint of this same run (rank 0 moves another
    run's checkpoints aside). `model` must be built identically on every rank (seeded by the caller)."""
    ctx, device = setup_ranks(device)
    if device.type == "cuda":  # fastest kernels for the fixed shapes (training/training_loop.py:54 of EDM)
        torch.backends.cudnn.benchmark = True
    # Module.to takes a device and a memory format in one call (torch/nn/modules/module.py, _parse_to); the
    # stubs' overloads list them apart
    model.to(device, memory_format=memory_format(device))  # type: ignore[call-overload]
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.Adam(model.parameters(), lr=recipe.learning_rate(0))
    state = checkpoint.latest(workdir, map_location=device, identity=identity, move_aside=ctx.main)
    distributed.barrier(ctx)  # nobody writes before rank 0 has moved a superseded run aside
    step = 0
    if state is not None:
        model.load_state_dict(state["unet"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
        if state.get("world_size", 1) != ctx.world_size and ctx.main:
            log.info("resuming a %d-rank run on %d ranks (same global batches; dropout masks differ)",
                     state.get("world_size", 1), ctx.world_size)
    forward: nn.Module = model
    if ctx.world_size > 1:
        forward = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                      else None)
    model.train()
    return Loop(recipe, seed, ctx, device, Path(workdir), identity, model, forward, ema, optimizer,
                torch.full((), -1, dtype=torch.int64, device=device), step)


def train_step(loop: Loop, step: int) -> None:
    """One optimiser step on this rank's slice of step `step`'s global batch."""
    recipe, device = loop.recipe, loop.device
    batch = local_slice(recipe.draw(step), loop.ctx, device, memory_format(device))
    # dropout: rank 0 draws what a single-process run draws
    rank_part = (loop.ctx.rank,) if loop.ctx.rank else ()
    torch.manual_seed(seeding.derive(loop.seed, f"train_generator/{recipe.name}/dropout", step, *rank_part))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    with autocast:
        loss = recipe.loss(loop.forward, batch)
    loop.first_bad.masked_fill_((loop.first_bad < 0) & ~torch.isfinite(loss.detach()), step)
    loop.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if recipe.clean_grads:
        for p in loop.model.parameters():
            if p.grad is not None:
                torch.nan_to_num(p.grad, nan=0, posinf=1e5, neginf=-1e5, out=p.grad)
    if recipe.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(loop.model.parameters(), recipe.grad_clip)
    for group in loop.optimizer.param_groups:
        group["lr"] = recipe.learning_rate(step)
    loop.optimizer.step()
    lerp_ema(loop.ema, loop.model, recipe.ema_decay(step))
    loop.last_loss = loss.detach()


def check(loop: Loop, sigterm: bool, done: int) -> bool:
    """At a sync point: stop every rank on a non-finite loss; return whether any rank got SIGTERM."""
    received, bad = distributed.any_rank([sigterm, bool(loop.first_bad >= 0)], loop.ctx)
    if bad:
        first = int(loop.first_bad)
        where = f"at step {first}" if first >= 0 else f"on another rank, before step {done}"
        raise NonFiniteLoss(f"{loop.recipe.name}: loss is not finite {where}; stopped without saving, the last "
                            f"good checkpoint in {loop.workdir} is kept. Lower {loop.recipe.hint}.")
    return received


def train(recipe: Recipe, model: nn.Module, seed: int, identity: dict[str, Any], workdir: Path,
          device: torch.device) -> tuple[nn.Module, float, Dist]:
    """Train `model` to `recipe.train_steps` (resuming from workdir); return the EMA model, the last loss
    (of rank 0's slice) and the ranks (the caller writes its output on rank 0 only)."""
    loop = build_loop(recipe, model, seed, identity, workdir, device)
    total, every = recipe.train_steps, recipe.checkpoint_every
    bar = tqdm(range(loop.step, total), initial=loop.step, total=total, desc=f"{recipe.name} train",
               unit="step", mininterval=5, disable=not loop.ctx.main)
    with SigtermFlag() as sigterm:
        for step in bar:
            train_step(loop, step)
            done = step + 1
            received = False
            if (done % SYNC_EVERY == 0 or done % every == 0 or done == total
                    or (loop.ctx.world_size == 1 and sigterm.received)):
                received = check(loop, sigterm.received, done)
                bar.set_postfix(loss=f"{loop.loss_value():.4f}", refresh=False)
            checkpoint_after_step(received, done, total, every, loop.save, loop.workdir, bar)
    last = loop.loss_value()
    log.info("%s: trained %d steps, last loss %.4f", recipe.name, total, last)
    return loop.ema, last, loop.ctx
