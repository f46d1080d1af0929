"""CPU speed of the TRADES training step and of the evaluation attacks: precision, layout, compile, threads.

    python bench/bench_cpu_speed.py --quick                      # small_cnn, no compile: 5-10 minutes
    python bench/bench_cpu_speed.py --quick --variants fp32 compile channels_last compile+channels_last
    python bench/bench_cpu_speed.py --parts train --models wrn-16-4 --variants fp32 channels_last bf16 \\
        --repeats 2 --warmup 0
    python bench/bench_cpu_speed.py [--parts train eval] [--models small_cnn wrn-16-4] [--batch 128]
        [--attack-steps 5] [--steps 1] [--repeats 3] [--variants ...] [--eval-model small_cnn] [--eval-n 100]
        [--apgd-iter 100] [--pgd-steps 40] [--skip-above 3]

Training: pipeline.train_robust.train_step itself, built by bench/bench_train.py's make_ours (the state
train_robust.build_state builds, train_robust.forwards, train_robust.precision) with params.yaml's
`train_robust` section and only model, batch, attack steps, `autocast`, `memory_format` and `compile`
overridden: the whole TRADES step (attack, clean and adversarial forwards, backward, SGD, schedule, EMA).
Evaluation, on one batch of `--eval-n` images of an eval-mode model: pyautoattack's APGD-CE (the first
attack of standard AutoAttack, `--apgd-iter` iterations, one restart) and the project's PGD
(pipeline.attacks.robust_accuracy, `--pgd-steps` steps). The labels are the model's own clean predictions,
so every image is attacked whatever the weights (APGD skips misclassified points).

Variants (names as --variants takes them): fp32 (eager, float32, contiguous, one thread: the baseline),
bf16 (CPU autocast), channels_last, bf16+channels_last, compile (torch.compile, inductor, fp32),
compile+channels_last, and `...@2` for the same on two threads. All variants of a part are built first;
then each round times one block of every variant, in an order rotated by one each round, so load from
other processes falls on all of them alike. Reported per variant: median CPU seconds (time.process_time:
this process, all its threads) and wall seconds per block, and the speed-up against fp32 as the median
over rounds of the ratio within the round (above 1: faster). Before timing, each eager variant runs one
forward and backward of the model at batch 16 (the probe); one whose probe is `--skip-above` times
slower than fp32's is reported with its probe ratio and not timed (bf16 without native bf16
instructions is ten times slower, and a wrn-16-4 step would take minutes); two-thread variants are
always timed, their CPU time counting OpenMP's spinning too. Never used in tests.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import bench_train  # noqa: E402

from pipeline import attacks, models  # noqa: E402

Work = Callable[[], None]
VARIANTS = ["fp32", "bf16", "channels_last", "bf16+channels_last", "compile", "compile+channels_last",
            "fp32@2", "channels_last@2"]


@dataclass(frozen=True)
class Variant:
    name: str
    bf16: bool
    channels_last: bool
    compile: bool
    threads: int

    @classmethod
    def parse(cls, name: str) -> Variant:
        """'bf16+channels_last@2' -> bf16 autocast, channels-last, two threads."""
        body, _, threads = name.partition("@")
        parts = set(body.split("+"))
        unknown = parts - {"fp32", "bf16", "channels_last", "compile"}
        if unknown:
            raise SystemExit(f"error: unknown variant part(s) {sorted(unknown)} in {name!r}")
        return cls(name, "bf16" in parts, "channels_last" in parts, "compile" in parts, int(threads or 1))

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format


def hardware() -> str:
    """CPU model, the bf16-relevant instruction sets the kernel exposes, torch's and oneDNN's view."""
    model, flags = platform.processor() or "?", set()
    with open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    wanted = ["avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile"]
    present = " ".join(f"{f}:{'yes' if f in flags else 'no'}" for f in wanted)
    return (f"# {model}, {os.cpu_count()} CPUs; {present}; torch {torch.__version__} "
            f"(kernels {torch.backends.cpu.get_cpu_capability()}), Python {platform.python_version()}; "
            f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


def probe(model: nn.Module, variant: Variant) -> float:
    """CPU seconds of one train-mode forward and backward at batch 16 under the variant (second call)."""
    torch.set_num_threads(variant.threads)
    model = copy.deepcopy(model).train().to(memory_format=variant.memory_format)
    x = torch.rand(16, 3, 32, 32).contiguous(memory_format=variant.memory_format)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=variant.bf16)
    seconds = 0.0
    for _ in range(2):
        start = time.process_time()
        with autocast:
            out = model(x)
        out.float().sum().backward()
        seconds = time.process_time() - start
    return seconds


def train_work(name: str, variant: Variant, batch: int, attack_steps: int) -> Work:
    """One train_robust.train_step (and the loop's non-finite check) as the stage runs it under `variant`."""
    cfg = dataclasses.replace(bench_train.our_config(attack_steps, batch), model=name, compile=variant.compile,
                              autocast="bf16" if variant.bf16 else "fp32",
                              memory_format="channels_last" if variant.channels_last else "contiguous")
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8, generator=generator)
    y = torch.randint(0, 10, (batch,), generator=generator)
    is_generated = torch.zeros(batch, dtype=torch.bool)
    is_generated[batch - round(batch * cfg.generated_fraction):] = True  # the loader puts real rows first
    step, _ = bench_train.make_ours(cfg, torch.device("cpu"), images, y, is_generated)
    return step


class Bf16(nn.Module):
    """The model's forward under CPU bf16 autocast, float32 logits out (what an attack library sees)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.model(x).float()


def eval_model(model: nn.Module, variant: Variant) -> nn.Module:
    """An eval-mode copy of `model` in the variant's layout, precision and compilation."""
    out: nn.Module = copy.deepcopy(model).eval().to(memory_format=variant.memory_format)
    if variant.bf16:
        out = Bf16(out)
    return torch.compile(out) if variant.compile else out  # type: ignore[return-value]


def eval_works(model: nn.Module, variant: Variant, n: int, apgd_iter: int, pgd_steps: int
               ) -> dict[str, Work]:
    """{'APGD-CE': ..., 'PGD-k': ...} on one batch of n images under `variant`."""
    from pyautoattack.autopgd_base import APGDAttack

    net = eval_model(model, variant)
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(n, 3, 32, 32, generator=generator).contiguous(memory_format=variant.memory_format)
    with torch.no_grad():
        y = model.eval()(x).argmax(1)   # every image counts as correct, so APGD attacks all of them
    apgd = APGDAttack(net, n_iter=apgd_iter, norm="Linf", eps=8 / 255, loss="ce", n_restarts=1, seed=0,
                      device=torch.device("cpu"))
    return {"APGD-CE": lambda: apgd.perturb(x, y),
            f"PGD-{pgd_steps}": lambda: attacks.robust_accuracy(net, x, y, "linf", 8 / 255, pgd_steps, n)}


def timed(work: Work, threads: int) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of one call on `threads` threads."""
    torch.set_num_threads(threads)
    cpu, wall = time.process_time(), time.perf_counter()
    work()
    return time.process_time() - cpu, time.perf_counter() - wall


def compare(title: str, works: dict[str, tuple[Variant, Work]], probes: dict[str, float], args: argparse.Namespace
            ) -> None:
    """Warm up, time the variants side by side in rotated order, print one markdown table."""
    base = probes.get("fp32")
    # two-thread variants are always timed: their CPU time includes OpenMP's spinning, not only work
    skipped = {name: probes[name] / base for name, (variant, _) in works.items()
               if base and name in probes and variant.threads == 1 and probes[name] > args.skip_above * base}
    live = {name: vw for name, vw in works.items() if name not in skipped}
    warm: dict[str, float] = {}
    for name, (variant, work) in live.items():
        start = time.perf_counter()
        for _ in range(args.warmup):
            timed(work, variant.threads)
        warm[name] = time.perf_counter() - start
    names = list(live)
    cpu: dict[str, list[float]] = {n: [] for n in names}
    wall: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            variant, work = live[name]
            c, w = timed(work, variant.threads)
            cpu[name].append(c)
            wall[name].append(w)
    print(f"\n{title}; {args.repeats} rounds, {args.warmup} warm-up call(s)\n")
    print("| variant | CPU s (median, min-max) | wall s (median, min-max) | speed-up CPU | speed-up wall "
          "| warm-up wall s |")
    print("|---|---|---|---|---|---|")
    for name in works:
        if name in skipped:
            print(f"| {name} | not timed: batch-16 fwd+bwd {skipped[name]:.1f}x the CPU time of fp32 | | "
                  f"{1 / skipped[name]:.2f}x (probe) | | |")
            continue
        row = f"| {name} | {spread(cpu[name])} | {spread(wall[name])} | "
        if "fp32" in cpu:
            row += (f"{statistics.median(b / v for b, v in zip(cpu['fp32'], cpu[name])):.2f}x | "
                    f"{statistics.median(b / v for b, v in zip(wall['fp32'], wall[name])):.2f}x | ")
        else:
            row += " | | "
        print(row + f"{warm[name]:.1f} |", flush=True)


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="small_cnn only, 64 evaluation images, APGD-CE 25 iterations, 3 rounds, no compile")
    parser.add_argument("--parts", nargs="+", choices=["train", "eval"], default=["train", "eval"])
    parser.add_argument("--models", nargs="+", default=["small_cnn", "wrn-16-4"], help="training-step models")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--attack-steps", type=int, default=5)
    parser.add_argument("--variants", nargs="+", help=f"fp32 (the baseline) first; default {' '.join(VARIANTS)} "
                        "(--quick: those without compile)")
    parser.add_argument("--repeats", type=int, default=5, help="rounds: one timed call of every variant each")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls of each variant first")
    parser.add_argument("--eval-model", default="small_cnn")
    parser.add_argument("--eval-n", type=int, default=100, help="images of the evaluation batch")
    parser.add_argument("--apgd-iter", type=int, default=100, help="APGD-CE iterations (standard AutoAttack: 100)")
    parser.add_argument("--pgd-steps", type=int, default=40)
    parser.add_argument("--skip-above", type=float, default=3.0,
                        help="do not time a variant whose probe takes this many times fp32's CPU time")
    args = parser.parse_args()
    if args.quick:
        args.models, args.eval_n, args.apgd_iter, args.repeats = ["small_cnn"], 64, 25, 3
        args.variants = args.variants or [v for v in VARIANTS if "compile" not in v]
    args.variants = args.variants or VARIANTS
    variants = [Variant.parse(v) for v in args.variants]
    print(hardware())
    print(f"# batch {args.batch}, TRADES with a {args.attack_steps}-step attack; evaluation {args.eval_n} images, "
          f"APGD-CE {args.apgd_iter} iterations, PGD-{args.pgd_steps}; eps 8/255")
    if "train" in args.parts:
        for name in args.models:
            torch.manual_seed(0)
            probes = {v.name: probe(models.build(name), v) for v in variants if not v.compile}
            works = {v.name: (v, train_work(name, v, args.batch, args.attack_steps)) for v in variants}
            compare(f"## training step: {name}, batch {args.batch}, {args.attack_steps}-step TRADES attack",
                    works, probes, args)
    if "eval" in args.parts:
        torch.manual_seed(0)
        model = models.build(args.eval_model)
        probes = {v.name: probe(model, v) for v in variants if not v.compile}
        per_variant = {v.name: eval_works(model, v, args.eval_n, args.apgd_iter, args.pgd_steps) for v in variants}
        for attack in next(iter(per_variant.values())):
            compare(f"## evaluation: {attack} of {args.eval_model}, {args.eval_n} images",
                    {v.name: (v, per_variant[v.name][attack]) for v in variants}, probes, args)
    print(f"\n# load average at the end {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
