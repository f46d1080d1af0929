"""The sha256 of every output of a workflow run, one `path sha256` line each, sorted.

    python tools/output_hashes.py WORKDIR > hashes.txt

Run the same DAG with two versions of the code and diff the lists: a change that must not change results
(a refactor of the rules, of a stage's flags) leaves them equal. Logs, benchmarks, Snakemake's and DVC's
own state and the resume workdirs are not outputs.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

OUTPUTS = ("data", "models", "results")


def hashes(workdir: Path) -> list[str]:
    lines = []
    for top in OUTPUTS:
        for path in sorted((workdir / top).rglob("*")):
            if path.is_file():
                lines.append(f"{path.relative_to(workdir)} {hashlib.sha256(path.read_bytes()).hexdigest()}")
    return lines


if __name__ == "__main__":
    print("\n".join(hashes(Path(sys.argv[1]))))
