# robustgen: CIFAR-10 / CIFAR-100 / SVHN -> generated data -> robust training -> results/{dataset}_table.csv
# The rules are generated from the stage table of pipeline/dag.py (rules/stages.smk, as dvc.yaml is); their
# helpers are in rules/common.smk, the logic in pipeline/ (python -m pipeline.<stage>).
# The one configuration is params.yaml (switch scale with `python -m pipeline.params use paper`).
from snakemake.utils import min_version

from pipeline import snakemake_lock

min_version("8.0")
# A lock left by a controller that died hard (SIGKILL, OOM) is removed when its owner is gone, or
# explained in one line (pipeline/snakemake_lock.py, docs/faults.md); jobs skip this.
snakemake_lock.guard(workflow)


configfile: "params.yaml"


include: "rules/common.smk"
include: "rules/stages.smk"  # generated from pipeline/dag.py's stage table


rule all:
    input:
        final_targets(),
    localrule: True
