"""Every job Snakemake plans for a target, one JSON line each, sorted: rule, wildcards, inputs, outputs,
params, shell command (whitespace folded), threads, GPUs, log, benchmark, local or not, priority.

    python tools/dag_jobs.py WORKDIR [TARGET] > jobs.jsonl

Two workflows whose dumps are equal run the same commands on the same files with the same params, so
their outputs are byte-identical: the check for a change of the rules that must not change results
(diff the dumps of the same workdir before and after).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from snakemake.api import DAGSettings, OutputSettings, ResourceSettings, SnakemakeApi
from snakemake.settings.enums import Quietness


def jobs(workdir: Path, target: str) -> list[str]:
    with SnakemakeApi(OutputSettings(quiet={Quietness.ALL})) as api:
        workflow_api = api.workflow(resource_settings=ResourceSettings(cores=4), snakefile=workdir / "Snakefile",
                                    workdir=workdir)
        workflow_api.dag(DAGSettings(targets={target}, forceall=True)).execute_workflow(
            executor="local", pseudo_executor="dryrun")
        workflow = workflow_api._workflow   # the planned DAG has no public accessor
        return sorted(json.dumps({
            "rule": job.rule.name, "wildcards": dict(job.wildcards_dict),
            "input": sorted(map(str, job.input)), "output": sorted(map(str, job.output)),
            "params": job.params.get("cfg"), "threads": job.threads, "gpu": job.resources.get("gpu", 0),
            "log": list(map(str, job.log)), "benchmark": str(job.benchmark) if job.benchmark else None,
            "shell": " ".join(job.format_wildcards(job.rule.shellcmd).split()) if job.rule.shellcmd else None,
            "local": workflow.is_local(job.rule), "priority": job.priority,
        }, sort_keys=True, default=str) for job in workflow.dag.jobs)


if __name__ == "__main__":
    print("\n".join(jobs(Path(sys.argv[1]).resolve(), sys.argv[2] if len(sys.argv) > 2 else "all")))
