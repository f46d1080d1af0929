"""Class-conditional EDM (Karras et al., 2022, "Elucidating the Design Space of Diffusion-Based Generative
Models"), trained on the training set only, sampled with its deterministic Heun sampler.

Reference: NVlabs/edm (commit 008a4e5). Model: D(x; sigma) = c_skip x + c_out F(c_in x; c_noise, class)
with sigma_data 0.5 (training/networks.py:660-667, EDMPrecond; Table 1 of the paper), F a diffusers
UNet2DModel with a class embedding sized like EDM's DDPM++ CIFAR-10 network (train.py:116-118: 128
channels x [2, 2, 2], 4 blocks per level, attention at 16x16) instead of the reference's SongUNet (see
`build_unet` for what differs). Loss: log-normal sigma (P_mean -1.2, P_std 1.2) and the weight
(sigma^2 + sigma_data^2) / (sigma sigma_data)^2 (training/loss.py:66-80). Training (the loop shared with
the DDPM, generators/diffusion_training.py): Adam with a linear learning-rate ramp-up, EMA with a half-life
in images and its ramp-up (training/training_loop.py:134-148), random horizontal flips. EDM's CIFAR-10
recipe adds its non-leaky augmentation pipeline (train.py:143-146, p 0.12, with the augmentation labels as
extra conditioning); we flip only (docs/fidelity.md).

Sampling: Algorithm 2 of the paper with S_churn 0 (generate.py:25-60, edm_sampler): the Karras sigma
schedule (sigma_min 0.002, sigma_max 80, rho 7) over `generate.edm_steps` steps, Heun steps with a last
Euler step to sigma 0, float64 state: 2N - 1 network evaluations. Image `i` starts from its own noise
seeded by (seed, "edm", i) and is conditioned on class i mod num_classes, so any range of indices has
balanced, reproducible classes; the class is stored as the shard's label (the teacher relabels later).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import UNet2DModel
from torch import nn

from pipeline import checkpoint, distributed, seeding
from pipeline.generators import diffusion_training
from pipeline.generators.base import SampleSettings, tiled, to_uint8
from pipeline.params import key
from pipeline.shards import file_sha256, read_attrs, read_imageset

log = logging.getLogger("pipeline.generators.edm")
NAME = "edm"
SIGMA_DATA = 0.5                    # training/networks.py:640 (EDMPrecond sigma_data), loss.py:67
P_MEAN, P_STD = -1.2, 1.2           # training/loss.py:67 (EDMLoss): ln(sigma) ~ N(P_mean, P_std^2)
SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 80.0, 7.0   # generate.py:27 (edm_sampler defaults)
GRAD_NAN_TO_NUM = True              # training/training_loop.py:137-139: non-finite gradients zeroed, no clipping


@dataclass(frozen=True)
class Config:
    """params.yaml `train_generator.edm:` (paper values: EDM's cond CIFAR-10 DDPM++ recipe)."""
    block_out_channels: list[int] = key("UNet widths per 32/16/8.. level (EDM DDPM++ - [256, 256, 256], 128 "
                                        "channels x [2, 2, 2])", minItems=1, items={"minimum": 1})
    layers_per_block: int = key("res blocks per level (EDM - 4)", minimum=1)
    attention: bool = key("self-attention at 16x16")
    dropout: float = key(minimum=0, exclusiveMaximum=1)  # (paper: 0.13)
    lr: float = key("Adam learning rate (EDM - 0.001)", exclusiveMinimum=0)
    warmup_steps: int = key("linear lr ramp-up from 0 over this many steps (EDM - 10 Mimg, 19531 steps of 512); 0 = "
                            "none", minimum=0)
    batch_size: int = key("global batch over all data-parallel ranks, a multiple of their count (EDM - 512)", minimum=1)
    train_steps: int = key("optimisation steps (EDM - 200 Mimg, 390625 steps of 512)", minimum=1)
    ema_halflife_images: int = key("EMA half-life in training images (EDM - 500000)", minimum=1)
    ema_rampup: float = key("EMA half-life capped at this fraction of the images seen so far (EDM - 0.05); 0 = no "
                            "ramp-up", minimum=0)
    checkpoint_every: int = key(minimum=1)  # steps between resumable checkpoints in the work dir


# --- model ---


def preconditioning(sigma: torch.Tensor, sigma_data: float = SIGMA_DATA
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """c_skip, c_out, c_in, c_noise of Table 1 (EDM column) = training/networks.py:660-663."""
    c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
    c_out = sigma * sigma_data / (sigma**2 + sigma_data**2).sqrt()
    c_in = 1 / (sigma_data**2 + sigma**2).sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


def build_unet(cfg: Config, num_classes: int) -> UNet2DModel:
    """F of D(x; sigma), a diffusers UNet2DModel shaped like EDM's DDPM++ (SongUNet, networks.py:229-266).

    The same: widths per 32/16/8 level, blocks per level, one-head attention at 16x16 and in the middle,
    GroupNorm eps 1e-6, dropout, the positional embedding of c_noise (max period 10000, endpoint frequency
    spacing and [sin, cos] order, networks.py:193-206, 269, 323: freq_shift 1, flip_sin_to_cos False).
    Different: the class enters through a learned embedding added to the time embedding (SongUNet: a linear
    map of the one-hot label added before the embedding MLP, networks.py:270, 324-328); the embedding is
    4 x the first width wide (SongUNet: 4 x 128); no sqrt(1/2) skip scaling, first convolution as wide as
    the first level (SongUNet: 128), diffusers' initialisation. 59.0 M parameters at paper scale (DDPM++
    cond: 55.7 M).
    """
    shape = diffusion_training.unet_shape(cfg.block_out_channels, cfg.layers_per_block, cfg.attention, cfg.dropout)
    # one attention head, as SongUNet's num_heads=1
    return UNet2DModel(**shape, norm_eps=1e-6, num_class_embeds=num_classes, freq_shift=1, flip_sin_to_cos=False)


class Denoiser(nn.Module):
    """D(x; sigma, class): EDMPrecond's forward (training/networks.py:654-668) around the UNet `F`. Runs in
    float32 whatever the caller's dtype (the sampler's float64 state); under autocast F's convolutions run
    in bf16 and its output is taken back to float32 before the skip connection, as the reference's fp16."""

    def __init__(self, unet: UNet2DModel, sigma_data: float = SIGMA_DATA) -> None:
        super().__init__()
        self.unet = unet
        self.sigma_data = sigma_data

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float32)
        sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
        c_skip, c_out, c_in, c_noise = preconditioning(sigma, self.sigma_data)
        f = self.unet(c_in * x, c_noise.flatten(), class_labels=class_labels,  # type: ignore[operator]
                      return_dict=False)[0]                                 # diffusers' placeholder type
        return c_skip * x + c_out * f.to(torch.float32)


# --- training ---


def edm_loss(denoise: Callable[..., torch.Tensor], y: torch.Tensor, labels: torch.Tensor, sigma: torch.Tensor,
             noise: torch.Tensor, sigma_data: float = SIGMA_DATA) -> torch.Tensor:
    """EDMLoss (training/loss.py:72-80): weight(sigma) ||D(y + sigma n; sigma) - y||^2, summed over each image's
    pixels and averaged over the images (training_loop.py:132: loss.sum() / batch_gpu_total)."""
    s = sigma.view(-1, 1, 1, 1)
    weight = (s**2 + sigma_data**2) / (s * sigma_data) ** 2
    denoised = denoise(y + noise * s, sigma, labels)
    return (weight * (denoised - y) ** 2).sum() / len(y)


def train_step_batch(images: torch.Tensor, labels: torch.Tensor, seed: int, step: int, batch_size: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The global batch of one step from (seed, step) only: images in [-1, 1] (randomly flipped), their
    classes, sigma = exp(P_mean + P_std z) (loss.py:73-74) and unit noise (loss.py:77 before scaling)."""
    gen = seeding.torch_generator(seed, "train_generator/edm", step)
    x, idx = diffusion_training.draw_images(images, gen, batch_size)
    sigma = (torch.randn(batch_size, generator=gen) * P_STD + P_MEAN).exp()
    noise = torch.randn(x.shape, generator=gen)
    return x, labels[idx], sigma, noise


def ema_decay(cfg: Config, step: int) -> float:
    """training/training_loop.py:143-146: beta = 0.5 ** (batch / half-life), the half-life in images capped
    at ema_rampup x the images seen before this step (cur_nimg), so the first step copies the weights."""
    halflife = float(cfg.ema_halflife_images)
    if cfg.ema_rampup > 0:
        halflife = min(halflife, step * cfg.batch_size * cfg.ema_rampup)
    return 0.5 ** (cfg.batch_size / max(halflife, 1e-8))


def learning_rate(cfg: Config, step: int) -> float:
    """lr * min(step / warmup_steps, 1) (training_loop.py:136: lr * min(cur_nimg / lr_rampup_nimg, 1), the
    ramp-up counted in steps of `batch_size` images)."""
    return diffusion_training.warmup_lr(cfg.lr, cfg.warmup_steps, step)


def recipe(cfg: Config, images: torch.Tensor, labels: torch.Tensor, seed: int) -> diffusion_training.Recipe:
    def loss(forward: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        y, classes, sigma, noise = batch
        return edm_loss(forward, y, classes, sigma, noise)

    return diffusion_training.Recipe(
        name=NAME, batch_size=cfg.batch_size, train_steps=cfg.train_steps, checkpoint_every=cfg.checkpoint_every,
        draw=lambda step: train_step_batch(images, labels, seed, step, cfg.batch_size), loss=loss,
        learning_rate=lambda step: learning_rate(cfg, step), ema_decay=lambda step: ema_decay(cfg, step),
        grad_clip=None, clean_grads=GRAD_NAN_TO_NUM, hint="train_generator.edm.lr")


def class_count(train_h5: Path, labels: np.ndarray) -> int:
    """The dataset's class count (the data stage records it), else 1 + the largest label."""
    count = int(read_attrs(train_h5).get("num_classes", 0)) or int(labels.max()) + 1
    if labels.min() < 0 or labels.max() >= count:
        raise ValueError(f"{train_h5}: labels outside 0..{count - 1}; the conditional EDM needs every image's class")
    return count


def train(cfg: Config, train_h5: Path, workdir: Path, out: Path, seed: int, device: torch.device) -> None:
    """Train (resuming from the newest checkpoint in workdir; data-parallel under torchrun) and write the
    EMA denoiser to `out`."""
    array, labels = read_imageset(train_h5)
    num_classes = class_count(train_h5, labels)
    torch.manual_seed(seeding.derive(seed, "train_generator/edm/init"))
    denoiser = Denoiser(build_unet(cfg, num_classes))
    identity = {"config": asdict(cfg), "seed": seed, "train_sha256": read_attrs(train_h5).get("sha256"),
                "num_classes": num_classes}
    ema, _, ctx = diffusion_training.train(recipe(cfg, torch.from_numpy(array), torch.from_numpy(labels), seed),
                                           denoiser, seed, identity, workdir, device)
    if ctx.main:
        unet: Any = ema.unet  # the Denoiser's UNet2DModel
        unet.to("cpu", memory_format=torch.contiguous_format)
        model = {"kind": NAME, "unet_config": diffusion_training.unet_config(unet), "state_dict": unet.state_dict(),
                 "num_classes": num_classes, "sigma_data": SIGMA_DATA, "p_mean": P_MEAN, "p_std": P_STD,
                 "train_config": asdict(cfg), "seed": seed, "train_sha256": file_sha256(train_h5)}
        checkpoint.save_atomic(model, out)
    distributed.barrier(ctx)


# --- sampling ---


def sigma_schedule(steps: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = RHO,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """Karras et al.'s noise levels, float64: (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) -
    sigma_max^(1/rho)))^rho for i < N, then 0 (eq. 5; generate.py:35-37)."""
    if steps < 2:
        raise ValueError(f"edm sampling needs at least 2 steps (the schedule divides by N - 1), got {steps}")
    i = torch.arange(steps, dtype=torch.float64, device=device)
    sigmas = (sigma_max ** (1 / rho) + i / (steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([sigmas, torch.zeros_like(sigmas[:1])])


def heun_sample(denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], latents: torch.Tensor, steps: int,
                sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """EDM's deterministic sampler (Algorithm 2, S_churn 0; generate.py:25-60): Heun steps along the
    probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma, the last step (to sigma 0) Euler. `denoise(x,
    sigma)` is D (classes bound in the closure), `latents` N(0, I) noise; the state is float64 throughout.
    Returns the final x (float64): 2 * steps - 1 evaluations of `denoise`."""
    t = sigma_schedule(steps, sigma_min, sigma_max, rho, latents.device)
    x = latents.to(torch.float64) * t[0]
    for i in range(steps):
        t_cur, t_next = t[i], t[i + 1]
        d_cur = (x - denoise(x, t_cur).to(torch.float64)) / t_cur
        x_next = x + (t_next - t_cur) * d_cur                       # Euler step (generate.py:50-52)
        if i < steps - 1:                                           # 2nd-order correction (generate.py:55-58)
            d_prime = (x_next - denoise(x_next, t_next).to(torch.float64)) / t_next
            x_next = x + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_prime)
        x = x_next
    return x


def balanced_labels(start: int, stop: int, num_classes: int) -> np.ndarray:
    """The conditioning class of images [start, stop): index mod num_classes, balanced over any whole
    multiple of num_classes and the same for an index whatever shard asks for it."""
    return np.arange(start, stop, dtype=np.int64) % num_classes


def load_denoiser(model: dict[str, Any], device: torch.device) -> Denoiser:
    unet = UNet2DModel.from_config(model["unet_config"])
    unet.load_state_dict(model["state_dict"])
    return Denoiser(unet, model["sigma_data"]).to(device).eval().requires_grad_(False)


class EDMSampler:
    """The Sampler (generators/base.py) of a trained EDM: Heun sampling on tiles of `batch_size` images."""
    name = NAME

    def __init__(self, model: dict[str, Any], settings: SampleSettings, device: torch.device) -> None:
        if device.type == "cuda":  # same kernels for the same shapes, run after run
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
        sigma_schedule(settings.edm_steps)  # a bad step count fails before any work
        self.denoiser = load_denoiser(model, device)
        self.num_classes = int(model["num_classes"])
        self.settings = settings
        self.device = device

    def _tile(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        latents = torch.cat([torch.randn(1, 3, 32, 32, generator=seeding.torch_generator(self.settings.seed, NAME, i))
                             for i in range(lo, hi)]).to(self.device)
        labels = balanced_labels(lo, hi, self.num_classes)
        classes = torch.from_numpy(labels).to(self.device)
        with torch.inference_mode():
            x = heun_sample(lambda v, sigma: self.denoiser(v, sigma, classes), latents, self.settings.edm_steps)
        return to_uint8(x / 2 + 0.5), labels

    def sample(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        return tiled(start, stop, self.settings.batch_size, self._tile)

    def provenance(self) -> dict[str, Any]:
        return {"sampler": "heun", "steps": self.settings.edm_steps, "tile": self.settings.batch_size,
                "sigma_min": SIGMA_MIN, "sigma_max": SIGMA_MAX, "rho": RHO}


def load(model_path: Path, settings: SampleSettings, device: torch.device) -> EDMSampler:
    model = torch.load(model_path, map_location="cpu", weights_only=False)
    if model.get("kind") != NAME:
        raise ValueError(f"{model_path}: not an edm generator (kind {model.get('kind')!r})")
    return EDMSampler(model, settings, device)
