"""DDPM (Ho et al., 2020) with Hugging Face diffusers, trained from scratch on the training set only.

Training: UNet2DModel predicting the noise (epsilon), linear betas 1e-4..0.02 over
`num_train_timesteps`, Adam with a linear learning-rate warm-up over `warmup_steps`, gradient clipping at
1 (Ho et al.), random horizontal flips, an EMA of the weights. Every step's batch, flips, timesteps, noise
and dropout come from generators seeded by (seed, step), and its learning rate is a function of the step
alone (see `learning_rate`), so a run resumed from a checkpoint draws and steps exactly as the
uninterrupted run did. Checkpoints every `checkpoint_every` steps and on SIGTERM (after the step in
flight, then exit status 143). Unconditional, as in the paper: the teacher labels the samples later. The
loop (data parallel under torchrun, bf16 autocast on CUDA) is generators/diffusion_training.py, shared
with the EDM.

Sampling: `ddpm` (ancestral), `ddim` (eta 0) or `dpmsolver` (DPM-Solver++ 2M) schedulers from
diffusers, in a plain loop under torch.inference_mode. The ancestral sampler's per-step variance is
`generate.ddpm_variance` (see VARIANCE_TYPES): `fixedlarge` (Ho et al.'s CIFAR-10 setting) or
`fixedsmall`; ddim and dpmsolver are deterministic given the initial noise and have no such variance.
Each image's initial and per-step noise come from its own generator seeded by (seed, "ddpm", index);
network calls run on tiles of `batch_size` images aligned to index multiples (see base.tiled), so a
shard's bytes do not depend on which shards were generated before it, in which order, or where.

Pretrained: with `pretrained` set, `train` imports a diffusers model instead (ddpm_pretrained.py); its
model.pt records the pretrained scheduler's betas and clipping, which `make_scheduler` samples with.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

# diffusers' package __init__ declares these names for type checkers through its placeholder classes
# (diffusers/utils/dummy_pt_objects.py), which lack the real ones' methods: the `type: ignore`s on UNet2DModel
# and DDPMScheduler uses below are for that.
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DModel

from pipeline import checkpoint, distributed, seeding
from pipeline.generators import ddpm_pretrained, diffusion_training
from pipeline.generators.base import UNLABELLED, SampleSettings, tiled, to_uint8
from pipeline.params import key
from pipeline.shards import file_sha256, read_attrs, read_imageset

log = logging.getLogger("pipeline.generators.ddpm")
NAME = "ddpm"
GRAD_CLIP = 1.0                       # Ho et al. clip the gradient norm at 1
BETA_START, BETA_END = 1e-4, 0.02     # Ho et al. linear schedule
# generate.sampler: ancestral (ddpm), or the deterministic ddim and dpmsolver; SAMPLERS' keys
SamplerName = Literal["ddpm", "ddim", "dpmsolver"]
SAMPLERS = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "dpmsolver": DPMSolverMultistepScheduler}
# Variance of p(x_{t-1} | x_t) in the ancestral (`ddpm`) sampler, as hojonathanho/diffusion names it
# (diffusion_tf/diffusion_utils_2.py, commit 1e0dceb, lines 138-144), mapped to DDPMScheduler's variance_type:
#   fixedlarge: sigma_t^2 = beta_t, with the entry at t = 0 replaced by the posterior variance at t = 1
#     (line 142: np.log(np.append(self.posterior_variance[1], self.betas[1:]))). Ho et al.'s CIFAR-10
#     setting: scripts/run_cifar.py line 136, model_var_type='fixedlarge'.
#   fixedsmall: sigma_t^2 = the posterior variance beta_t (1 - abar_{t-1}) / (1 - abar_t) (line 77, line 143);
#     DDPMScheduler's default, and the only ancestral variance before it was a setting (same bytes);
#     Ho et al. (Sec. 3.2) report similar sample quality for both.
# diffusers' fixed_large is the same table wherever noise is drawn: it uses 1 - abar_t / abar_{t-1} = beta_t,
# and at t = 0, the one entry that differs (beta_0 there, posterior_variance[1] in the reference), neither
# draws noise (DDPMScheduler.step adds noise only for t > 0; the reference masks t == 0, lines 194-196),
# so that entry only enters the reference's likelihood terms, never a sample. diffusers works in float32
# (abar_t / abar_{t-1} then 1 - that), which puts its beta_t within 5e-4 relative of the float64 value, the
# same float32 arithmetic as its fixed_small. With fewer sampling steps than training timesteps, beta_t
# becomes 1 - abar_t / abar_{t'} for the previous sampled timestep t', the respaced chain's beta.
DdpmVariance = Literal["fixedlarge", "fixedsmall"]   # VARIANCE_TYPES' keys
VARIANCE_TYPES = {"fixedlarge": "fixed_large", "fixedsmall": "fixed_small"}


@dataclass(frozen=True)
class Config:
    """params.yaml `train_generator.ddpm:`."""
    # UNet widths per resolution (paper: [128, 256, 256, 256])
    block_out_channels: list[int] = key(minItems=1, items={"minimum": 1})
    layers_per_block: int = key(minimum=1)  # res blocks per level (paper: 2)
    attention: bool = key()  # self-attention at 16x16 (paper: true)
    dropout: float = key(minimum=0, exclusiveMaximum=1)  # (paper: 0.1)
    num_train_timesteps: int = key(minimum=1)  # length of the linear beta schedule (paper: 1000)
    lr: float = key(exclusiveMinimum=0)  # Adam learning rate (paper: 2e-4)
    warmup_steps: int = key("linear lr warm-up from 0 over this many steps, then constant (Ho et al. - 5000; 0 = "
                            "constant lr)", minimum=0)
    batch_size: int = key(minimum=1)  # (paper: 128)
    train_steps: int = key(minimum=1)  # optimisation steps (paper: 800000)
    ema_decay: float = key(minimum=0, exclusiveMaximum=1)  # (paper: 0.9999), warm-up form min(decay, (1+t)/(10+t))
    checkpoint_every: int = key(minimum=1)  # steps between resumable checkpoints in the work dir
    pretrained: str = key("diffusers folder (pipeline with unet/ and scheduler/, or a bare UNet) or a hub id in the "
                          "local cache, imported instead of training; empty = train")


def build_unet(cfg: Config) -> UNet2DModel:
    """Ho et al.'s CIFAR-10 UNet shape in diffusers terms: level i works at 32 / 2**i pixels."""
    # one attention head and GroupNorm(32) as in Ho et al.
    return UNet2DModel(**diffusion_training.unet_shape(cfg.block_out_channels, cfg.layers_per_block, cfg.attention,
                                                       cfg.dropout))


def noise_scheduler(num_train_timesteps: int) -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule="linear",
                         beta_start=BETA_START, beta_end=BETA_END, clip_sample=True)


def learning_rate(cfg: Config, step: int) -> float:
    """Adam's learning rate at (0-based) `step`: lr * min(step / warmup_steps, 1), then constant.

    Ho et al.'s warm-up, as hojonathanho/diffusion (commit 1e0dceb) computes it: scripts/run_cifar.py
    line 134 (lr=2e-4, warmup=5000), passed to the optimiser through diffusion_tf/tpu_utils/tpu_utils.py
    line 157 and diffusion_tf/utils.py lines 145-148 (get_warmed_up_lr: max_lr * min(global_step / warmup,
    1), where global_step counts the steps already taken, so the first step's rate is 0). A pure function
    of the step: a resumed run needs no scheduler state to use the rates the uninterrupted run used.
    """
    return diffusion_training.warmup_lr(cfg.lr, cfg.warmup_steps, step)


def ema_decay(decay: float, step: int) -> float:
    """EMA decay with warm-up: min(decay, (1+t)/(10+t)), so short runs are not dominated by the init."""
    return min(decay, (1 + step) / (10 + step))


def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float, step: int) -> None:
    """One EMA update after optimiser step `step` (what the training loop does through `ema_decay`)."""
    diffusion_training.lerp_ema(ema, model, ema_decay(decay, step))


def train_step_batch(images: torch.Tensor, seed: int, step: int, batch_size: int, timesteps: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The global batch (in [-1, 1], randomly flipped), timesteps and noise of one step, from (seed, step)
    only; data-parallel ranks each take their slice."""
    gen = seeding.torch_generator(seed, "train_generator/ddpm", step)
    x, _ = diffusion_training.draw_images(images, gen, batch_size)
    t = torch.randint(timesteps, (batch_size,), generator=gen)
    noise = torch.randn(x.shape, generator=gen)
    return x, t, noise


def recipe(cfg: Config, images: torch.Tensor, seed: int, alphas: torch.Tensor) -> diffusion_training.Recipe:
    """Ho et al.'s objective: the UNet predicts the noise, mean squared error (alphas: the cumulative
    products of the schedule, on the training device)."""

    def loss(forward: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        x, t, noise = batch
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x + (1 - a).sqrt() * noise
        return torch.nn.functional.mse_loss(forward(noisy, t, return_dict=False)[0].float(), noise)

    return diffusion_training.Recipe(
        name=NAME, batch_size=cfg.batch_size, train_steps=cfg.train_steps, checkpoint_every=cfg.checkpoint_every,
        # looked up at each call, so a test can watch the steps drawn
        draw=lambda step: train_step_batch(images, seed, step, cfg.batch_size, cfg.num_train_timesteps),
        loss=loss, learning_rate=lambda step: learning_rate(cfg, step),
        ema_decay=lambda step: ema_decay(cfg.ema_decay, step), grad_clip=GRAD_CLIP,
        hint="train_generator.ddpm.lr")


def train(cfg: Config, train_h5: Path, workdir: Path, out: Path, seed: int, device: torch.device) -> None:
    """Train (resuming from the newest checkpoint in workdir; data-parallel under torchrun, see
    generators/diffusion_training.py) and write the EMA UNet to `out`."""
    if cfg.pretrained:  # import a pretrained diffusers model instead of training
        ddpm_pretrained.import_pretrained(cfg.pretrained, out)
        return
    array, _ = read_imageset(train_h5)  # labels unused: unconditional model
    torch.manual_seed(seeding.derive(seed, "train_generator/ddpm/init"))
    unet: Any = build_unet(cfg)  # a torch Module (diffusers' placeholder type says otherwise)
    identity = {"config": asdict(cfg), "seed": seed, "train_sha256": read_attrs(train_h5).get("sha256")}
    ctx, device = diffusion_training.setup_ranks(device)
    # diffusers' placeholder type lacks alphas_cumprod
    alphas = noise_scheduler(cfg.num_train_timesteps).alphas_cumprod.to(device)  # type: ignore[attr-defined]
    ema, _, ctx = diffusion_training.train(recipe(cfg, torch.from_numpy(array), seed, alphas), unet, seed,
                                           identity, workdir, device)
    if ctx.main:
        ema_unet: Any = ema.to("cpu", memory_format=torch.contiguous_format)  # type: ignore[call-overload]
        model = {"kind": NAME, "unet_config": diffusion_training.unet_config(ema_unet),
                 "state_dict": ema_unet.state_dict(), "num_train_timesteps": cfg.num_train_timesteps,
                 "beta_start": BETA_START, "beta_end": BETA_END, "train_config": asdict(cfg), "seed": seed,
                 "train_sha256": file_sha256(train_h5)}
        checkpoint.save_atomic(model, out)
    distributed.barrier(ctx)


def make_scheduler(sampler: str, model: dict[str, Any], variance: str = "fixedlarge") -> Any:
    """The diffusers scheduler of `sampler`; `variance` (VARIANCE_TYPES) applies to the ancestral one only."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; known: {', '.join(sorted(SAMPLERS))}")
    if variance not in VARIANCE_TYPES:
        raise ValueError(f"unknown ddpm variance {variance!r}; known: {', '.join(sorted(VARIANCE_TYPES))}")
    # Ho et al.'s linear betas with clipping for trained models; an imported model's recorded betas and clipping
    kwargs, clip = ddpm_pretrained.schedule_kwargs(model)
    if sampler == "dpmsolver":
        return DPMSolverMultistepScheduler(**kwargs, algorithm_type="dpmsolver++", solver_order=2)
    if sampler == "ddpm":
        return DDPMScheduler(**kwargs, **clip, variance_type=VARIANCE_TYPES[variance])
    return DDIMScheduler(**kwargs, **clip)


def load_unet(model: dict[str, Any], device: torch.device) -> UNet2DModel:
    unet = UNet2DModel.from_config(model["unet_config"])
    unet.load_state_dict(model["state_dict"])
    return unet.to(device).eval().requires_grad_(False)


class DDPMSampler:
    name = NAME

    def __init__(self, model: dict[str, Any], settings: SampleSettings, device: torch.device) -> None:
        if device.type == "cuda":  # same kernels for the same shapes, run after run
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
        self.unet = load_unet(model, device)
        self.scheduler = make_scheduler(settings.sampler, model, settings.ddpm_variance)
        self.scheduler.set_timesteps(settings.sampling_steps)
        self.settings = settings
        self.device = device

    def denoise(self, noise: torch.Tensor, generators: list[torch.Generator] | None) -> torch.Tensor:
        """The sampling loop: one UNet call and one scheduler step per timestep; returns [0, 1] images."""
        scheduler = copy.deepcopy(self.scheduler)  # multistep solvers keep per-run history
        x = noise * scheduler.init_noise_sigma
        with torch.inference_mode():
            for t in scheduler.timesteps:
                eps = self.unet(scheduler.scale_model_input(x, t), t).sample  # type: ignore[operator]  # placeholder
                x = scheduler.step(eps, t, x, generator=generators).prev_sample
        return (x / 2 + 0.5).clamp(0, 1)

    def _tile(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        generators = [seeding.torch_generator(self.settings.seed, NAME, i) for i in range(lo, hi)]
        noise = torch.cat([torch.randn(1, 3, 32, 32, generator=g) for g in generators]).to(self.device)
        # per-image generators continue into the ancestral sampler's per-step noise (diffusers'
        # randn_tensor draws image b from generators[b])
        images = self.denoise(noise, generators)
        return to_uint8(images), np.full(hi - lo, UNLABELLED, dtype=np.int64)

    def sample(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        return tiled(start, stop, self.settings.batch_size, self._tile)

    def provenance(self) -> dict[str, Any]:
        attrs = {"sampler": self.settings.sampler, "steps": self.settings.sampling_steps,
                 "tile": self.settings.batch_size}
        if self.settings.sampler == "ddpm":  # ddim and dpmsolver draw no per-step noise
            attrs["variance"] = self.settings.ddpm_variance
        return attrs


def load(model_path: Path, settings: SampleSettings, device: torch.device) -> DDPMSampler:
    model = torch.load(model_path, map_location="cpu", weights_only=False)
    if model.get("kind") != NAME:
        raise ValueError(f"{model_path}: not a ddpm generator (kind {model.get('kind')!r})")
    return DDPMSampler(model, settings, device)
