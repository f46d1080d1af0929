rule select:
    message:
        "the paper's filter on {wildcards.generator}: class balance by pseudo-label, most confident first"
    input:
        labels=lambda wildcards: expand(
            "data/pseudolabels/{generator}/shard-{shard}.h5", generator=wildcards.generator, shard=SHARDS
        ),
    output:
        index="data/selection/{generator}/index.npy",
    params:
        cfg=stage_params("select"),
        params_file=PARAMS_FILE,
    log:
        "logs/select/{generator}.log",
    conda:
        "../envs/pipeline.yaml"
    shell:
        THREADS + "python -m pipeline.select"
        " --params {params.params_file}"
        " --labels-dir data/pseudolabels/{wildcards.generator}"
        " --out {output.index}"
        " 2> {log}"
