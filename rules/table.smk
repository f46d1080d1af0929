rule table:
    message:
        "collect every run into results/{DATASET}_table.csv (+ markdown and figure)"
    input:
        evaluations=expand("results/evaluate/{run}/{threat}.json", run=RUNS, threat=THREATS + LEARNED_THREATS),
        train_metrics=expand("results/train_robust/{run}/metrics.json", run=RUNS),
        teacher="results/teacher/metrics.json",
        analysis=expand("results/analysis/{generator}.json", generator=GENERATORS),
        # not read by the table, but part of what one `snakemake results/cifar10_table.csv` delivers
        complementarity="results/complementarity.csv",
        grids=expand("results/figures/samples_{generator}.png", generator=GENERATORS),
    output:
        csv=table_path(),
        markdown=f"results/{DATASET}_table.md",
        figure=f"results/figures/{DATASET}_robust_vs_generated.png",
    params:
        cfg=stage_params("table"),
        params_file=PARAMS_FILE,
    log:
        "logs/table.log",
    conda:
        "../envs/pipeline.yaml"
    shell:
        THREADS + "python -m pipeline.table"
        " --params {params.params_file}"
        " --evaluations {input.evaluations}"
        " --train-metrics {input.train_metrics}"
        " --teacher-metrics {input.teacher}"
        " --analysis {input.analysis}"
        " --out {output.csv}"
        " --out-md {output.markdown}"
        " --out-figure {output.figure}"
        " 2> {log}"
