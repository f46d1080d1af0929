"""Stage `teacher`: a standard (non-robust) classifier that pseudo-labels generated images.

    python -m pipeline.teacher --params params.yaml --train data/cifar10/train.h5 \
        --test data/cifar10/test.h5 --workdir work/teacher \
        --out-model models/teacher/model.pt --out-metrics results/teacher/metrics.json

Crop (zero pad 4) + flip augmentation (pipeline/augment.py, as robust training), SGD with cosine decay
(pipeline/optim.py), as for the paper's WRN-28-10 teacher (about 96% test accuracy at full scale). The
test accuracy it writes is the paper's first sufficient condition (accurate pseudo-labels).

Checkpoints go to --workdir every `checkpoint_every` epochs and, on SIGTERM (a scheduler's time limit),
after the step in flight (exit status 143): the checkpoint rule every training loop shares
(preemption.checkpoint_after_step), counted in global steps. Running the same command again resumes
from the newest one and gives the same model as an uninterrupted run (every epoch's order and
augmentation come from its own seeded generator, whose state is saved mid-epoch, with model, optimiser
and schedule state). A NaN/inf loss stops the run with the last good checkpoint kept.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline import checkpoint, datasets, models, optim, seeding
from pipeline import params as params_mod
from pipeline.augment import random_crop_flip
from pipeline.config import TeacherConfig
from pipeline.inference import accuracy, to_float
from pipeline.preemption import NonFiniteLoss, SigtermFlag, checkpoint_after_step
from pipeline.shards import atomic_path, read_attrs, read_imageset

log = logging.getLogger("pipeline.teacher")


@dataclass
class TeacherState:
    """Everything a teacher checkpoint holds, and where in the current epoch training is."""
    model: models.Classifier
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    train_loss: list[float] = field(default_factory=list)   # mean loss of each finished epoch
    epoch: int = 0                   # epochs finished
    step_in_epoch: int = 0           # steps of the next epoch done
    loss_sum: float = 0.0            # sum of loss x batch size over those steps
    seen: int = 0                    # images in those steps
    generator: torch.Generator | None = None        # the epoch's order generator (saved mid-epoch)
    resume_generator: torch.Tensor | None = None    # its saved state, restored when the epoch restarts


def _start(cfg: TeacherConfig, seed: int, total_steps: int, workdir: Path, device: torch.device,
           num_classes: int, identity: dict[str, Any]) -> TeacherState:
    """A freshly initialised model, optimiser and schedule, or the newest checkpoint's."""
    torch.manual_seed(seeding.derive(seed, "teacher", "init"))
    model = models.build(cfg.model, num_classes).to(device)
    optimizer = optim.sgd(model, cfg.lr, cfg.momentum, cfg.weight_decay, cfg.nesterov)
    state = TeacherState(model, optimizer, optim.scheduler(optimizer, total_steps, warmup_steps=0))
    saved = checkpoint.latest(workdir, map_location=device, identity=identity)
    if saved is None:
        return state
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    state.schedule.load_state_dict(saved["scheduler"])
    checkpoint.set_rng_state(saved["rng"])
    state.train_loss, state.epoch = list(saved["train_loss"]), saved["epoch"]
    if saved.get("step_in_epoch"):  # saved on SIGTERM in the middle of an epoch
        state.step_in_epoch = saved["step_in_epoch"]
        state.loss_sum, state.seen = saved["epoch_totals"]
        state.resume_generator = saved["generator"]
    log.info("resumed at epoch %d step %d of %d epochs", state.epoch, state.step_in_epoch, cfg.epochs)
    return state


def _save(state: TeacherState, workdir: Path, identity: dict[str, Any], done: int) -> None:
    """Checkpoint `done` global steps: `epoch` epochs finished plus `step_in_epoch` steps of the next,
    with the epoch's generator and partial sums when that is not zero (a SIGTERM mid-epoch)."""
    extra = {"generator": state.generator.get_state(), "epoch_totals": (state.loss_sum, state.seen)} \
        if state.step_in_epoch and state.generator is not None else {}
    checkpoint.save(workdir, done, {
        "identity": identity, "epoch": state.epoch, "step_in_epoch": state.step_in_epoch,
        "model": state.model.state_dict(), "optimizer": state.optimizer.state_dict(),
        "scheduler": state.schedule.state_dict(), "rng": checkpoint.rng_state(), "train_loss": state.train_loss,
        **extra})


def _step(seed: int, state: TeacherState, x_uint8: np.ndarray, y: torch.Tensor, step: int,
          device: torch.device, workdir: Path) -> float:
    """One SGD step on a batch; returns its loss. Crops and flips are a function of (seed, epoch, step),
    so a resumed epoch draws the same ones."""
    x = to_float(random_crop_flip(x_uint8, seeding.numpy_rng(seed, "teacher", "augment", state.epoch, step)), device)
    loss = F.cross_entropy(state.model(x), y.to(device))
    if not torch.isfinite(loss).item():
        raise NonFiniteLoss(
            f"teacher: loss is {loss.item()} at epoch {state.epoch + 1} step {step} (lr "
            f"{state.schedule.get_last_lr()[0]:.4g}); stopped without saving, the last good checkpoint in "
            f"{workdir} is kept. Lower teacher.lr or check the data.")
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    state.optimizer.step()
    state.schedule.step()
    return loss.item()


def _train_epoch(cfg: TeacherConfig, seed: int, train: tuple[np.ndarray, np.ndarray], state: TeacherState,
                 steps_per_epoch: int, device: torch.device, workdir: Path, received: Callable[[], bool],
                 save: Callable[[int], None]) -> None:
    """The rest of epoch `state.epoch`, under the shared checkpoint rule after every step (global steps:
    periodic checkpoints every `checkpoint_every` epochs fall on epoch ends)."""
    train_x, labels = train[0], torch.as_tensor(train[1], dtype=torch.long)
    batch = min(cfg.batch_size, len(train_x))
    # One generator per epoch: order and augmentation of epoch e never depend on earlier epochs.
    state.generator = seeding.torch_generator(seed, "teacher", "epoch", state.epoch)
    order = torch.randperm(len(train_x), generator=state.generator)
    if state.resume_generator is not None:  # continue the interrupted epoch where it stopped
        state.generator.set_state(state.resume_generator)
        state.resume_generator = None
    state.model.train()
    bar = tqdm(total=steps_per_epoch * batch, initial=state.step_in_epoch * batch, leave=False, unit="img",
               desc=f"teacher epoch {state.epoch + 1}/{cfg.epochs}")
    for step in range(state.step_in_epoch, steps_per_epoch):
        idx = order[step * batch:(step + 1) * batch]
        loss = _step(seed, state, train_x[idx.numpy()], labels[idx], step, device, workdir)
        state.step_in_epoch, state.loss_sum, state.seen = step + 1, state.loss_sum + loss * len(idx), \
            state.seen + len(idx)
        bar.update(len(idx))
        bar.set_postfix(loss=f"{state.loss_sum / state.seen:.3f}", refresh=False)
        if step + 1 == steps_per_epoch:
            bar.close()
            state.train_loss.append(state.loss_sum / state.seen)
            log.info("epoch %d/%d: train loss %.4f", state.epoch + 1, cfg.epochs, state.train_loss[-1])
            state.epoch, state.step_in_epoch, state.loss_sum, state.seen = state.epoch + 1, 0, 0.0, 0
        checkpoint_after_step(received(), state.epoch * steps_per_epoch + state.step_in_epoch,
                              cfg.epochs * steps_per_epoch, cfg.checkpoint_every * steps_per_epoch, save, workdir,
                              bar)


def train_teacher(cfg: TeacherConfig, seed: int, train: tuple[np.ndarray, np.ndarray],
                  test: tuple[np.ndarray, np.ndarray], workdir: Path, device: torch.device,
                  num_classes: int = 10, data_ids: dict[str, str] | None = None
                  ) -> tuple[models.Classifier, dict[str, Any]]:
    """Train (resuming from --workdir if a checkpoint is there); return the model and its metrics."""
    n = len(train[0])
    steps_per_epoch = n // cfg.batch_size if n > cfg.batch_size else 1
    total_steps = steps_per_epoch * cfg.epochs
    identity = {"config": dataclasses.asdict(cfg), "seed": seed, "data": data_ids or {}, "n_train": n}
    state = _start(cfg, seed, total_steps, workdir, device, num_classes, identity)
    with SigtermFlag() as sigterm:
        while state.epoch < cfg.epochs:
            _train_epoch(cfg, seed, train, state, steps_per_epoch, device, workdir, lambda: sigterm.received,
                         lambda done: _save(state, workdir, identity, done))
    test_x, test_y = test
    test_acc = accuracy(state.model, test_x, test_y, 500, device)
    log.info("test accuracy %.4f on %d images", test_acc, len(test_x))
    metrics = {"test_acc": test_acc, "train_loss": state.train_loss, "epochs": cfg.epochs,
               "steps": total_steps, "n_train": n, "n_test": len(test_x), "model": cfg.model,
               "seed": seed, "config": dataclasses.asdict(cfg), "data": data_ids or {}}
    return state.model.eval(), metrics


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
