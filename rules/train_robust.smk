rule threat_model:
    message:
        "which threat run {wildcards.run} trains under (a norm ball, or the learned set's model)"
    input:
        learned=run_learned_threat_model,
    output:
        "models/threat/{run}.json",
    params:
        cfg=stage_params("threat_model"),
        params_file=PARAMS_FILE,
    log:
        "logs/threat_model/{run}.log",
    conda:
        "../envs/pipeline.yaml"
    shell:
        THREADS + "python -m pipeline.threat_model"
        " --params {params.params_file}"
        " --run {wildcards.run}"
        " --generators-dir models/generators"
        " --out-dir models/threat"
        " 2> {log}"


rule train_robust:
    message:
        "adversarial training of run {wildcards.run} on real + generated batches"
    input:
        train=f"{DATA}/train.h5",
        val=f"{DATA}/val.h5",
        threat="models/threat/{run}.json",
        generated=run_shards,
        labels=run_labels,
        selection=run_selection,
    output:
        model="models/robust/{run}/last.pt",
        best="models/robust/{run}/best.pt",
        metrics="results/train_robust/{run}/metrics.json",
        curve="results/train_robust/{run}/curve.csv",
    params:
        cfg=stage_params("train_robust"),
        params_file=PARAMS_FILE,
        generated=lambda wildcards, input: flag_list("--generated", input.generated),
        labels=lambda wildcards, input: flag_list("--labels", input.labels),
        selection=lambda wildcards, input: flag_list("--selection", input.selection),
        workdir="work/train_robust/{run}",  # resumable checkpoints: not an output
        launcher=lambda wildcards, resources, threads: launcher(resources, threads),
    log:
        "logs/train_robust/{run}.log",
    benchmark:
        "benchmarks/train_robust/{run}.tsv"
    threads: 4
    resources:
        gpu=1,
    conda:
        "../envs/pipeline.yaml"
    shell:
        "{params.launcher}"
        " --params {params.params_file}"
        " --run {wildcards.run}"
        " --train {input.train}"
        " --val {input.val}"
        " --threat-model {input.threat}"
        " {params.generated}"
        " {params.labels}"
        " {params.selection}"
        " --workdir {params.workdir}"
        " --out-model {output.model}"
        " --out-best {output.best}"
        " --out-metrics {output.metrics}"
        " --out-curve {output.curve}"
        " 2> {log}"
