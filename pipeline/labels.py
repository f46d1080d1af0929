"""Reading pseudo-label sidecars: the teacher's labels of one generated shard, checked against it.

`pipeline.pseudolabel` writes a sidecar per shard (shards.write_arrays): `label` (int64, the label to
train on: the teacher's argmax, or with `pseudolabel.label_source: generator` the shard's own class where
known), `confidence` (float32, the teacher's probability of `label`), optionally `probs`, and with
label_source generator the teacher's own `teacher_label` and `teacher_confidence`; its attributes name the
shard file, its content sha256 and the teacher's sha256. Sidecars written before label_source existed
read the same (their `label` is the teacher's). The training loader and the tests read sidecars here, so no
module has to import the pseudolabel stage to use its output.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.shards import ShardError, count, read_arrays, read_attrs

UNLABELLED = -1  # label of images whose class only the teacher decides (ddpm, oracle; edm stores its class)


def load_labels(shard_path: Path, sidecar_path: Path, teacher_sha256: str | None = None) -> dict[str, np.ndarray]:
    """The sidecar's arrays, after checking it was made for exactly this shard (and this teacher).

    Raises ShardError naming both files when the sidecar belongs to another shard, another version of
    it, or has a different number of rows.
    """
    shard_path, sidecar_path = Path(shard_path), Path(sidecar_path)
    arrays = read_arrays(sidecar_path, verify=True)
    side = read_attrs(sidecar_path)
    shard_sha, n = read_attrs(shard_path).get("sha256"), count(shard_path)
    if side.get("shard_sha256") != shard_sha:
        raise ShardError(f"{sidecar_path}: pseudo-labels were made for shard {side.get('shard')!r} with sha256 "
                         f"{str(side.get('shard_sha256'))[:12]}, but {shard_path} has sha256 {str(shard_sha)[:12]}: "
                         "sidecar and shard do not match (rerun pseudolabel for this shard)")
    if "label" not in arrays or len(arrays["label"]) != n:
        raise ShardError(f"{sidecar_path}: {len(arrays.get('label', []))} labels for {n} images in {shard_path}")
    if teacher_sha256 is not None and side.get("teacher_sha256") != teacher_sha256:
        raise ShardError(f"{sidecar_path}: made by another teacher than expected for {shard_path} "
                         f"(sha256 {str(side.get('teacher_sha256'))[:12]} != {teacher_sha256[:12]})")
    return arrays
