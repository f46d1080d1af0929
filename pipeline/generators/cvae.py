"""Learned perturbation sets (Wong and Kolter, ICLR 2021): a conditional VAE of (x, perturbed x) pairs.

Model: a prior network p(z | x) = N(mu_p(x), sigma_p(x)^2), a recognition network q(z | x, x~), and a
decoder g(z, x) that outputs x plus a residual. Trained on the negative ELBO
    ||g(z, x) - x~||^2 + beta * KL(q(z | x, x~) || p(z | x)),  z ~ q (reparameterised),
on pairs made from the training set by pipeline/corruptions.py (or a user's pairs file, e.g. built
from CIFAR-10-C). Steps draw their batch and noise from generators seeded by (seed, step), so a run
resumed from a checkpoint equals an uninterrupted one; SIGTERM checkpoints first.

The perturbation set of x is S(x) = {g(mu_p(x) + sigma_p(x) * u, x) : ||u||_2 <= eps}. The radius eps
is the largest standardised posterior mean ||(mu_q(x, x~) - mu_p(x)) / sigma_p(x)||_2 over held-out
pairs, as in the paper. Two held-out errors are reported: the necessary-subset approximation error
(min over the latent ball of ||g - x~||, by projected gradient descent) and the sufficient-likelihood
error (mean squared error of g at latents drawn from the prior truncated to the ball), both as mean
squared error per pixel beside the identity baseline ||x - x~||.

Sampling (generator `cvae`): image i perturbs training image i mod N with a latent drawn from the
truncated prior by its own generator seeded by (seed, "cvae", i), and keeps that image's label.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from pipeline import checkpoint, corruptions, seeding
from pipeline.corruptions import Corruption
from pipeline.generators.base import SampleSettings, tiled, to_uint8
from pipeline.inference import to_float
from pipeline.params import key
from pipeline.preemption import NonFiniteLoss, SigtermFlag, checkpoint_after_step
from pipeline.shards import ShardError, file_sha256, read_attrs, read_imageset

log = logging.getLogger("pipeline.generators.cvae")
NAME = "cvae"
TILE = 64  # images per decoder call, aligned to index multiples (bit-reproducibility, base.tiled)


@dataclass(frozen=True)
class Config:
    """params.yaml `train_generator.cvae:`."""
    latent_dim: int = key("size of the latent z", minimum=1)
    width: int = key("channels of the first conv layer", minimum=1)
    beta: float = key("KL weight of the ELBO", minimum=0)
    lr: float = key(exclusiveMinimum=0)  # Adam learning rate
    batch_size: int = key(minimum=1)
    train_steps: int = key(minimum=1)
    holdout: int = key("pairs held out for the radius and the errors", minimum=1)
    pairs_path: str = key(".npz with clean and perturbed pairs (empty - own corruptions)")
    # families of pipeline/corruptions.py used when pairs_path is ""
    corruptions: list[Corruption] = key(minItems=1, uniqueItems=True)
    latent_steps: int = key("projected-gradient steps in the latent ball", minimum=1)
    checkpoint_every: int = key(minimum=1)


class _Encoder(nn.Module):
    """32x32 images (any channel count) -> mean and log-variance of a diagonal Gaussian."""

    def __init__(self, channels: int, width: int, latent: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, width, 3, 1, 1), nn.SiLU(),
            nn.Conv2d(width, 2 * width, 4, 2, 1), nn.SiLU(),        # 16x16
            nn.Conv2d(2 * width, 4 * width, 4, 2, 1), nn.SiLU(),    # 8x8
            nn.Flatten(), nn.Linear(4 * width * 64, 2 * latent))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.net(x).chunk(2, dim=1)
        return mu, logvar.clamp(-12, 8)


class _Decoder(nn.Module):
    """(z, x) -> x + residual: the latent sets how x is perturbed, x's own pixels come through a skip."""

    def __init__(self, width: int, latent: int) -> None:
        super().__init__()
        self.width = width
        self.project = nn.Linear(latent, width * 64)
        self.up = nn.Sequential(nn.SiLU(), nn.ConvTranspose2d(width, width, 4, 2, 1), nn.SiLU(),
                                nn.ConvTranspose2d(width, width, 4, 2, 1), nn.SiLU())
        self.image = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1), nn.SiLU())
        self.out = nn.Sequential(nn.Conv2d(2 * width, width, 3, 1, 1), nn.SiLU(), nn.Conv2d(width, 3, 3, 1, 1))

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        h = self.up(self.project(z).view(-1, self.width, 8, 8))
        return x + self.out(torch.cat([h, self.image(x)], dim=1))


class CVAE(nn.Module):
    def __init__(self, latent_dim: int, width: int) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.prior = _Encoder(3, width, latent_dim)
        self.posterior = _Encoder(6, width, latent_dim)
        self.decoder = _Decoder(width, latent_dim)

    def loss(self, x: torch.Tensor, x_tilde: torch.Tensor, noise: torch.Tensor, beta: float
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(negative ELBO, reconstruction, KL), each averaged over the batch; `noise` ~ N(0, I)."""
        mu_p, logvar_p = self.prior(x)
        mu_q, logvar_q = self.posterior(torch.cat([x, x_tilde], dim=1))
        z = mu_q + (0.5 * logvar_q).exp() * noise
        recon = (self.decoder(z, x) - x_tilde).pow(2).flatten(1).sum(1).mean()
        kl = 0.5 * (logvar_p - logvar_q + (logvar_q.exp() + (mu_q - mu_p) ** 2) / logvar_p.exp() - 1).sum(1).mean()
        return recon + beta * kl, recon, kl

    def at(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """g(mu_p(x) + sigma_p(x) * u, x): the member of x's perturbation set at standardised latent u."""
        return self.members(x)(u)

    def members(self, x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """u -> at(x, u), with the prior network run once (an attack evaluates many u per batch)."""
        mu_p, logvar_p = self.prior(x)
        sigma_p = (0.5 * logvar_p).exp()
        return lambda u: self.decoder(mu_p + sigma_p * u, x)

    def standardised_posterior_mean(self, x: torch.Tensor, x_tilde: torch.Tensor) -> torch.Tensor:
        mu_p, logvar_p = self.prior(x)
        mu_q, _ = self.posterior(torch.cat([x, x_tilde], dim=1))
        return (mu_q - mu_p) / (0.5 * logvar_p).exp()


# --- the latent ball ---


def project(u: torch.Tensor, eps: float) -> torch.Tensor:
    """Project each row onto the L2 ball of radius eps."""
    norms = u.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (u.dim() - 1))
    return u * torch.clamp(eps / norms, max=1.0)


def latent_pgd(objective: Callable[[torch.Tensor], torch.Tensor], latent_dim: int, n: int, eps: float,
               steps: int, device: torch.device, start: torch.Tensor | None = None) -> torch.Tensor:
    """Maximise objective(u) (one value per row, or their sum) over ||u||_2 <= eps by normalised gradient
    ascent from `start` (default u = 0) with step 2.5 * eps / steps, projecting after every step; returns
    the final u (in the ball)."""
    u = torch.zeros(n, latent_dim, device=device) if start is None else project(start.detach(), eps)
    step = 2.5 * eps / max(steps, 1)
    for _ in range(steps):
        u.requires_grad_(True)
        grad, = torch.autograd.grad(objective(u).sum(), u)
        with torch.no_grad():
            u = project(u + step * grad / grad.norm(dim=1, keepdim=True).clamp_min(1e-12), eps)
    return u.detach()


def truncated_prior(latent_dim: int, eps: float, generators: list[torch.Generator]) -> torch.Tensor:
    """One u per generator from N(0, I) conditioned on ||u|| <= eps: a uniform direction and a radius from
    the chi distribution (latent_dim degrees of freedom) truncated at eps, by inverse CDF."""
    from scipy.stats import chi  # here, not at import: the training and sampling paths need no scipy

    rows = []
    cap = chi.cdf(eps, latent_dim)
    for generator in generators:
        direction = torch.randn(latent_dim, generator=generator, dtype=torch.float64)
        radius = chi.ppf(torch.rand(1, generator=generator, dtype=torch.float64).item() * cap, latent_dim)
        rows.append(direction / direction.norm() * min(float(radius), eps))
    return torch.stack(rows).float()


# --- training ---


def make_pairs(cfg: Config, train_images: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if cfg.pairs_path:
        return corruptions.load_pairs(Path(cfg.pairs_path))
    perturbed, _ = corruptions.corrupt(train_images, seeding.numpy_rng(seed, NAME, "pairs"), tuple(cfg.corruptions))
    return train_images, perturbed


def split_holdout(n: int, holdout: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if not 0 < holdout < n:
        raise ValueError(f"train_generator.cvae.holdout: {holdout} must be between 1 and {n - 1} pairs")
    order = seeding.numpy_rng(seed, NAME, "holdout").permutation(n)
    return np.sort(order[holdout:]), np.sort(order[:holdout])


@torch.no_grad()
def estimate_radius(model: CVAE, clean: torch.Tensor, perturbed: torch.Tensor, batch: int = 256) -> float:
    """Largest norm of the standardised posterior mean over the given (held-out) pairs."""
    norms = [model.standardised_posterior_mean(clean[i:i + batch], perturbed[i:i + batch]).norm(dim=1)
             for i in range(0, len(clean), batch)]
    return float(torch.cat(norms).max())


def held_out_errors(model: CVAE, clean: torch.Tensor, perturbed: torch.Tensor, eps: float, steps: int,
                    seed: int, batch: int = 256) -> dict[str, float]:
    """Necessary-subset approximation error and sufficient-likelihood error (MSE per pixel)."""
    approx, sampled, identity = [], [], []
    for i in range(0, len(clean), batch):
        x, x_tilde = clean[i:i + batch], perturbed[i:i + batch]
        u = latent_pgd(lambda v: -(model.at(x, v) - x_tilde).pow(2).flatten(1).sum(1),  # noqa: B023 (called here)
                       model.latent_dim, len(x), eps, steps, x.device)
        generators = [seeding.torch_generator(seed, NAME, "sufficient", i + k) for k in range(len(x))]
        with torch.no_grad():
            approx.append((model.at(x, u).clamp(0, 1) - x_tilde).pow(2).flatten(1).mean(1))
            u_prior = truncated_prior(model.latent_dim, eps, generators).to(x.device)
            sampled.append((model.at(x, u_prior).clamp(0, 1) - x_tilde).pow(2).flatten(1).mean(1))
            identity.append((x - x_tilde).pow(2).flatten(1).mean(1))
    return {"approximation_mse": float(torch.cat(approx).mean()),
            "sufficient_likelihood_mse": float(torch.cat(sampled).mean()),
            "identity_mse": float(torch.cat(identity).mean())}


def train(cfg: Config, train_h5: Path, workdir: Path, out: Path, seed: int, device: torch.device) -> None:
    """Train (resuming from workdir), estimate the radius and the held-out errors, write model.pt."""
    images, _ = read_imageset(train_h5)
    clean_all, perturbed_all = make_pairs(cfg, images, seed)
    fit_rows, held_rows = split_holdout(len(clean_all), cfg.holdout, seed)
    clean, perturbed = torch.from_numpy(clean_all[fit_rows]), torch.from_numpy(perturbed_all[fit_rows])
    torch.manual_seed(seeding.derive(seed, NAME, "init"))
    model = CVAE(cfg.latent_dim, cfg.width).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    start, curve = 0, []
    identity = {"config": asdict(cfg), "seed": seed, "train_sha256": read_attrs(train_h5).get("sha256")}
    state = checkpoint.latest(workdir, map_location=device, identity=identity)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start, curve = state["step"], list(state["curve"])

    def save(done: int) -> None:
        checkpoint.save(workdir, done, {"step": done, "seed": seed, "config": asdict(cfg), "identity": identity,
                                        "curve": curve,
                                        "model": model.state_dict(), "optimizer": optimizer.state_dict()})

    bar = tqdm(range(start, cfg.train_steps), initial=start, total=cfg.train_steps, desc="cvae train",
               unit="step", mininterval=5)
    model.train()
    with SigtermFlag() as sigterm:
        for step in bar:
            gen = seeding.torch_generator(seed, NAME, "step", step)
            idx = torch.randint(len(clean), (cfg.batch_size,), generator=gen)
            noise = torch.randn(cfg.batch_size, cfg.latent_dim, generator=gen)
            loss, recon, kl = model.loss(to_float(clean[idx], device), to_float(perturbed[idx], device),
                                         noise.to(device), cfg.beta)
            if not torch.isfinite(loss).item():
                raise NonFiniteLoss(f"cvae: loss is {loss.item()} at step {step}; stopped without saving, the "
                                    f"last good checkpoint in {workdir} is kept. Lower train_generator.cvae.lr.")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            curve.append({"step": step + 1, "loss": loss.item(), "recon": recon.item(), "kl": kl.item()})
            bar.set_postfix(loss=f"{loss.item():.2f}", refresh=False)
            checkpoint_after_step(sigterm.received, step + 1, cfg.train_steps, cfg.checkpoint_every, save, workdir, bar)
    model.eval()
    held_clean, held_perturbed = to_float(clean_all[held_rows], device), to_float(perturbed_all[held_rows], device)
    radius = estimate_radius(model, held_clean, held_perturbed)
    errors = held_out_errors(model, held_clean, held_perturbed, radius, cfg.latent_steps, seed)
    log.info("radius %.3f; held-out MSE per pixel: approximation %.5f, sufficient %.5f, identity %.5f",
             radius, errors["approximation_mse"], errors["sufficient_likelihood_mse"], errors["identity_mse"])
    checkpoint.save_atomic({
        "kind": NAME, "config": asdict(cfg), "seed": seed, "state_dict": model.state_dict(),
        "radius": radius, "errors": errors, "curve": curve, "n_pairs": len(clean_all), "n_holdout": len(held_rows),
        "train_path": str(train_h5), "train_sha256": file_sha256(train_h5)}, out)


def load_model(path: Path, device: torch.device | str = "cpu") -> tuple[CVAE, dict[str, Any]]:
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("kind") != NAME:
        raise ValueError(f"{path}: not a cvae generator (kind {state.get('kind')!r})")
    model = CVAE(state["config"]["latent_dim"], state["config"]["width"])
    model.load_state_dict(state["state_dict"])
    return model.to(device).eval().requires_grad_(False), state


# --- sampling ---


class CVAESampler:
    name = NAME

    def __init__(self, model: CVAE, state: dict[str, Any], settings: SampleSettings, device: torch.device) -> None:
        path = Path(state["train_path"])
        if not path.exists() or file_sha256(path) != state["train_sha256"]:
            raise ShardError(f"{path}: the training set this cvae was fit on is missing or changed "
                             f"(sha256 {state['train_sha256'][:12]}); retrain the generator")
        self.images, self.labels = read_imageset(path)
        self.model, self.radius, self.seed, self.device = model, float(state["radius"]), settings.seed, device

    def _tile(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        rows = np.arange(lo, hi) % len(self.images)
        generators = [seeding.torch_generator(self.seed, NAME, i) for i in range(lo, hi)]
        u = truncated_prior(self.model.latent_dim, self.radius, generators).to(self.device)
        with torch.inference_mode():
            out = self.model.at(to_float(self.images[rows], self.device), u)
        return to_uint8(out), self.labels[rows].astype(np.int64)

    def sample(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        return tiled(start, stop, TILE, self._tile)

    def provenance(self) -> dict[str, Any]:
        return {"sampler": "truncated_prior", "steps": 1, "tile": TILE, "radius": self.radius}


def load(model_path: Path, settings: SampleSettings, device: torch.device) -> CVAESampler:
    model, state = load_model(model_path, device)
    return CVAESampler(model, state, settings, device)
