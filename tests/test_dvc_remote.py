"""Sharing a run through a DVC remote, as between cluster nodes or colleagues (docs/cluster.md).

A full test-scale `dvc repro` in a temp git repo is pushed to a local directory remote; a `git clone`
elsewhere pulls byte-identical artifacts, finds nothing to rerun, and rerunning after a change of one
param (evaluate.n_eval) runs only the stages that depend on it.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from tests.helpers import BIN, run

pytestmark = pytest.mark.slow

DVC = str(BIN / "dvc")
RAN = re.compile(r"Running stage '([^']+)'")
# stages whose params/deps include the `evaluate` section or its outputs (dvc.yaml)
EVALUATE_DEPENDENTS = re.compile(r"^(check_params|evaluate(_chunk|_latent)?(_baseline)?(_variant)?@.*|table)$")


def git(*args: str, cwd: Path) -> None:
    run(["git", "-c", "user.email=ci@example.com", "-c", "user.name=ci", *args], cwd)


def dvc_outputs(repo: Path) -> list[Path]:
    """Every file DVC records as a stage output in dvc.lock (directory outputs expanded)."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    files = []
    for stage in lock["stages"].values():
        for out in stage.get("outs", []):
            path = repo / out["path"]
            files.extend(sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path])
    return [p.relative_to(repo) for p in files]


@pytest.fixture(scope="module")
def pushed(dvc_repo, dvc_remote) -> tuple[Path, Path]:
    """(origin repo after a full `dvc repro` + commit (conftest's dvc_repo), then `dvc push`, remote)."""
    run([DVC, "push"], dvc_repo)
    return dvc_repo, dvc_remote


@pytest.fixture(scope="module")
def clone(pushed, tmp_path_factory) -> Path:
    origin, _ = pushed
    path = tmp_path_factory.mktemp("node2") / "repo"
    git("clone", "-q", str(origin), str(path), cwd=origin.parent)
    run([DVC, "pull"], path)
    return path


def test_push_then_pull_gives_byte_identical_artifacts(pushed, clone):
    origin, remote = pushed
    assert any(remote.rglob("*")), "dvc push wrote nothing to the remote"
    outputs = dvc_outputs(origin)
    assert any(str(p).startswith("data/generated/") for p in outputs)  # shard directories are versioned
    assert any(str(p).startswith("models/robust/") for p in outputs)
    assert dvc_outputs(clone) == outputs
    for relative in outputs:
        assert (clone / relative).read_bytes() == (origin / relative).read_bytes(), f"{relative} differs"


def test_pulled_clone_is_up_to_date(clone):
    status = run([DVC, "status"], clone)
    assert "up to date" in status.stdout.lower(), status.stdout
    repro = run([DVC, "repro"], clone)
    assert not RAN.findall(repro.stdout), f"dvc repro reran stages after a pull:\n{repro.stdout}"


def test_one_param_change_reruns_only_its_dependents(clone):
    params = yaml.safe_load((clone / "params.yaml").read_text())
    params["evaluate"]["n_eval"] = params["evaluate"]["n_eval"] // 2
    (clone / "params.yaml").write_text(yaml.safe_dump(params))
    repro = run([DVC, "repro"], clone)
    ran = set(RAN.findall(repro.stdout))
    assert any(stage.startswith("evaluate") for stage in ran) and "table" in ran, repro.stdout
    assert all(EVALUATE_DEPENDENTS.match(stage) for stage in ran), f"unrelated stages reran: {sorted(ran)}"
    assert "Stage 'teacher' didn't change, skipping" in repro.stdout
    assert run([DVC, "status"], clone).stdout.lower().count("up to date") == 1
