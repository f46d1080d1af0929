"""Cost of the related-method options: one full TRADES step with auxiliary batch norm (AdvProp or by
source), CutMix, or the inner maximisation in a learned perturbation set (latent_at: a CVAE of the
default size, latent 32, width 16), against the same step without them, same model and batch, same run.

    OMP_NUM_THREADS=2 python bench/bench_related.py [--models small_cnn wrn-16-4] [--batch 64]

Each option runs pipeline.train_robust's inner step: CutMix on the batch (pipeline/cutmix.py), the
TRADES loss with routes (pipeline/aux_bn.py), SGD Nesterov and the EMA update. Median of `--repeats`
timed blocks after a warm-up step, in rotating order; the ratio is against the plain step.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time

import numpy as np
import torch

from pipeline import aux_bn, models, optim
from pipeline import cutmix as cm
from pipeline.ema import EMA
from pipeline.generators import cvae
from pipeline.latent_attack import LatentSet
from pipeline.losses import AttackSpec, TwoViews, adversarial_loss

EPS, STEP, STEPS, BETA = 8 / 255, 2 / 255, 10, 6.0
OPTIONS = {"plain": ("none", 0.0, False), "advprop": ("adversarial", 0.0, False),
           "source_bn": ("source", 0.0, False), "cutmix": ("none", 1.0, False), "latent_at": ("none", 0.0, True)}


def make_step(model: torch.nn.Module, mode: str, alpha: float, latent: bool):
    if mode != "none":
        model = aux_bn.convert(model)
    opt = optim.sgd(model, 0.1, 0.9, 5e-4, True)
    ema = EMA(model, 0.995)
    latent_set = LatentSet(cvae.CVAE(32, 16).eval().requires_grad_(False), 1.0) if latent else None
    forward = TwoViews(model)
    attack = AttackSpec("cvae", EPS, STEP, STEPS, latent_set) if latent else AttackSpec("linf", EPS, STEP, STEPS)
    gen, rng = torch.Generator().manual_seed(0), np.random.default_rng(0)
    model.train()

    def step(x: torch.Tensor, y: torch.Tensor, smoothing: torch.Tensor, is_generated: torch.Tensor) -> None:
        mix = None
        if alpha > 0:
            x, mix = cm.cutmix(x, y, smoothing, cm.selection("both", is_generated), alpha, rng, "reference", 10)
        loss, _ = adversarial_loss("trades", model, x, y, BETA, attack, smoothing, gen, forward, mix,
                                   aux_bn.routes_for(mode, int((~is_generated).sum())))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update(model)
    return step


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["small_cnn"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3, help="steps per timed block")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"# {platform.machine()} {torch.get_num_threads()} threads, Python {platform.python_version()}, "
          f"torch {torch.__version__}, batch {args.batch} (half generated), TRADES {STEPS} steps")
    print("| model | " + " | ".join(f"{name} img/s" for name in OPTIONS) + " | "
          + " | ".join(f"{name}/plain" for name in list(OPTIONS)[1:]) + " |")
    print("|---|" + "---|" * (2 * len(OPTIONS) - 1))
    for name in args.models:
        torch.manual_seed(0)
        base = models.build(name)
        steps = {option: make_step(copy.deepcopy(base), *settings) for option, settings in OPTIONS.items()}
        x, y = torch.rand(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))
        is_generated = torch.arange(args.batch) >= args.batch // 2
        smoothing = is_generated.float() * 0.1
        times: dict[str, list[float]] = {option: [] for option in OPTIONS}
        for step in steps.values():
            step(x, y, smoothing, is_generated)                         # warm-up
        order = list(OPTIONS)
        for r in range(args.repeats):
            for option in order[r % len(order):] + order[:r % len(order)]:
                start = time.perf_counter()
                for _ in range(args.steps):
                    steps[option](x, y, smoothing, is_generated)
                times[option].append(time.perf_counter() - start)
        ips = {option: args.batch * args.steps / statistics.median(t) for option, t in times.items()}
        print(f"| {name} | " + " | ".join(f"{ips[o]:.1f}" for o in OPTIONS) + " | "
              + " | ".join(f"{ips[o] / ips['plain']:.2f}x" for o in list(OPTIONS)[1:]) + " |", flush=True)


if __name__ == "__main__":
    main()
