rule teacher:
    message:
        "train the non-robust teacher that pseudo-labels generated images"
    input:
        train=f"{DATA}/train.h5",
        test=f"{DATA}/test.h5",
    output:
        model="models/teacher/model.pt",
        metrics="results/teacher/metrics.json",
    params:
        cfg=stage_params("teacher"),
        params_file=PARAMS_FILE,
        workdir="work/teacher",
    log:
        "logs/teacher.log",
    benchmark:
        "benchmarks/teacher.tsv"
    threads: 4
    resources:
        gpu=1,
    conda:
        "../envs/pipeline.yaml"
    shell:
        THREADS + "python -m pipeline.teacher"
        " --params {params.params_file}"
        " --train {input.train}"
        " --test {input.test}"
        " --workdir {params.workdir}"
        " --out-model {output.model}"
        " --out-metrics {output.metrics}"
        " 2> {log}"
