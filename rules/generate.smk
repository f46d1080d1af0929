rule train_generator:
    message:
        "fit / train generator {wildcards.generator} on the training set only"
    input:
        train=f"{DATA}/train.h5",
        unlabelled=f"{DATA}/unlabelled.h5",  # the oracle's pool, beside --train (as dvc.yaml: pipeline/dag.py)
        source=import_source,
        pretrained=pretrained_source,
    output:
        model="models/generators/{generator}/model.pt",
    params:
        cfg=stage_params("train_generator"),
        params_file=PARAMS_FILE,
        workdir="work/train_generator/{generator}",  # resumable checkpoints: not an output
        # torchrun over the job's GPUs when it has more than one (data-parallel ddpm / edm; the others
        # train on rank 0 alone)
        launcher=lambda wildcards, resources, threads: launcher(resources, threads, "train_generator"),
    log:
        "logs/train_generator/{generator}.log",
    benchmark:
        "benchmarks/train_generator/{generator}.tsv"
    threads: 4
    resources:
        gpu=1,
    conda:
        "../envs/pipeline.yaml"
    shell:
        "{params.launcher}"
        " --params {params.params_file}"
        " --generator {wildcards.generator}"
        " --train {input.train}"
        " --workdir {params.workdir}"
        " --out {output.model}"
        " 2> {log}"


rule generate:
    message:
        "sample shard {wildcards.shard} of {wildcards.generator}"
    input:
        model="models/generators/{generator}/model.pt",
    output:
        shard="data/generated/{generator}/shard-{shard}.h5",
    params:
        cfg=stage_params("generate"),
        params_file=PARAMS_FILE,
        index=lambda wildcards: int(wildcards.shard),
    log:
        "logs/generate/{generator}/shard-{shard}.log",
    threads: 2
    resources:
        gpu=1,
    conda:
        "../envs/pipeline.yaml"
    shell:
        THREADS + "python -m pipeline.generate"
        " --params {params.params_file}"
        " --generator {wildcards.generator}"
        " --model {input.model}"
        " --shard {params.index}"
        " --out {output.shard}"
        " 2> {log}"


rule sample_grid:
    input:
        shard="data/generated/{generator}/shard-00000.h5",
    output:
        grid="results/figures/samples_{generator}.png",
    params:
        n=config["generate"]["grid_images"],
    log:
        "logs/sample_grid/{generator}.log",
    conda:
        "../envs/pipeline.yaml"
    shell:
        THREADS + "python -m pipeline.generate grid"
        " --shard {input.shard}"
        " --out {output.grid}"
        " --n {params.n}"
        " 2> {log}"
