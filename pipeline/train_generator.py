"""Stage `train_generator`: fit a Gaussian, train a DDPM or EDM, or validate an imported set or the
unlabelled pool (oracle, unlabelled.h5 beside --train) -> model.pt.

    python -m pipeline.train_generator --params params.yaml --generator ddpm \
        --train data/cifar10/train.h5 --workdir work/train_generator/ddpm \
        --out models/generators/ddpm/model.pt
    torchrun --nproc_per_node 8 -m pipeline.train_generator -- --generator edm ...   # data-parallel, same flags

Reads `base:` and `train_generator.<generator>:`. Generators see the training split only (never val
or test). The DDPM and EDM resume from the newest checkpoint in --workdir (not an output: rerunning the
same command continues a killed run; on SIGTERM they checkpoint first, then exit 143) and train
data-parallel when torchrun starts several ranks (the same global batches, so the same model up to float
rounding; generators/diffusion_training.py); gaussian, import and oracle finish in one pass and leave the work dir
empty (under torchrun rank 0 does that work alone).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pipeline import distributed, generators
from pipeline import params as params_mod
from pipeline.models import resolve_device
from pipeline.preemption import NonFiniteLoss
from pipeline.shards import ShardError

log = logging.getLogger("pipeline.train_generator")
DATA_PARALLEL = {"ddpm", "edm"}   # generators whose training runs on every torchrun rank


def train_generator(name: str, section: dict, train: Path | None, workdir: Path, out: Path, seed: int,
                    device_name: str) -> None:
    """Build the generator's config from its params section and run its `train`."""
    module = generators.get(name)
    cfg = params_mod.section(module.Config, section[name])
    if train is None and name != "import":
        raise SystemExit(f"error: --train is required for generator {name}")
    if name not in DATA_PARALLEL and distributed.world_size() > 1:
        if distributed.rank() != 0:
            return
        log.warning("%s trains in one process: ranks other than 0 are idle", name)
    module.train(cfg, train, Path(workdir), Path(out), seed, resolve_device(device_name))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.train_generator", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--generator", required=True, choices=sorted(generators.GENERATORS))
    parser.add_argument("--train", type=Path, help="training set (HDF5); unused by import")
    parser.add_argument("--workdir", type=Path, required=True, help="resumable checkpoints (not an output)")
    parser.add_argument("--out", type=Path, required=True, help="model.pt to write")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        cfg = params_mod.load(args.params)
        train_generator(args.generator, cfg["train_generator"], args.train, args.workdir, args.out,
                        cfg["base"]["seed"], cfg["base"]["device"])
    except (ValueError, generators.imported.SourceError, ShardError, NonFiniteLoss) as error:  # ParamsError too
        raise SystemExit(f"error: {error}") from None
    distributed.finish()
    if distributed.rank() == 0:
        log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
