"""Stage `teacher`: a standard (non-robust) classifier that pseudo-labels generated images.

    python -m pipeline.teacher --params params.yaml --train data/cifar10/train.h5 \
        --test data/cifar10/test.h5 --workdir work/teacher \
        --out-model models/teacher/model.pt --out-metrics results/teacher/metrics.json

Crop (zero pad 4) + flip augmentation (pipeline/augment.py, as robust training), SGD with cosine decay
(pipeline/optim.py), as for the paper's WRN-28-10 teacher (about 96% test accuracy at full scale). The test accuracy it writes is the paper's
first sufficient condition (accurate pseudo-labels). Checkpoints go to --workdir every
`checkpoint_every` epochs and, on SIGTERM (a scheduler's time limit), after the step in flight (exit
status 143). Running the same command again resumes from the newest one and gives the
same model as an uninterrupted run (every epoch's order and augmentation come from its own seeded
generator, whose state is saved mid-epoch, with model, optimiser and schedule state). A NaN/inf loss
stops the run with the last good checkpoint kept.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline import checkpoint, datasets, models, optim, seeding
from pipeline import params as params_mod
from pipeline.augment import random_crop_flip
from pipeline.classifier_training import accuracy, to_float
from pipeline.preemption import SIGTERM_EXIT, NonFiniteLoss, Preempted, SigtermFlag
from pipeline.shards import atomic_path, read_attrs, read_imageset

log = logging.getLogger("pipeline.teacher")


@dataclass(frozen=True)
class TeacherConfig:
    """Mirror of params.yaml `teacher:`; every field is required (no second defaults)."""
    model: str              # architecture from pipeline.models.MODELS (paper: wrn-28-10)
    epochs: int             # passes over the training set
    batch_size: int         # images per SGD step (the last incomplete batch of an epoch is dropped)
    lr: float               # peak SGD learning rate at this batch size, cosine-decayed per step to 0
    momentum: float         # SGD momentum
    nesterov: bool          # Nesterov momentum
    weight_decay: float     # on conv/linear weights only (not batch norm, not biases)
    checkpoint_every: int   # epochs between resumable checkpoints in --workdir

    def __post_init__(self) -> None:
        if self.model not in models.MODELS:
            raise ValueError(f"teacher.model: unknown {self.model!r}; known: {sorted(models.MODELS)}")
        if self.epochs < 1 or self.batch_size < 2 or self.checkpoint_every < 1:
            raise ValueError("teacher.epochs, teacher.checkpoint_every >= 1 and teacher.batch_size >= 2")
        if self.lr <= 0 or self.weight_decay < 0 or not 0 <= self.momentum < 1:
            raise ValueError("teacher.lr > 0, teacher.weight_decay >= 0, 0 <= teacher.momentum < 1")


def train_teacher(cfg: TeacherConfig, seed: int, train: tuple[np.ndarray, np.ndarray],
                  test: tuple[np.ndarray, np.ndarray], workdir: Path, device: torch.device,
                  num_classes: int = 10, data_ids: dict[str, str] | None = None
                  ) -> tuple[models.Classifier, dict[str, Any]]:
    """Train (resuming from --workdir if a checkpoint is there); return the model and its metrics."""
    train_x, train_y = train
    n = len(train_x)
    steps_per_epoch = n // cfg.batch_size if n > cfg.batch_size else 1
    batch = min(cfg.batch_size, n)
    total_steps = steps_per_epoch * cfg.epochs
    identity = {"config": dataclasses.asdict(cfg), "seed": seed, "data": data_ids or {}, "n_train": n}

    torch.manual_seed(seeding.derive(seed, "teacher", "init"))
    model = models.build(cfg.model, num_classes).to(device)
    opt = optim.sgd(model, cfg.lr, cfg.momentum, cfg.weight_decay, cfg.nesterov)
    sched = optim.scheduler(opt, total_steps, warmup_steps=0)
    train_loss: list[float] = []
    start_epoch = 0

    resume_step, resume_totals, resume_generator = 0, (0.0, 0), None
    state = checkpoint.latest(workdir, map_location=device, identity=identity)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        checkpoint.set_rng_state(state["rng"])
        train_loss = list(state["train_loss"])
        start_epoch = state["epoch"]
        if state.get("step_in_epoch"):  # saved on SIGTERM in the middle of an epoch
            resume_step, resume_totals = state["step_in_epoch"], tuple(state["epoch_totals"])
            resume_generator = state["generator"]
        log.info("resumed at epoch %d step %d of %d epochs", start_epoch, resume_step, cfg.epochs)

    def save(epoch: int, step_in_epoch: int = 0, generator: torch.Generator | None = None,
             totals: tuple[float, int] = (0.0, 0)) -> None:
        """`epoch` epochs finished plus `step_in_epoch` steps of the next (SIGTERM checkpoints only)."""
        extra = {"generator": generator.get_state(), "epoch_totals": totals} if step_in_epoch else {}
        checkpoint.save(workdir, epoch * steps_per_epoch + step_in_epoch, {
            "identity": identity, "epoch": epoch, "step_in_epoch": step_in_epoch, "model": model.state_dict(),
            "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "rng": checkpoint.rng_state(), "train_loss": train_loss, **extra})

    labels = torch.as_tensor(train_y, dtype=torch.long)
    with SigtermFlag() as sigterm:
        for epoch in range(start_epoch, cfg.epochs):
            # One generator per epoch: order and augmentation of epoch e never depend on earlier epochs.
            generator = seeding.torch_generator(seed, "teacher", "epoch", epoch)
            order = torch.randperm(n, generator=generator)
            first, (total, seen) = 0, (0.0, 0)
            if resume_generator is not None:  # continue the interrupted epoch where it stopped
                generator.set_state(resume_generator)
                first, (total, seen), resume_generator = resume_step, resume_totals, None
            model.train()
            bar = tqdm(total=steps_per_epoch * batch, initial=first * batch, leave=False, unit="img",
                       desc=f"teacher epoch {epoch + 1}/{cfg.epochs}")
            for step in range(first, steps_per_epoch):
                idx = order[step * batch:(step + 1) * batch]
                # crops and flips are a function of (seed, epoch, step): a resumed epoch draws the same
                x = to_float(random_crop_flip(train_x[idx.numpy()],
                                              seeding.numpy_rng(seed, "teacher", "augment", epoch, step)), device)
                y = labels[idx].to(device)
                loss = F.cross_entropy(model(x), y)
                if not torch.isfinite(loss).item():
                    raise NonFiniteLoss(
                        f"teacher: loss is {loss.item()} at epoch {epoch + 1} step {step} (lr "
                        f"{sched.get_last_lr()[0]:.4g}); stopped without saving, the last good checkpoint in "
                        f"{workdir} is kept. Lower teacher.lr or check the data.")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += loss.item() * len(idx)
                seen += len(idx)
                bar.update(len(idx))
                bar.set_postfix(loss=f"{total / seen:.3f}", refresh=False)
                if sigterm.received and step + 1 < steps_per_epoch:
                    save(epoch, step + 1, generator, (total, seen))
                    bar.close()
                    log.warning("SIGTERM: checkpoint at epoch %d step %d in %s; rerun the same command to "
                                "resume", epoch + 1, step + 1, workdir)
                    raise Preempted(SIGTERM_EXIT)
            bar.close()
            train_loss.append(total / seen)
            log.info("epoch %d/%d: train loss %.4f", epoch + 1, cfg.epochs, train_loss[-1])
            done = epoch + 1
            if done % cfg.checkpoint_every == 0 or done == cfg.epochs or sigterm.received:
                save(done)
            if sigterm.received and done < cfg.epochs:
                log.warning("SIGTERM: checkpoint after epoch %d in %s; rerun the same command to resume",
                            done, workdir)
                raise Preempted(SIGTERM_EXIT)

    test_x, test_y = test
    test_acc = accuracy(model, test_x, test_y, 500, device)
    log.info("test accuracy %.4f on %d images", test_acc, len(test_x))
    metrics = {"test_acc": test_acc, "train_loss": train_loss, "epochs": cfg.epochs,
               "steps": total_steps, "n_train": n, "n_test": len(test_x), "model": cfg.model,
               "seed": seed, "config": dataclasses.asdict(cfg), "data": data_ids or {}}
    return model.eval(), metrics


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.teacher", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--train", type=Path, required=True, help="training image set (HDF5)")
    parser.add_argument("--test", type=Path, required=True, help="test image set (HDF5)")
    parser.add_argument("--workdir", type=Path, required=True, help="resumable checkpoints (not an output)")
    parser.add_argument("--out-model", type=Path, required=True)
    parser.add_argument("--out-metrics", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg_all = params_mod.load(args.params)
    cfg = params_mod.section(TeacherConfig, cfg_all["teacher"])
    base = cfg_all["base"]
    device = models.resolve_device(base["device"])
    train, test = read_imageset(args.train), read_imageset(args.test)
    data_ids = {"train_sha256": read_attrs(args.train)["sha256"], "test_sha256": read_attrs(args.test)["sha256"]}
    try:
        model, metrics = train_teacher(cfg, base["seed"], train, test, args.workdir, device,
                                       datasets.num_classes(base["dataset"]), data_ids)
    except (NonFiniteLoss, ValueError) as error:  # divergence or a foreign work dir: one clear line
        sys.exit(f"error: {error}")
    models.save_checkpoint(args.out_model, model, cfg.model, datasets.num_classes(base["dataset"]),
                           {"stage": "teacher", "config": dataclasses.asdict(cfg), "seed": base["seed"],
                            "test_acc": metrics["test_acc"], "data": data_ids})
    with atomic_path(args.out_metrics) as tmp:
        tmp.write_text(json.dumps(metrics, indent=2) + "\n")
    log.info("wrote %s and %s", args.out_model, args.out_metrics)


if __name__ == "__main__":
    main()
