"""Training throughput: our full TRADES step vs a minimal plain TRADES loop, same model, same run.

    OMP_NUM_THREADS=2 python bench/bench_train.py [--models small_cnn wrn-16-4] [--steps 6] [--batch 64]

"Ours" is one step of pipeline.train_robust's inner loop: pipeline.losses.adversarial_loss (TRADES,
eval-mode KL attack via pipeline.attacks.pgd, clean + adversarial forwards through TwoViews), SGD
Nesterov, per-step cosine schedule and the EMA update. "Plain" is the original TRADES code's loop
(Zhang et al. 2019, trades.py), written straight: the KL attack re-evaluates the clean softmax at each
attack step, then clean and adversarial forwards, SGD. Same model weights, batch, 10 attack steps.
Reports images/s (median of `--repeats` timed blocks after one warm-up step, alternating order) and
the ratio ours / plain.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from pipeline import models, optim
from pipeline.ema import EMA
from pipeline.losses import AttackSpec, TwoViews, adversarial_loss

EPS, STEP, STEPS, BETA = 8 / 255, 2 / 255, 10, 6.0


def plain_trades_step(model, opt, x, y):
    """TRADES as in the reference implementation (no tricks)."""
    model.eval()
    x_adv = x.detach() + 0.001 * torch.randn_like(x)
    for _ in range(STEPS):
        x_adv.requires_grad_()
        with torch.enable_grad():
            loss_kl = F.kl_div(F.log_softmax(model(x_adv), dim=1), F.softmax(model(x), dim=1), reduction="sum")
        grad = torch.autograd.grad(loss_kl, [x_adv])[0]
        x_adv = x_adv.detach() + STEP * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x - EPS), x + EPS).clamp(0.0, 1.0)
    model.train()
    opt.zero_grad()
    logits = model(x)
    loss = F.cross_entropy(logits, y) + BETA * (1.0 / len(x)) * F.kl_div(
        F.log_softmax(model(x_adv), dim=1), F.softmax(logits, dim=1), reduction="sum")
    loss.backward()
    opt.step()


def make_ours(model):
    opt = optim.sgd(model, 0.1, 0.9, 5e-4, True)
    sched = optim.scheduler(opt, 10_000, 10)
    ema = EMA(model, 0.995)
    forward = TwoViews(model)
    attack = AttackSpec("linf", EPS, STEP, STEPS)
    gen = torch.Generator().manual_seed(0)
    model.train()

    def step(x, y, smoothing):
        loss, _ = adversarial_loss("trades", model, x, y, BETA, attack, smoothing, gen, forward)
        if not torch.isfinite(loss).item():
            raise RuntimeError("non-finite")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        ema.update(model)
    return step


def timed(fn, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["small_cnn", "wrn-16-4"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3, help="steps per timed block")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"# {platform.machine()} {torch.get_num_threads()} threads, Python {platform.python_version()}, "
          f"torch {torch.__version__}, batch {args.batch}, TRADES {STEPS} steps")
    print("| model | ours img/s | plain img/s | ratio ours/plain |")
    print("|---|---|---|---|")
    for name in args.models:
        torch.manual_seed(0)
        base = models.build(name)
        ours_model, plain_model = copy.deepcopy(base), copy.deepcopy(base)
        ours = make_ours(ours_model)
        plain_opt = torch.optim.SGD(plain_model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
        x, y = torch.rand(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))
        smoothing = torch.zeros(args.batch)
        smoothing[args.batch // 2:] = 0.1
        run_ours = lambda: ours(x, y, smoothing)                       # noqa: E731
        run_plain = lambda: plain_trades_step(plain_model, plain_opt, x, y)  # noqa: E731
        run_ours(), run_plain()                                        # warm-up
        t_ours, t_plain = [], []
        for r in range(args.repeats):
            pair = [(t_ours, run_ours), (t_plain, run_plain)]
            for times, fn in (pair if r % 2 == 0 else pair[::-1]):
                times.append(timed(fn, args.steps))
        ips_ours = args.batch * args.steps / statistics.median(t_ours)
        ips_plain = args.batch * args.steps / statistics.median(t_plain)
        print(f"| {name} | {ips_ours:.1f} | {ips_plain:.1f} | {ips_ours / ips_plain:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
