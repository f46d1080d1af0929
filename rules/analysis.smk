rule analysis:
    message:
        "complementarity, coverage and quality (FID, leakage) of {wildcards.generator} against train and test"
    input:
        train=f"{DATA}/train.h5",
        test=f"{DATA}/test.h5",
        teacher="models/teacher/model.pt",
        shards=generated_shards,
        labels=expand("data/pseudolabels/{{generator}}/shard-{shard}.h5", shard=SHARDS),
    output:
        result="results/analysis/{generator}.json",
        figure="results/figures/quality_{generator}.png",
    params:
        cfg=stage_params("analysis"),
        params_file=PARAMS_FILE,
    log:
        "logs/analysis/{generator}.log",
    threads: 2
    conda:
        "../envs/pipeline.yaml"
    shell:
        THREADS + "python -m pipeline.analysis"
        " --params {params.params_file}"
        " --generator {wildcards.generator}"
        " --train {input.train}"
        " --test {input.test}"
        " --teacher {input.teacher}"
        " --shards {input.shards}"
        " --labels {input.labels}"
        " --out {output.result}"
        " --out-figure {output.figure}"
        " 2> {log}"


rule analysis_mixup:
    message:
        "complementarity, coverage and quality of the mixup baseline (the paper's reference row)"
    input:
        train=f"{DATA}/train.h5",
        test=f"{DATA}/test.h5",
        teacher="models/teacher/model.pt",
    output:
        result="results/analysis/mixup.json",
        figure="results/figures/quality_mixup.png",
    params:
        cfg=stage_params("analysis_mixup"),
        params_file=PARAMS_FILE,
    log:
        "logs/analysis/mixup.log",
    threads: 2
    conda:
        "../envs/pipeline.yaml"
    shell:
        THREADS + "python -m pipeline.analysis"
        " --params {params.params_file}"
        " --generator mixup"
        " --train {input.train}"
        " --test {input.test}"
        " --teacher {input.teacher}"
        " --out {output.result}"
        " --out-figure {output.figure}"
        " 2> {log}"


rule analysis_summary:
    input:
        results=expand("results/analysis/{generator}.json", generator=[*GENERATORS, "mixup"]),
    output:
        csv="results/complementarity.csv",
        figure="results/figures/complementarity.png",
    log:
        "logs/analysis/summary.log",
    conda:
        "../envs/pipeline.yaml"
    shell:
        THREADS + "python -m pipeline.analysis summary"
        " --inputs {input.results}"
        " --out-csv {output.csv}"
        " --out-figure {output.figure}"
        " 2> {log}"
