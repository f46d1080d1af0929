"""The test-scale DAG (one generator, no variants) through a real single-node SLURM cluster (cluster/start-slurm.sh).

Not a mock: slurmctld + slurmd + munged on localhost with two fake gres GPUs, so every `gpu: 1` request
in profiles/slurm is really scheduled. Checks the table appears, that jobs went through sbatch, and
that a sampling job killed with scancel is retried with the final table equal to a local run's.
Skipped (with the reason) where SLURM is not installed or we are not root; CI installs it (.ci/run).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers import BIN, REPO, env, make_workdir, read_table

CLUSTER = REPO / "cluster"
TABLE = "results/cifar10_table.csv"
HARD_TIMEOUT_S = 1500  # a hung SLURM-executor run ignores SIGTERM: always wrap in timeout -k
MEASURED = ["clean_acc", "autoattack_acc", "teacher_acc", "n_generated", "model", "eps"]
SLURM_GENERATOR = "gaussian"


def _missing() -> str | None:
    for binary in ("sbatch", "squeue", "scancel", "slurmctld", "slurmd", "munged"):
        if not (shutil.which(binary) or Path("/usr/sbin", binary).exists()):
            return (f"SLURM is not installed ({binary} not found): "
                    "apt-get install --no-install-recommends slurmctld slurmd slurm-client munge")
    if os.geteuid() != 0:
        return "starting a SLURM cluster needs root (slurmd, munged, /etc/slurm)"
    return None


pytestmark = [pytest.mark.slow, pytest.mark.skipif(_missing() is not None, reason=str(_missing()))]


@pytest.fixture(scope="module")
def cluster():
    """A fresh cluster for this module, stopped at teardown whatever happened."""
    try:
        started = subprocess.run([str(CLUSTER / "start-slurm.sh")], capture_output=True, text=True,
                                 timeout=180)
        if started.returncode != 0:
            pytest.fail(f"cluster/start-slurm.sh failed:\n{started.stdout}\n{started.stderr}")
        yield started.stdout
    finally:
        subprocess.run([str(CLUSTER / "stop-slurm.sh")], capture_output=True, timeout=120)


def ci_profile(workdir: Path) -> Path:
    """profiles/slurm with only its sizes scaled to a 2-CPU test node: the options under test stay."""
    profile = yaml.safe_load((REPO / "profiles" / "slurm" / "config.yaml").read_text())
    profile.update({"jobs": 4, "latency-wait": 5, "slurm-init-seconds-before-status-checks": 2})
    small = {"cpus_per_task": 1, "mem_mb": 1000, "runtime": 15}
    profile["default-resources"] = {**profile["default-resources"], **small}
    for resources in profile["set-resources"].values():
        resources.update({k: v for k, v in small.items() if k in resources})
    path = workdir / "profiles" / "slurm-ci" / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(profile))
    return path.parent


def squeue() -> list[tuple[str, str, str]]:
    """(job id, state, comment) of every job SLURM knows; the plugin puts the rule name in the comment."""
    out = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%i|%T|%k"], capture_output=True, text=True)
    return [tuple(line.split("|", 2)) for line in out.stdout.splitlines() if line.count("|") == 2]


@pytest.fixture(scope="module")
def slurm_run(cluster, tmp_path_factory):
    """Run the DAG on SLURM; scancel the first sampling job once it runs. -> (workdir, log, killed id)."""
    workdir = make_workdir(tmp_path_factory.mktemp("slurm"))
    # The SLURM mechanics need one generator and no variants: a quarter of the test DAG's jobs. Jobs do not
    # depend on the DAG's axes, so its rows and shards equal the local run's (test_result_equals_a_local_run).
    params = yaml.safe_load((workdir / "params.yaml").read_text())
    params["generate"]["generators"], params["variants"]["names"] = [SLURM_GENERATOR], []
    (workdir / "params.yaml").write_text(yaml.safe_dump(params))
    profile = ci_profile(workdir)
    args = ["timeout", "-k", "30", str(HARD_TIMEOUT_S), str(BIN / "snakemake"), "--profile", str(profile),
            "--workflow-profile", "none", TABLE]
    log_path = workdir / "snakemake-slurm.log"
    killed = None
    started = time.monotonic()
    with open(log_path, "w") as log:
        process = subprocess.Popen(args, cwd=workdir, env=env(), stdout=log, stderr=subprocess.STDOUT)
        try:
            while process.poll() is None:
                if killed is None:
                    for job_id, state, comment in squeue():
                        if comment.startswith("rule_generate") and state == "RUNNING":
                            subprocess.run(["scancel", job_id], check=True)
                            killed = job_id
                            break
                time.sleep(0.2)
        finally:
            if process.poll() is None:
                process.kill()
    elapsed = time.monotonic() - started
    text = log_path.read_text()
    print(f"snakemake on SLURM: {elapsed:.0f} s, rc={process.returncode}, killed job {killed}")
    if process.returncode != 0:
        pytest.fail(f"snakemake on SLURM failed (rc={process.returncode}):\n{text[-6000:]}")
    return workdir, text, killed


def slurm_jobs_by_rule() -> dict[str, set[str]]:
    """SLURM's own record (squeue keeps finished jobs for MinJobAge=3600 s, longer than a test run): rule -> job ids."""
    jobs: dict[str, set[str]] = {}
    for job_id, _, comment in squeue():
        rule = re.match(r"rule_(.+?)(?:_wildcards_.*)?$", comment)
        if rule:
            jobs.setdefault(rule.group(1), set()).add(job_id)
    return jobs


def test_dag_runs_through_sbatch(slurm_run):
    workdir, log, _ = slurm_run
    assert (workdir / TABLE).exists()
    submitted = re.findall(r"submitted with SLURM jobid (\d+)", log) + \
        re.findall(r"Submitted array job with Snakemake IDs [\d,]+ and SLURM job ID (\d+)", log)
    assert submitted, "no job went through sbatch"
    jobs = slurm_jobs_by_rule()
    # GPU rules went to SLURM with their rule name; cheap rules stayed local (`localrules`)
    for rule in ("data", "train_generator", "generate", "teacher", "pseudolabel", "train_robust", "evaluate_chunk",
                 "evaluate_sweep"):
        assert rule in jobs, f"{rule} was not submitted: {jobs}"
    assert not {"table", "sample_grid", "analysis_summary", "evaluate"} & set(jobs)
    known = {job.split("_")[0] for ids in jobs.values() for job in ids}
    assert set(submitted) <= known, f"ids in the Snakemake log unknown to SLURM: {set(submitted) - known}"
    slurm_logs = {p.stem for p in (workdir / ".snakemake" / "slurm_logs").rglob("*.log")}
    assert any(name.split("_")[0] in known for name in slurm_logs), "no per-job log in .snakemake/slurm_logs"


def test_gpu_rules_got_a_gres_gpu():
    """The fake GPUs were really requested and allocated for the GPU rules, not for `data`."""
    out = subprocess.run(["scontrol", "show", "job", "-o"], capture_output=True, text=True).stdout
    lines = {rule: [line for line in out.splitlines() if f"Comment=rule_{rule}" in line]
             for rule in ("train_robust", "evaluate_chunk", "data")}
    assert lines["train_robust"] and lines["evaluate_chunk"], out[-2000:]
    for line in lines["train_robust"] + lines["evaluate_chunk"]:
        assert "gres:gpu:1" in line or "gres/gpu=1" in line, line
    assert all("gpu" not in line.split("TresPerJob=")[-1][:20] for line in lines["data"] if "TresPerJob=" in line)


def test_scancelled_sampling_job_is_retried(slurm_run):
    _, log, killed = slurm_run
    assert killed is not None, "no sampling job was seen running, nothing was cancelled"
    assert f"SLURM-job '{killed}' failed" in log, log[-4000:]
    generate = slurm_jobs_by_rule()["generate"]
    assert killed in generate
    assert len({job.split("_")[0] for job in generate}) >= 2, f"sampling not resubmitted: {generate}"


def test_result_equals_a_local_run(slurm_run, snakemake_run):
    workdir, _, _ = slurm_run
    local = snakemake_run
    key = lambda row: (row["run"], row["threat"])
    ours = sorted(read_table(workdir / TABLE), key=key)
    theirs = sorted((row for row in read_table(local / TABLE) if row["run"] in ("baseline", SLURM_GENERATOR)),
                    key=key)
    assert len(ours) == len(theirs) > 0
    assert [[row[c] for c in MEASURED] for row in ours] == [[row[c] for c in MEASURED] for row in theirs]
    for shard in sorted((local / "data" / "generated" / SLURM_GENERATOR).glob("shard-*.h5")):
        relative = shard.relative_to(local)
        assert (workdir / relative).read_bytes() == shard.read_bytes(), f"{relative} differs"
