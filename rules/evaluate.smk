rule evaluate:
    message:
        "clean, PGD and AutoAttack accuracy of run {wildcards.run} under {wildcards.threat}"
    input:
        model=evaluated_model,
        test=f"{DATA}/test.h5",
    output:
        result="results/evaluate/{run}/{threat}.json",
        examples="results/evaluate/{run}/{threat}.h5",
    params:
        cfg=stage_params("evaluate"),
        params_file=PARAMS_FILE,
        workdir="work/evaluate/{run}/{threat}",  # AutoAttack resume state: not an output
    log:
        "logs/evaluate/{run}/{threat}.log",
    benchmark:
        "benchmarks/evaluate/{run}/{threat}.tsv"
    threads: 4
    resources:
        gpu=1,
    conda:
        "../envs/pipeline.yaml"
    shell:
        THREADS + "python -m pipeline.evaluate"
        " --params {params.params_file}"
        " --model {input.model}"
        " --test {input.test}"
        " --threat {wildcards.threat}"
        " --workdir {params.workdir}"
        " --out {output.result}"
        " --out-examples {output.examples}"
        " 2> {log}"


rule evaluate_latent:
    message:
        "clean, corrupted and latent-attack accuracy of run {wildcards.run} under the learned {wildcards.learned} set"
    input:
        model=evaluated_model,
        cvae="models/generators/{learned}/model.pt",
        test=f"{DATA}/test.h5",
    output:
        result="results/evaluate/{run}/{learned}.json",
        examples="results/evaluate/{run}/{learned}.h5",
    params:
        cfg=stage_params("evaluate_latent"),
        params_file=PARAMS_FILE,
    log:
        "logs/evaluate/{run}/{learned}.log",
    benchmark:
        "benchmarks/evaluate/{run}/{learned}.tsv"
    threads: 4
    resources:
        gpu=1,
    conda:
        "../envs/pipeline.yaml"
    shell:
        THREADS + "python -m pipeline.evaluate_latent"
        " --params {params.params_file}"
        " --model {input.model}"
        " --cvae {input.cvae}"
        " --test {input.test}"
        " --out {output.result}"
        " --out-examples {output.examples}"
        " 2> {log}"
