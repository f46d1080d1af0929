# The evaluation of one (run, threat) as ceil(evaluate.n_eval / chunk_size) AutoAttack jobs, one per chunk
# (on N GPUs the chunks finish in 1/N of the time), one eps-sweep job, and a local merge that writes the
# same JSON and per-example HDF5 as a one-process `python -m pipeline.evaluate` (pipeline/evaluate.py).
rule evaluate_chunk:
    message:
        "clean, PGD and AutoAttack results of run {wildcards.run} under {wildcards.threat}, chunk {wildcards.chunk}"
    input:
        model=evaluated_model,
        test=f"{DATA}/test.h5",
    output:
        "results/evaluate/{run}/{threat}/chunks/chunk-{chunk}.h5",
    params:
        cfg=stage_params("evaluate_chunk"),
        params_file=PARAMS_FILE,
        workdir="work/evaluate/{run}/{threat}",  # resume state (finished chunks, AutoAttack's): not an output
        out_dir="results/evaluate/{run}/{threat}/chunks",
    log:
        "logs/evaluate/{run}/{threat}/chunk-{chunk}.log",
    benchmark:
        "benchmarks/evaluate/{run}/{threat}/chunk-{chunk}.tsv"
    threads: 4
    resources:
        gpu=1,
    conda:
        "../envs/pipeline.yaml"
    shell:
        THREADS + "python -m pipeline.evaluate chunk"
        " --params {params.params_file}"
        " --run {wildcards.run}"
        " --model {input.model}"
        " --test {input.test}"
        " --threat {wildcards.threat}"
        " --chunk {wildcards.chunk}"
        " --workdir {params.workdir}"
        " --out-dir {params.out_dir}"
        " 2> {log}"


rule evaluate_sweep:
    message:
        "eps sweep (PGD at multiples of eps) of run {wildcards.run} under {wildcards.threat}"
    input:
        model=evaluated_model,
        test=f"{DATA}/test.h5",
    output:
        "results/evaluate/{run}/{threat}/sweep.h5",
    params:
        cfg=stage_params("evaluate_sweep"),
        params_file=PARAMS_FILE,
    log:
        "logs/evaluate/{run}/{threat}/sweep.log",
    benchmark:
        "benchmarks/evaluate/{run}/{threat}/sweep.tsv"
    threads: 4
    resources:
        gpu=1,
    conda:
        "../envs/pipeline.yaml"
    shell:
        THREADS + "python -m pipeline.evaluate sweep"
        " --params {params.params_file}"
        " --run {wildcards.run}"
        " --model {input.model}"
        " --test {input.test}"
        " --threat {wildcards.threat}"
        " --out {output}"
        " 2> {log}"


rule evaluate:
    message:
        "merge the evaluation chunks of run {wildcards.run} under {wildcards.threat}"
    input:
        model=evaluated_model,
        test=f"{DATA}/test.h5",
        chunks=evaluate_chunks,
        sweep="results/evaluate/{run}/{threat}/sweep.h5",
    output:
        result="results/evaluate/{run}/{threat}.json",
        examples="results/evaluate/{run}/{threat}.h5",
    params:
        cfg=stage_params("evaluate"),
        params_file=PARAMS_FILE,
        chunk_dir="results/evaluate/{run}/{threat}/chunks",
    log:
        "logs/evaluate/{run}/{threat}.log",
    benchmark:
        "benchmarks/evaluate/{run}/{threat}.tsv"
    threads: 1
    conda:
        "../envs/pipeline.yaml"
    shell:
        THREADS + "python -m pipeline.evaluate merge"
        " --params {params.params_file}"
        " --run {wildcards.run}"
        " --model {input.model}"
        " --test {input.test}"
        " --threat {wildcards.threat}"
        " --chunk-dir {params.chunk_dir}"
        " --sweep {input.sweep}"
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
        " --run {wildcards.run}"
        " --model {input.model}"
        " --cvae {input.cvae}"
        " --test {input.test}"
        " --out {output.result}"
        " --out-examples {output.examples}"
        " 2> {log}"
