"""Cut the shipped demo archive out of the full CIFAR-10 python archive (official layout kept).

    python tools/make_demo_subset.py cifar-10-python.tar.gz data/demo/cifar-10-demo-python.tar.gz

Keeps the first 400 images of each training batch (2,000 train) and the first 500 test images, real
pixels and labels in official order, written deterministically (fixed mtimes, owners, gzip header).
"""

import gzip
import io
import pickle
import sys
import tarfile

TRAIN_PER_BATCH, TEST = 400, 500


def main(src: str, dst: str) -> None:
    members: dict[str, bytes] = {}
    with tarfile.open(src, "r:gz") as tar:
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]:
            raw = tar.extractfile(f"cifar-10-batches-py/{name}").read()
            if name != "batches.meta":
                batch = pickle.loads(raw, encoding="latin1")
                keep = TEST if name == "test_batch" else TRAIN_PER_BATCH
                batch = {"batch_label": batch["batch_label"], "labels": batch["labels"][:keep],
                         "data": batch["data"][:keep], "filenames": batch["filenames"][:keep]}
                raw = pickle.dumps(batch, protocol=2)
            members[name] = raw
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name in sorted(members):
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size, info.mtime, info.mode = len(members[name]), 1244073600, 0o644
            tar.addfile(info, io.BytesIO(members[name]))
    with open(dst, "wb") as out, gzip.GzipFile(fileobj=out, mode="wb", mtime=0, compresslevel=9) as gz:
        gz.write(buffer.getvalue())


if __name__ == "__main__":
    main(*sys.argv[1:])
