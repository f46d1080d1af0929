rule pseudolabel:
    message:
        "teacher labels for shard {wildcards.shard} of {wildcards.generator}"
    input:
        teacher="models/teacher/model.pt",
        shard="data/generated/{generator}/shard-{shard}.h5",
    output:
        labels="data/pseudolabels/{generator}/shard-{shard}.h5",
    params:
        cfg=stage_params("pseudolabel"),
        params_file=PARAMS_FILE,
    log:
        "logs/pseudolabel/{generator}/shard-{shard}.log",
    threads: 2
    resources:
        gpu=1,
    conda:
        "../envs/pipeline.yaml"
    shell:
        THREADS + "python -m pipeline.pseudolabel"
        " --params {params.params_file}"
        " --teacher {input.teacher}"
        " --shard {input.shard}"
        " --out {output.labels}"
        " 2> {log}"
