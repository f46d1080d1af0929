"""Training throughput: our TRADES step vs the PyTorch port's TRADES step, same model, batch and run.

    OMP_NUM_THREADS=2 python bench/bench_train.py [--models small_cnn wrn-16-4] [--attack-steps 10 5]
        [--batch 128] [--steps 2] [--repeats 5] [--wall-steps 0] [--wall-repeats 2]

"Ours" is pipeline.train_robust.train_step itself, on the state train_robust.build_state builds and the
forwards train_robust.forwards builds (compiled when `train_robust.compile`), with the non-finite check
(train_robust.check_finite) every `checkpoint_every` steps as in the loop: adversarial_loss with the
AttackSpec of params.yaml's `train_robust` section (only batch, attack steps, model and compile
overridden), TwoViews for the clean + adversarial forwards, SGD Nesterov, the per-step cosine schedule,
the EMA update and the epoch accumulators: the pipeline's own code path. On CUDA it runs as the stage
does: bf16 autocast, channels-last. bench/gpu_check.py reuses make_ours and make_port.

"Port" re-states, operation by operation, the training step of the PyTorch port of Gowal et al.
(imrahulr/adversarial_robustness_pytorch, commit 6df6a8f0cd49cf6d18507a4b574c004ab6eedf49):
`gowal21uncovering/utils/trades.py::trades_loss` called from `WATrainer.train` in
`gowal21uncovering/utils/watrain.py` (what its `train-wa.py` runs). The code is not copied; each
operation below cites the line it re-states. The only changes: CPU tensors instead of `.cuda()`, and
the per-step `pandas.DataFrame.append` of the metrics (watrain.py L110) is left out, which can only
make the port faster here.

Both sides start from the same initial weights (train_robust.build_state's model, copied) and train on the same
random batch. Timed blocks of `--steps` training steps alternate A B / B A across `--repeats` after one
warm-up step each; reported: steps/s (median, min-max over the blocks) and the ratio ours/port, both
of the medians and per adjacent pair (min / median / max). `--wall-steps N` adds a whole-process
comparison: fresh interpreters (import, model build, N steps) of each side, alternating, small_cnn at
the first --attack-steps value.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline import params  # noqa: E402
from pipeline import train_robust as tr  # noqa: E402
from pipeline.train_robust import TrainRobustConfig  # noqa: E402

Step = Callable[[], None]
PORT = "imrahulr/adversarial_robustness_pytorch@6df6a8f"


def our_config(attack_steps: int, batch: int) -> TrainRobustConfig:
    """params.yaml's `train_robust` section, as train_robust reads it, with attack steps and batch overridden."""
    cfg = params.section(TrainRobustConfig, params.load(ROOT / "params.yaml")["train_robust"])
    return dataclasses.replace(cfg, attack_steps=attack_steps, batch_size=batch,
                               epoch_size=max(cfg.epoch_size, batch))


def make_ours(cfg: TrainRobustConfig, device: torch.device, images: torch.Tensor, y: torch.Tensor,
              is_generated: torch.Tensor) -> tuple[Step, nn.Module]:
    """(one iteration of train_robust's loop, the model's initial weights): train_step on a loader-style
    batch (uint8 NCHW `images`, already on `device`), check_finite every checkpoint_every steps. No
    cutmix, no auxiliary batch norm (the params defaults)."""
    ctx = tr.Dist()
    memory_format, autocast = tr.precision(cfg, device)
    state = tr.build_state(cfg, 0, 10, ctx, device, memory_format)
    initial = copy.deepcopy(state.model)
    attack_model, forward = tr.forwards(state.model, cfg, ctx, device)
    run = tr.Run(cfg=cfg, seed=0, name="bench", entry=params.Run("bench", None, None, None, 0), ctx=ctx, device=device,
                 workdir=Path("."), identity={}, dataset=None, val_set=None,  # type: ignore[arg-type]
                 latent=None, attack=cfg.attack(), attack_model=attack_model, forward=forward,
                 autocast=autocast, memory_format=memory_format, num_classes=10)
    state.model.train()

    def step() -> None:
        tr.train_step(run, state, images, y, is_generated)
        if state.step % cfg.checkpoint_every == 0:
            tr.check_finite(run, state)
    return step, initial


# --- the port's step, re-stated (paths and line numbers in imrahulr/adversarial_robustness_pytorch@6df6a8f) ---

def _port_track_bn_stats(model: nn.Module, track: bool) -> None:
    """core/utils/utils.py L33-39 `track_bn_stats`: sets track_running_stats on every _BatchNorm. In
    train mode with it False, batch norm normalises with batch statistics and leaves the running ones."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.track_running_stats = track


def _port_set_bn_momentum(model: nn.Module, momentum: float) -> None:
    """core/utils/utils.py L42-48 `set_bn_momentum`."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = momentum


def _port_smooth_ce(logits: torch.Tensor, y: torch.Tensor, smoothing: float) -> torch.Tensor:
    """core/utils/utils.py L10-30 `SmoothCrossEntropyLoss(reduction='mean')`: (1 - s) * NLL + s * mean(-log p)."""
    logp = F.log_softmax(logits, dim=-1)
    per_example = (1.0 - smoothing) * -logp.gather(-1, y[:, None])[:, 0] + smoothing * -logp.mean(dim=-1)
    return per_example.mean()


def _port_accuracy(y: torch.Tensor, logits: torch.Tensor) -> float:
    """core/metrics.py L12-13 `accuracy`: softmax, argmax, mean, `.item()`."""
    return ((torch.softmax(logits, dim=1).argmax(dim=1) == y).sum().float() / float(y.size(0))).item()


def make_port(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, step_size: float,
              attack_steps: int, beta: float) -> Step:
    """WATrainer with train-wa.py's defaults (core/utils/parser.py L37-46: lr 0.4, weight decay 5e-4,
    Nesterov, linf-pgd, attack_iter from the caller; train-wa.py L33: tau 0.995; label smoothing 0.1,
    the default of gowal21uncovering/utils/trades.py L22)."""
    # watrain.py L51-64 `init_optimizer`: parameters named '*batchnorm*' without weight decay, SGD
    # momentum 0.9; with the default 'cosinew' scheduler the scheduler steps once per epoch (L112-113),
    # not in the step.
    named = list(model.named_parameters())
    groups = [{"params": [p for n, p in named if "batchnorm" not in n]},
              {"params": [p for n, p in named if "batchnorm" in n], "weight_decay": 0.0}]
    optimizer = torch.optim.SGD(groups, lr=0.4, weight_decay=5e-4, momentum=0.9, nesterov=True)
    wa_model = copy.deepcopy(model)                         # watrain.py L38
    warmup_steps = 0.025 * 400 * (50000 // 1024 + 1)        # watrain.py L43-44, 400 epochs, batch 1024
    batch = len(x)
    state = {"update_iter": 0}
    model.train()                                           # watrain.py L75

    def kl_sum(log_q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        # trades.py L28 nn.KLDivLoss(reduction='sum'): sum of p * (log p - log q) (0 where p == 0)
        return F.kl_div(log_q, p, reduction="sum")

    def step() -> None:
        global_step = state["update_iter"]                  # watrain.py L79 (epoch 1)
        if global_step == 0:                                # watrain.py L80-84
            _port_set_bn_momentum(model, 1.0)
        elif global_step == 1:
            _port_set_bn_momentum(model, 0.01)
        state["update_iter"] += 1                           # watrain.py L85

        # trades_loss, gowal21uncovering/utils/trades.py L21-92 (called from watrain.py L94, L119-126)
        model.train()                                       # trades.py L29
        _port_track_bn_stats(model, False)                  # trades.py L30
        # trades.py L33: uniform start in the eps-box, drawn on the host and copied (`.cuda()`)
        noise = torch.empty(x.shape).uniform_(-eps, eps).to(x.device)
        x_adv = (x.detach() + noise.detach()).clamp(0.0, 1.0)  # trades.py L33-34
        # trades.py L35: clean softmax once, outside any no_grad (the training loop runs with grad on,
        # so this forward records a graph through the parameters; batch statistics, as L29-30 set)
        p_natural = F.softmax(model(x), dim=1)
        for _ in range(attack_steps):                       # trades.py L37-45 ('linf-pgd')
            x_adv.requires_grad_()
            with torch.enable_grad():
                loss_kl = kl_sum(F.log_softmax(model(x_adv), dim=1), p_natural)
            (grad,) = torch.autograd.grad(loss_kl, [x_adv])
            x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
            x_adv = torch.clamp(torch.min(torch.max(x_adv, x - eps), x + eps), 0.0, 1.0)
        model.train()                                       # trades.py L77
        _port_track_bn_stats(model, True)                   # trades.py L78
        x_adv = torch.clamp(x_adv, 0.0, 1.0).detach()       # trades.py L80
        optimizer.zero_grad()                               # trades.py L82 (set_to_none: torch's default)
        logits_natural = model(x)                           # trades.py L84
        logits_adv = model(x_adv)                           # trades.py L85
        loss_natural = _port_smooth_ce(logits_natural, y, 0.1)  # trades.py L27, L86
        loss_robust = (1.0 / batch) * kl_sum(F.log_softmax(logits_adv, dim=1),  # trades.py L87-88
                                             F.softmax(logits_natural, dim=1))
        loss = loss_natural + beta * loss_robust            # trades.py L89
        _metrics = {"loss": loss.item(), "clean_acc": _port_accuracy(y, logits_natural.detach()),  # L91-92
                    "adversarial_acc": _port_accuracy(y, logits_adv.detach())}

        # back in WATrainer.train, watrain.py L100-109 (clip_grad None by default, L101-102)
        loss.backward()                                     # watrain.py L100
        optimizer.step()                                    # watrain.py L103
        global_step = state["update_iter"]                  # watrain.py L107
        # watrain.py L108-109 -> ema_update L169-183 (dynamic decay, parameters only)
        factor = int(global_step >= warmup_steps)
        delta = global_step - warmup_steps
        decay = (min(0.995, (1.0 + delta) / (10.0 + delta)) if 10.0 + delta != 0 else 0.995) * factor
        for p_wa, p_model in zip(wa_model.parameters(), model.parameters()):
            p_wa.data *= decay
            p_wa.data += p_model.data * (1 - decay)
        # watrain.py L110 (pandas DataFrame.append of the metrics): left out
    return step


def build(name: str, attack_steps: int, batch: int, device: torch.device | None = None,
          compile: bool = False) -> tuple[Step, Step]:
    """(ours, port) from the same initial weights and the same batch, on `device`: ours as the stage runs
    there (bf16 autocast and channels-last on CUDA, compiled if asked), the port in fp32 as its code does."""
    device = device or torch.device("cpu")
    cfg = dataclasses.replace(our_config(attack_steps, batch), model=name, compile=compile)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8, generator=generator)
    y = torch.randint(0, 10, (batch,), generator=generator)
    is_generated = torch.zeros(batch, dtype=torch.bool)
    is_generated[batch - round(batch * cfg.generated_fraction):] = True  # the loader puts real rows first
    ours, initial = make_ours(cfg, device, images.to(device), y.to(device), is_generated)
    port_model = initial.to(device, memory_format=torch.contiguous_format)
    port = make_port(port_model, images.float().div(255).to(device), y.to(device), cfg.eps_255 / 255,
                     cfg.step_255 / 255, attack_steps, cfg.beta)
    return ours, port


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Step, steps: int) -> float:
    synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    synchronize()
    return time.perf_counter() - start


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def side_by_side(args: argparse.Namespace) -> None:
    print("| model | attack steps | ours steps/s | port steps/s | ratio ours/port (medians) "
          "| pair ratio min / median / max |")
    print("|---|---|---|---|---|---|")
    for name in args.models:
        for k in args.attack_steps:
            ours, port = build(name, k, args.batch)
            ours(), port()  # warm-up
            t_ours, t_port = [], []
            for r in range(args.repeats):
                pair = [(t_ours, ours), (t_port, port)]
                for times, fn in (pair if r % 2 == 0 else pair[::-1]):
                    times.append(timed(fn, args.steps))
            s_ours = [args.steps / t for t in t_ours]
            s_port = [args.steps / t for t in t_port]
            pairs = sorted(a / b for a, b in zip(s_ours, s_port))
            print(f"| {name} | {k} | {spread(s_ours)} | {spread(s_port)} | "
                  f"{statistics.median(s_ours) / statistics.median(s_port):.2f}x | "
                  f"{pairs[0]:.2f} / {statistics.median(pairs):.2f} / {pairs[-1]:.2f} |", flush=True)


def whole_process(args: argparse.Namespace) -> None:
    k = args.attack_steps[0]
    walls: dict[str, list[float]] = {"ours": [], "port": []}
    for r in range(args.wall_repeats):
        for side in (("ours", "port") if r % 2 == 0 else ("port", "ours")):
            cmd = [sys.executable, __file__, "--child", side, "--models", "small_cnn", "--attack-steps", str(k),
                   "--batch", str(args.batch), "--steps", str(args.wall_steps)]
            start = time.perf_counter()
            subprocess.run(cmd, check=True)
            walls[side].append(time.perf_counter() - start)
    ours, port = statistics.median(walls["ours"]), statistics.median(walls["port"])
    print(f"\nwhole process (python start, imports, model build, {args.wall_steps} steps; small_cnn, "
          f"{k} attack steps, batch {args.batch}), median of {args.wall_repeats}, alternating:")
    print(f"| ours s | port s | ratio ours/port (port s / ours s) |\n|---|---|---|\n"
          f"| {spread(walls['ours'])} | {spread(walls['port'])} | {port / ours:.2f}x |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["small_cnn", "wrn-16-4"])
    parser.add_argument("--attack-steps", nargs="+", type=int, default=[10, 5])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=2, help="training steps per timed block")
    parser.add_argument("--repeats", type=int, default=5, help="timed blocks per side")
    parser.add_argument("--wall-steps", type=int, default=0, help="steps per whole-process run (0: skip)")
    parser.add_argument("--wall-repeats", type=int, default=2)
    parser.add_argument("--child", choices=["ours", "port"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:  # one side alone, for the whole-process comparison
        ours, port = build(args.models[0], args.attack_steps[0], args.batch)
        fn = ours if args.child == "ours" else port
        for _ in range(args.steps):
            fn()
        return
    print(f"# {platform.machine()} {torch.get_num_threads()} torch threads, Python {platform.python_version()}, "
          f"torch {torch.__version__}, batch {args.batch}, fp32; port = {PORT} gowal21uncovering TRADES step")
    side_by_side(args)
    if args.wall_steps:
        whole_process(args)


if __name__ == "__main__":
    main()
