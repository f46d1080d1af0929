"""Does a faster CPU setting of train_robust change what it learns? Short TRADES runs, per seed and setting.

    python bench/bench_cpu_accuracy.py --archive /tmp/cifar/cifar-10-python.tar.gz --settings fp32 \\
        --seeds 0 1 2 --out /tmp/acc.jsonl          # one process per setting, run side by side
    python bench/bench_cpu_accuracy.py --archive ... --settings channels_last --seeds 0 1 2 --out /tmp/acc.jsonl
    python bench/bench_cpu_accuracy.py --report /tmp/acc.jsonl

Each run is pipeline.train_robust.train_robust itself (the real-data baseline run: TRADES beta 6, a
5-step attack, batch 128, EMA, params.yaml's `train_robust` section) on the first `--n-train` CIFAR-10
training images for `--steps` steps (one epoch, no warm-up; validation once, on `--n-val` further
training images), with `autocast` and `memory_format` set by the setting (fp32, channels_last, bf16,
bf16+channels_last) and `--seed` as base.seed. The last EMA model is then evaluated the same way for every
setting, in float32 contiguous: clean and PGD-`--pgd-steps` (pipeline.attacks.robust_accuracy, eps 8/255)
accuracy on the first `--n-test` test images. Every run appends one JSON line to `--out` (accuracies,
per-example correctness, CPU and wall seconds). `--report` prints, per setting, the accuracies per seed
and their mean and spread, and per seed the difference to fp32 and the per-example agreement.
Never used in tests.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline import attacks, data, params  # noqa: E402
from pipeline import train_robust as tr  # noqa: E402
from pipeline.inference import to_float  # noqa: E402
from pipeline.shards import write_imageset  # noqa: E402

SETTINGS = {"fp32": ("fp32", "contiguous"), "channels_last": ("fp32", "channels_last"),
            "bf16": ("bf16", "contiguous"), "bf16+channels_last": ("bf16", "channels_last")}


def config(setting: str, steps: int, batch: int) -> tr.TrainRobustConfig:
    """params.yaml's train_robust section: one epoch of `steps` steps, no warm-up, the setting's precision."""
    cfg = params.section(tr.TrainRobustConfig, params.load(ROOT / "params.yaml")["train_robust"])
    autocast, memory_format = SETTINGS[setting]
    return dataclasses.replace(cfg, epochs=1, epoch_size=steps * batch, batch_size=batch, warmup_epochs=0,
                               checkpoint_every=steps, num_workers=0, autocast=autocast,
                               memory_format=memory_format)


def one_run(args: argparse.Namespace, setting: str, seed: int, arrays: tuple[np.ndarray, ...]) -> dict:
    train_x, train_y, test_x, test_y = arrays
    cfg = config(setting, args.steps, args.batch)
    with tempfile.TemporaryDirectory() as tmp:
        train, val = Path(tmp) / "train.h5", Path(tmp) / "val.h5"
        write_imageset(train, train_x[:args.n_train], train_y[:args.n_train])
        write_imageset(val, train_x[args.n_train:args.n_train + args.n_val],
                       train_y[args.n_train:args.n_train + args.n_val])
        cpu, wall = time.process_time(), time.perf_counter()
        result = tr.train_robust(cfg, seed, "cpu", "baseline", train, val, [], [], Path(tmp) / "work",
                                 progress=False)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    model = result.ema_model.to(memory_format=torch.contiguous_format).eval()
    x = to_float(test_x[:args.n_test], layout="NHWC")
    y = torch.from_numpy(test_y[:args.n_test].astype(np.int64))
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).numpy()
    _, robust = attacks.robust_accuracy(model, x, y, "linf", 8 / 255, args.pgd_steps, 250, seed=0)
    return {"setting": setting, "seed": seed, "steps": args.steps, "batch": args.batch, "n_train": args.n_train,
            "n_test": args.n_test, "pgd_steps": args.pgd_steps, "clean": float(clean.mean()),
            "robust": float(robust.float().mean()), "clean_correct": clean.astype(int).tolist(),
            "robust_correct": robust.numpy().astype(int).tolist(), "train_cpu_s": cpu, "train_wall_s": wall,
            "val_robust_acc": result.metrics.val_robust_acc_last, "train_loss": result.metrics.train_loss}


def report(path: Path) -> None:
    runs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    by = {(r["setting"], r["seed"]): r for r in runs}
    first = runs[0]
    print(f"# {first['steps']} steps of batch {first['batch']} on {first['n_train']} CIFAR-10 training images; "
          f"clean and PGD-{first['pgd_steps']} (eps 8/255) accuracy of the last EMA model on the first "
          f"{first['n_test']} test images, in %\n")
    print("| setting | seeds | clean per seed | clean mean (sd) | PGD per seed | PGD mean (sd) "
          "| train CPU s per run (median) |")
    print("|---|---|---|---|---|---|---|")
    for setting in sorted({r["setting"] for r in runs}, key=list(SETTINGS).index):   # fp32 first
        rows = sorted((r for r in runs if r["setting"] == setting), key=lambda r: r["seed"])
        clean = [100 * r["clean"] for r in rows]
        robust = [100 * r["robust"] for r in rows]
        sd = (lambda v: f"{statistics.stdev(v):.1f}" if len(v) > 1 else "-")
        print(f"| {setting} | {','.join(str(r['seed']) for r in rows)} | {' / '.join(f'{v:.1f}' for v in clean)} "
              f"| {statistics.mean(clean):.1f} ({sd(clean)}) | {' / '.join(f'{v:.1f}' for v in robust)} "
              f"| {statistics.mean(robust):.1f} ({sd(robust)}) "
              f"| {statistics.median(r['train_cpu_s'] for r in rows):.0f} |")
    print("\nPaired with fp32 on the same seed: accuracy difference (points) and per-example agreement\n")
    print("| setting | seed | clean diff | PGD diff | clean agreement | PGD agreement |")
    print("|---|---|---|---|---|---|")
    for (setting, seed), run in sorted(by.items()):
        base = by.get(("fp32", seed))
        if setting == "fp32" or base is None:
            continue
        agree = {key: float(np.mean(np.array(run[key]) == np.array(base[key])))
                 for key in ("clean_correct", "robust_correct")}
        print(f"| {setting} | {seed} | {100 * (run['clean'] - base['clean']):+.1f} | "
              f"{100 * (run['robust'] - base['robust']):+.1f} | {100 * agree['clean_correct']:.1f}% | "
              f"{100 * agree['robust_correct']:.1f}% |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archive", type=Path, help="CIFAR-10 python archive (cifar-10-python.tar.gz)")
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=["fp32", "channels_last"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--n-train", type=int, default=4000)
    parser.add_argument("--n-val", type=int, default=200)
    parser.add_argument("--n-test", type=int, default=500)
    parser.add_argument("--pgd-steps", type=int, default=20)
    parser.add_argument("--out", type=Path, help="JSON lines, appended")
    parser.add_argument("--report", type=Path, help="print the tables of a --out file and exit")
    args = parser.parse_args()
    if args.report:
        report(args.report)
        return
    if not (args.archive and args.out):
        raise SystemExit("error: --archive and --out are required (or --report FILE)")
    logging.basicConfig(level=logging.WARNING)
    arrays = data.read_batches(args.archive)
    print(f"# {os.getloadavg()[0]:.2f} load; torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    for seed in args.seeds:
        for setting in args.settings:
            run = one_run(args, setting, seed, arrays)
            with args.out.open("a") as out:
                out.write(json.dumps(run) + "\n")
            print(f"{setting} seed {seed}: clean {run['clean']:.3f}, PGD-{args.pgd_steps} {run['robust']:.3f}, "
                  f"train {run['train_cpu_s']:.0f} CPU s / {run['train_wall_s']:.0f} wall s", flush=True)


if __name__ == "__main__":
    main()
