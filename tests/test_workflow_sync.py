"""Snakefile and dvc.yaml describe the same DAG: same stage modules, same outputs, same params.

Granularity may differ (Snakemake has one job per shard, DVC one stage per generator writing the shard
directory), so a Snakemake output counts as matched when it equals a DVC output or lies inside one.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from pipeline import params as P

from tests.test_workflow import BIN, env, make_workdir

MODULE = re.compile(r"python -m (pipeline\.\w+(?: grid| summary)?)")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """The test-scale params with every optional part of the DAG switched on: every generator (but
    import, which needs a file), the learned cvae threat (evaluated, and trained in by the latent_at
    variant) and the variants of tests/params.yaml."""
    path = make_workdir(tmp_path_factory.mktemp("sync"))
    cfg = yaml.safe_load((path / "params.yaml").read_text())
    cfg["generate"]["generators"] = ["gaussian", "ddpm", "cvae"]
    cfg["evaluate"]["learned_threats"] = ["cvae"]
    cfg["variants"]["names"] = [*cfg["variants"]["names"], "latent_at"]   # runs trained in the cvae set
    (path / "params.yaml").write_text(yaml.safe_dump(P.validate(cfg)))
    subprocess.run(["git", "init", "-q"], cwd=path, check=True)
    subprocess.run([str(BIN / "dvc"), "init", "-q"], cwd=path, check=True, env=env())
    return path


def snakemake_jobs(workdir: Path) -> tuple[set[str], set[str]]:
    """(stage modules, output files) of the full Snakemake DAG from a dry run."""
    result = subprocess.run([str(BIN / "snakemake"), "-n", "-p", "--forceall", "results/cifar10_table.csv"],
                            cwd=workdir, env=env(), capture_output=True, text=True, check=True)
    modules = set(MODULE.findall(result.stdout))
    summary = subprocess.run([str(BIN / "snakemake"), "--summary", "results/cifar10_table.csv"],
                             cwd=workdir, env=env(), capture_output=True, text=True, check=True)
    outputs = {line.split("\t")[0] for line in summary.stdout.splitlines()[1:] if line.strip()}
    return modules, outputs


def dvc_stages(workdir: Path) -> tuple[set[str], set[str], dict[str, set[str]]]:
    """(stage modules, outputs, params sections per module) of dvc.yaml, templating resolved."""
    from dvc.repo import Repo

    modules, outputs, params = set(), set(), {}
    with Repo(str(workdir)) as repo:
        for stage in repo.index.stages:
            if stage.cmd and (match := MODULE.search(stage.cmd)):
                modules.add(match.group(1))
                # a stage may track part of a section (evaluate.n_eval, train_generator.gaussian)
                sections = {key.split(".")[0] for dep in stage.deps if hasattr(dep, "params")
                            for key in (dep.params or [])}
                params.setdefault(match.group(1), set()).update(sections)
            for out in stage.outs:
                outputs.add(str(Path(out.fs_path).relative_to(workdir)))
    return modules, outputs, params


def test_same_stage_modules(workdir):
    snake_modules, _ = snakemake_jobs(workdir)
    dvc_modules, _, _ = dvc_stages(workdir)
    assert dvc_modules - {"pipeline.params"} == snake_modules


def test_same_outputs(workdir):
    _, snake_outputs = snakemake_jobs(workdir)
    _, dvc_outputs, _ = dvc_stages(workdir)
    dvc_outputs.discard("work/params.ok")  # DVC's parse-time validation stamp (Snakemake validates in-process)

    def covered(path: str, by: set[str]) -> bool:
        return any(path == other or path.startswith(other.rstrip("/") + "/") for other in by)

    assert sorted(p for p in snake_outputs if not covered(p, dvc_outputs)) == []
    assert sorted(p for p in dvc_outputs if not any(s == p or s.startswith(p + "/") for s in snake_outputs)) == []


def test_same_params_sections(workdir):
    _, _, dvc_params = dvc_stages(workdir)
    rule_files = sorted((Path(__file__).parent.parent / "rules").glob("*.smk"))
    blocks = [block for path in rule_files for block in re.split(r"^rule ", path.read_text(), flags=re.M)[1:]]
    snake_params: dict[str, set[str]] = {}
    for block in blocks:
        module = MODULE.search(block)
        sections = re.search(r"section\(([^)]*)\)", block)
        if module and sections:
            names = {s.strip().strip('"') for s in sections.group(1).split(",")}
            snake_params.setdefault(module.group(1), set()).update(names)
    # DVC's one threat_model stage writes every run's file, so it also tracks the axes listing the runs
    dvc_params["pipeline.threat_model"] -= {"generate", "variants"}
    for module, sections in snake_params.items():
        assert dvc_params.get(module) == sections, module
