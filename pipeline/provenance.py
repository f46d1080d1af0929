"""Where a result came from: the commit of the code that made it and the checksum of its params.

The table stamps every row with both; the effect study's kept results record them, so two collections
from different params never mix.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any


def params_sha256(cfg: dict[str, Any]) -> str:
    """The sha256 of validated params, independent of the file's formatting and key order."""
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def git_commit(where: Path = Path(".")) -> str:
    """HEAD of the git work tree around `where`, '-dirty' if tracked files changed; '' outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True,
                              timeout=30)
        if head.returncode:
            return ""
        return head.stdout.strip() + ("-dirty" if changed_files(where) else "")
    except (OSError, subprocess.SubprocessError):
        return ""


def changed_files(where: Path = Path(".")) -> list[str]:
    """The tracked files that differ from HEAD (params.yaml and dvc.yaml after `params use`)."""
    done = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where, capture_output=True,
                          text=True, timeout=30)
    return sorted(line[3:] for line in done.stdout.splitlines() if line.strip())
