# robustgen: CIFAR-10 / CIFAR-100 / SVHN -> generated data -> robust training -> results/{dataset}_table.csv
# Table of contents only: rules live in rules/*.smk, logic in pipeline/ (python -m pipeline.<stage>).
# The one configuration is params.yaml (switch scale with `python -m pipeline.params use paper`).
from snakemake.utils import min_version

min_version("8.0")


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


rule all:
    input:
        final_targets(),
