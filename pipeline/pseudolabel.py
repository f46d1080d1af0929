"""Stage `pseudolabel`: the teacher's labels for every generated shard, in a sidecar file per shard.

    python -m pipeline.pseudolabel --params params.yaml --teacher models/teacher/model.pt \
        --shards data/generated/{g}/shard-{i:05d}.h5 --out-dir data/pseudolabels/{g}   # Snakemake: one shard
    python -m pipeline.pseudolabel --params params.yaml --teacher models/teacher/model.pt \
        --shards data/generated/{g} --out-dir data/pseudolabels/{g}      # DVC: every shard, same bytes

Labels live beside the images, never inside them, so a new teacher does not invalidate the DVC-tracked
images. A sidecar (shards.write_arrays) holds `label` (int64, the label training and select use),
`confidence` (float32, the teacher's probability of `label`) and, with `save_probs`, `probs` (float32
N x classes). Its attributes name the shard file and its content sha256 and the teacher file's sha256, so
`pipeline.labels.load_labels` (what the training loader reads sidecars with) can refuse a sidecar that
does not belong to a shard. Shards whose images carry a conditioning label (label >= 0, e.g. a
class-conditional generator or an imported labelled set) also record the agreement between that label
and the teacher's.

`label_source` chooses `label`: `teacher` (default; Gowal et al. pseudo-label every generated image) is
the teacher's argmax, so `confidence` is its max softmax; `generator` keeps a shard's own label where it
is known (>= 0) and takes the teacher's elsewhere, as DM-Improves-AT trains on class-conditional EDM
samples with their conditioning class (wzekai99/DM-Improves-AT, commit b390f25, edm/select_1M.py line 85;
edm/combine_data.py line 31), its teacher only scoring each image by the probability of that class (line
77), which is what `confidence` then holds and select ranks by. A `generator` sidecar also keeps the
teacher's own prediction (`teacher_label`, `teacher_confidence`: argmax and max softmax) and says
`label_source: generator` in its attributes; a `teacher` sidecar is written exactly as before the option.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import models
from pipeline import params as params_mod
from pipeline.config import PseudolabelConfig
from pipeline.inference import predict
from pipeline.shards import ShardError, expand, file_sha256, read_attrs, read_imageset, write_arrays

log = logging.getLogger("pipeline.pseudolabel")


def label_arrays(probs: np.ndarray, save_probs: bool, conditioning: np.ndarray | None = None
                 ) -> dict[str, np.ndarray]:
    """The sidecar's arrays; with `conditioning` (label_source generator) its known labels are `label`."""
    teacher = probs.argmax(1).astype(np.int64)
    arrays = {"label": teacher, "confidence": probs.max(1).astype(np.float32)}
    if conditioning is not None:
        label = np.where(conditioning >= 0, conditioning, teacher).astype(np.int64)
        arrays = {"label": label, "confidence": probs[np.arange(len(label)), label].astype(np.float32),
                  "teacher_label": teacher, "teacher_confidence": arrays["confidence"]}
    if save_probs:
        arrays["probs"] = probs.astype(np.float32)
    return arrays


def agreement(conditioning: np.ndarray, teacher: np.ndarray) -> tuple[int, float | None]:
    """(number of rows with a known label, share of them where the teacher agrees) (None if none known)."""
    known = conditioning >= 0
    if not known.any():
        return 0, None
    return int(known.sum()), float((conditioning[known] == teacher[known]).mean())


def label_shard(model: torch.nn.Module, shard: Path, out: Path, cfg: PseudolabelConfig,
                device: torch.device, teacher_sha256: str, teacher_name: str) -> dict[str, Any]:
    """Pseudo-label one shard (checksum verified) and write its sidecar atomically; return its attrs."""
    images, labels = read_imageset(shard, verify=True)
    shard_attrs = read_attrs(shard)
    probs = predict(model, images, cfg.batch_size, device, desc=f"pseudolabel {shard.name}")
    if cfg.label_source == "generator" and len(labels) and labels.max() >= probs.shape[1]:
        raise ShardError(f"{shard}: label {labels.max()} outside the teacher's {probs.shape[1]} classes "
                         "(pseudolabel.label_source: generator)")
    arrays = label_arrays(probs, cfg.save_probs, labels if cfg.label_source == "generator" else None)
    n_known, agree = agreement(labels, probs.argmax(1))
    # Only names and hashes, never absolute paths: both CLI forms must write the same bytes.
    attrs: dict[str, Any] = {
        "shard": shard.name, "shard_sha256": shard_attrs["sha256"], "n": len(images),
        "teacher_sha256": teacher_sha256, "teacher_model": teacher_name,
        "n_known_labels": n_known, "mean_confidence": float(arrays["confidence"].mean()) if len(images) else 0.0,
    }
    if agree is not None:
        attrs["label_agreement"] = agree
    if cfg.label_source == "generator":
        attrs["label_source"] = "generator"
    write_arrays(out, arrays, attrs)
    log.info("%s: %d images, mean confidence %.3f%s", out, len(images), attrs["mean_confidence"],
             f", agreement with conditioning labels {agree:.3f}" if agree is not None else "")
    return attrs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.pseudolabel", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--teacher", type=Path, required=True, help="teacher model.pt")
    parser.add_argument("--shard", type=Path, help="one shard, labelled into --out")
    parser.add_argument("--out", type=Path, help="its sidecar")
    parser.add_argument("--shards", type=Path, nargs="+",
                        help="shard files or folders of shard-*.h5 (Snakemake: its job's shard; DVC: the folder)")
    parser.add_argument("--out-dir", type=Path, help="sidecars with the shards' file names")
    args = parser.parse_args(argv)
    if bool(args.shard) == bool(args.shards) or bool(args.shard) != bool(args.out) \
            or bool(args.shards) != bool(args.out_dir):
        parser.error("give either --shard with --out, or --shards with --out-dir")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg_all = params_mod.load(args.params)
    cfg = params_mod.section(PseudolabelConfig, cfg_all["pseudolabel"])
    device = models.resolve_device(cfg_all["base"]["device"])
    model = models.load_checkpoint(args.teacher, device)
    teacher_sha = file_sha256(args.teacher)
    teacher_name = torch.load(args.teacher, map_location="cpu", weights_only=False)["model"]
    if args.shard:
        jobs = [(args.shard, args.out)]
    else:
        shards = expand(args.shards)
        if not shards:
            raise SystemExit(f"error: {' '.join(map(str, args.shards))}: no shard-*.h5 files")
        jobs = [(shard, args.out_dir / shard.name) for shard in shards]
    try:
        for shard, out in jobs:
            label_shard(model, shard, out, cfg, device, teacher_sha, teacher_name)
    except ShardError as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()
