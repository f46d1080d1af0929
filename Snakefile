# robustgen: CIFAR-10 / CIFAR-100 / SVHN -> generated data -> robust training -> results/{dataset}_table.csv
# Table of contents only: rules live in rules/*.smk, logic in pipeline/ (python -m pipeline.<stage>).
# The one configuration is params.yaml (switch scale with `python -m pipeline.params use paper`).
from snakemake.utils import min_version

from pipeline import snakemake_lock

min_version("8.0")
# A lock left by a controller that died hard (SIGKILL, OOM) is removed when its owner is gone, or
# explained in one line (pipeline/snakemake_lock.py, docs/faults.md); jobs skip this.
snakemake_lock.guard(workflow)


configfile: "params.yaml"


include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/generate.smk"
include: "rules/teacher.smk"
include: "rules/pseudolabel.smk"
include: "rules/select.smk"
include: "rules/analysis.smk"
include: "rules/train_robust.smk"
include: "rules/evaluate.smk"
include: "rules/table.smk"


localrules:
    all,
    sample_grid,
    analysis_summary,
    threat_model,
    table,
    evaluate,  # the merge of one (run, threat)'s AutoAttack chunks: seconds, no GPU


rule all:
    input:
        final_targets(),
