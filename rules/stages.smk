# Generated from the stage table in pipeline/dag.py: after editing it,
#     python -m pipeline.dag write rules/stages.smk
# (tests/test_workflow_sync.py fails when this file differs from the table). The lists the rules expand
# over and the functions they call are in rules/common.smk.


rule data:
    message:
        f"{config['base']['dataset']} archive (md5 checked) -> HDF5 train / val / test / unlabelled"
    input:
        archive=data_archive(),
    output:
        train=f"data/{config['base']['dataset']}/train.h5",
        val=f"data/{config['base']['dataset']}/val.h5",
        test=f"data/{config['base']['dataset']}/test.h5",
        unlabelled=f"data/{config['base']['dataset']}/unlabelled.h5",
    params:
        cfg=stage_params("data"),
        out_dir=f"data/{config['base']['dataset']}",
    log:
        "logs/data.log",
    conda:
        "../envs/pipeline.yaml"
    shell:
        THREADS + "python -m pipeline.data --params params.yaml --out-dir {params.out_dir} 2> {log}"


rule train_generator:
    message:
        "fit / train generator {wildcards.generator} on the training set only"
    input:
        train=f"data/{config['base']['dataset']}/train.h5",
        unlabelled=f"data/{config['base']['dataset']}/unlabelled.h5",
        source=import_source,
        pretrained=pretrained_source,
    output:
        out="models/generators/{generator}/model.pt",
    params:
        cfg=stage_params("train_generator"),
        workdir="work/train_generator/{generator}",
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
        " --params params.yaml"
        " --generator {wildcards.generator}"
        " --train {input.train}"
        " --workdir {params.workdir}"
        " --out {output.out}"
        " 2> {log}"


rule generate:
    message:
        "sample shard {wildcards.shard} of {wildcards.generator}"
    input:
        model="models/generators/{generator}/model.pt",
    output:
        out="data/generated/{generator}/shard-{shard}.h5",
    params:
        cfg=stage_params("generate"),
        out_dir="data/generated/{generator}",
    log:
        "logs/generate/{generator}/shard-{shard}.log",
    benchmark:
        "benchmarks/generate/{generator}/shard-{shard}.tsv"
    threads: 2
    resources:
        gpu=1,
    conda:
        "../envs/pipeline.yaml"
    shell:
        THREADS + "python -m pipeline.generate"
        " --params params.yaml"
        " --generator {wildcards.generator}"
        " --model {input.model}"
        " --shard {wildcards.shard}"
        " --out-dir {params.out_dir}"
        " 2> {log}"


rule sample_grid:
    input:
        shard="data/generated/{generator}/shard-00000.h5",
    output:
        out="results/figures/samples_{generator}.png",
    params:
        n=config["generate"]["grid_images"],
    log:
        "logs/sample_grid/{generator}.log",
    localrule: True
    conda:
        "../envs/pipeline.yaml"
    shell:
        THREADS + "python -m pipeline.generate grid"
        " --shard {input.shard}"
        " --out {output.out}"
        " --n {params.n}"
        " 2> {log}"


rule teacher:
    message:
        "train the non-robust teacher that pseudo-labels generated images"
    input:
        train=f"data/{config['base']['dataset']}/train.h5",
        test=f"data/{config['base']['dataset']}/test.h5",
    output:
        model="models/teacher/model.pt",
        metrics="results/teacher/metrics.json",
    params:
        cfg=stage_params("teacher"),
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
        " --params params.yaml"
        " --train {input.train}"
        " --test {input.test}"
        " --workdir work/teacher"
        " --out-model {output.model}"
        " --out-metrics {output.metrics}"
        " 2> {log}"


rule pseudolabel:
    message:
        "teacher labels for shard {wildcards.shard} of {wildcards.generator}"
    input:
        teacher="models/teacher/model.pt",
        shards="data/generated/{generator}/shard-{shard}.h5",
    output:
        out="data/pseudolabels/{generator}/shard-{shard}.h5",
    params:
        cfg=stage_params("pseudolabel"),
        out_dir="data/pseudolabels/{generator}",
    log:
        "logs/pseudolabel/{generator}/shard-{shard}.log",
    benchmark:
        "benchmarks/pseudolabel/{generator}/shard-{shard}.tsv"
    threads: 2
    resources:
        gpu=1,
    conda:
        "../envs/pipeline.yaml"
    shell:
        THREADS + "python -m pipeline.pseudolabel"
        " --params params.yaml"
        " --teacher {input.teacher}"
        " --shards {input.shards}"
        " --out-dir {params.out_dir}"
        " 2> {log}"


rule select:
    message:
        "the paper's filter on {wildcards.generator}: class balance by pseudo-label, most confident first"
    input:
        labels=expand("data/pseudolabels/{{generator}}/shard-{shard}.h5", shard=SHARDS),
    output:
        out="data/selection/{generator}/index.npy",
    params:
        cfg=stage_params("select"),
        labels_dir="data/pseudolabels/{generator}",
    log:
        "logs/select/{generator}.log",
    conda:
        "../envs/pipeline.yaml"
    shell:
        THREADS + "python -m pipeline.select"
        " --params params.yaml"
        " --labels-dir {params.labels_dir}"
        " --out {output.out}"
        " 2> {log}"


rule analysis:
    message:
        "complementarity, coverage and quality (FID, leakage) of {wildcards.generator} against train and test"
    input:
        train=f"data/{config['base']['dataset']}/train.h5",
        test=f"data/{config['base']['dataset']}/test.h5",
        teacher="models/teacher/model.pt",
        shards=expand("data/generated/{{generator}}/shard-{shard}.h5", shard=SHARDS),
        labels=expand("data/pseudolabels/{{generator}}/shard-{shard}.h5", shard=SHARDS),
    output:
        figure="results/figures/quality_{generator}.png",
        out="results/analysis/{generator}.json",
    params:
        cfg=stage_params("analysis"),
    log:
        "logs/analysis/{generator}.log",
    benchmark:
        "benchmarks/analysis/{generator}.tsv"
    threads: 2
    conda:
        "../envs/pipeline.yaml"
    shell:
        THREADS + "python -m pipeline.analysis"
        " --params params.yaml"
        " --generator {wildcards.generator}"
        " --train {input.train}"
        " --test {input.test}"
        " --teacher {input.teacher}"
        " --shards {input.shards}"
        " --labels {input.labels}"
        " --out {output.out}"
        " --out-figure {output.figure}"
        " 2> {log}"


rule analysis_mixup:
    message:
        "complementarity, coverage and quality of the mixup baseline (the paper's reference row)"
    input:
        train=f"data/{config['base']['dataset']}/train.h5",
        test=f"data/{config['base']['dataset']}/test.h5",
        teacher="models/teacher/model.pt",
    output:
        figure="results/figures/quality_mixup.png",
        out="results/analysis/mixup.json",
    params:
        cfg=stage_params("analysis_mixup"),
    log:
        "logs/analysis/mixup.log",
    benchmark:
        "benchmarks/analysis/mixup.tsv"
    threads: 2
    conda:
        "../envs/pipeline.yaml"
    shell:
        THREADS + "python -m pipeline.analysis"
        " --params params.yaml"
        " --generator mixup"
        " --train {input.train}"
        " --test {input.test}"
        " --teacher {input.teacher}"
        " --out {output.out}"
        " --out-figure {output.figure}"
        " 2> {log}"


rule analysis_summary:
    input:
        inputs=[*expand("results/analysis/{generator}.json", generator=GENERATORS), "results/analysis/mixup.json"],
    output:
        csv="results/complementarity.csv",
        figure="results/figures/complementarity.png",
    log:
        "logs/analysis/summary.log",
    localrule: True
    conda:
        "../envs/pipeline.yaml"
    shell:
        THREADS + "python -m pipeline.analysis summary"
        " --inputs {input.inputs}"
        " --out-csv {output.csv}"
        " --out-figure {output.figure}"
        " 2> {log}"


rule threat_model:
    message:
        "which threat run {wildcards.run} trains under (a norm ball, or the learned set's model)"
    input:
        learned=run_learned_threat_model,
    output:
        out="models/threat/{run}.json",
    params:
        cfg=stage_params("threat_model"),
    log:
        "logs/threat_model/{run}.log",
    localrule: True
    conda:
        "../envs/pipeline.yaml"
    shell:
        THREADS + "python -m pipeline.threat_model"
        " --params params.yaml"
        " --run {wildcards.run}"
        " --generators-dir models/generators"
        " --out-dir models/threat"
        " 2> {log}"


rule train_robust:
    message:
        "adversarial training of run {wildcards.run} on real + generated batches"
    input:
        train=f"data/{config['base']['dataset']}/train.h5",
        val=f"data/{config['base']['dataset']}/val.h5",
        threat_model="models/threat/{run}.json",
        generated=run_generated("data/generated/{generator}/shard-{shard}.h5"),
        labels=run_generated("data/pseudolabels/{generator}/shard-{shard}.h5"),
        selection=run_generated("data/selection/{generator}/index.npy"),
    output:
        model="models/robust/{run}/last.pt",
        best="models/robust/{run}/best.pt",
        metrics="results/train_robust/{run}/metrics.json",
        curve="results/train_robust/{run}/curve.csv",
    params:
        cfg=stage_params("train_robust"),
        generated=lambda wildcards, input: flag_list("--generated", input.generated),
        labels=lambda wildcards, input: flag_list("--labels", input.labels),
        selection=lambda wildcards, input: flag_list("--selection", input.selection),
        workdir="work/train_robust/{run}",
        launcher=lambda wildcards, resources, threads: launcher(resources, threads, "train_robust"),
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
        " --params params.yaml"
        " --run {wildcards.run}"
        " --train {input.train}"
        " --val {input.val}"
        " --threat-model {input.threat_model}"
        " {params.generated}"
        " {params.labels}"
        " {params.selection}"
        " --workdir {params.workdir}"
        " --out-model {output.model}"
        " --out-best {output.best}"
        " --out-metrics {output.metrics}"
        " --out-curve {output.curve}"
        " 2> {log}"


rule evaluate_chunk:
    message:
        "clean, PGD and AutoAttack results of run {wildcards.run} under {wildcards.threat}, chunk {wildcards.chunk}"
    input:
        model=f"models/robust/{{run}}/{config['evaluate']['checkpoint']}.pt",
        test=f"data/{config['base']['dataset']}/test.h5",
    output:
        out="results/evaluate/{run}/{threat}/chunks/chunk-{chunk}.h5",
    params:
        cfg=stage_params("evaluate_chunk"),
        workdir="work/evaluate/{run}/{threat}",
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
        " --params params.yaml"
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
        model=f"models/robust/{{run}}/{config['evaluate']['checkpoint']}.pt",
        test=f"data/{config['base']['dataset']}/test.h5",
    output:
        out="results/evaluate/{run}/{threat}/sweep.h5",
    params:
        cfg=stage_params("evaluate_sweep"),
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
        " --params params.yaml"
        " --run {wildcards.run}"
        " --model {input.model}"
        " --test {input.test}"
        " --threat {wildcards.threat}"
        " --out {output.out}"
        " 2> {log}"


rule evaluate:
    message:
        "merge the evaluation chunks of run {wildcards.run} under {wildcards.threat}"
    input:
        model=f"models/robust/{{run}}/{config['evaluate']['checkpoint']}.pt",
        test=f"data/{config['base']['dataset']}/test.h5",
        chunk=expand("results/evaluate/{{run}}/{{threat}}/chunks/chunk-{chunk}.h5", chunk=EVAL_CHUNKS),
        sweep="results/evaluate/{run}/{threat}/sweep.h5",
    output:
        examples="results/evaluate/{run}/{threat}.h5",
        out="results/evaluate/{run}/{threat}.json",
    params:
        cfg=stage_params("evaluate"),
        chunk_dir="results/evaluate/{run}/{threat}/chunks",
    log:
        "logs/evaluate/{run}/{threat}.log",
    benchmark:
        "benchmarks/evaluate/{run}/{threat}.tsv"
    priority: 10
    localrule: True
    conda:
        "../envs/pipeline.yaml"
    shell:
        THREADS + "python -m pipeline.evaluate merge"
        " --params params.yaml"
        " --run {wildcards.run}"
        " --model {input.model}"
        " --test {input.test}"
        " --threat {wildcards.threat}"
        " --chunk-dir {params.chunk_dir}"
        " --sweep {input.sweep}"
        " --out {output.out}"
        " --out-examples {output.examples}"
        " 2> {log}"


rule evaluate_latent:
    message:
        "clean, corrupted and latent-attack accuracy of run {wildcards.run} under the learned {wildcards.learned} set"
    input:
        model=f"models/robust/{{run}}/{config['evaluate']['checkpoint']}.pt",
        cvae="models/generators/{learned}/model.pt",
        test=f"data/{config['base']['dataset']}/test.h5",
    output:
        examples="results/evaluate/{run}/{learned}.h5",
        out="results/evaluate/{run}/{learned}.json",
    params:
        cfg=stage_params("evaluate_latent"),
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
        " --params params.yaml"
        " --run {wildcards.run}"
        " --model {input.model}"
        " --cvae {input.cvae}"
        " --test {input.test}"
        " --out {output.out}"
        " --out-examples {output.examples}"
        " 2> {log}"


rule table:
    message:
        f"collect every run into results/{config['base']['dataset']}_table.csv (+ markdown and figure)"
    input:
        evaluations=[
            *expand("results/evaluate/{run}/{threat}.json", run=RUNS, threat=THREATS),
            *expand("results/evaluate/{run}/{learned}.json", run=RUNS, learned=LEARNED_THREATS),
        ],
        train_metrics=expand("results/train_robust/{run}/metrics.json", run=RUNS),
        teacher_metrics="results/teacher/metrics.json",
        analysis=expand("results/analysis/{generator}.json", generator=GENERATORS),
        complementarity="results/complementarity.csv",
        grids=expand("results/figures/samples_{generator}.png", generator=GENERATORS),
    output:
        out=f"results/{config['base']['dataset']}_table.csv",
        md=f"results/{config['base']['dataset']}_table.md",
        figure=f"results/figures/{config['base']['dataset']}_robust_vs_generated.png",
    params:
        cfg=stage_params("table"),
    log:
        "logs/table.log",
    localrule: True
    conda:
        "../envs/pipeline.yaml"
    shell:
        THREADS + "python -m pipeline.table"
        " --params params.yaml"
        " --evaluations {input.evaluations}"
        " --train-metrics {input.train_metrics}"
        " --teacher-metrics {input.teacher_metrics}"
        " --analysis {input.analysis}"
        " --out {output.out}"
        " --out-md {output.md}"
        " --out-figure {output.figure}"
        " 2> {log}"
