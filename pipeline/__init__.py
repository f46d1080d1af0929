"""robustgen's pipeline, in four layers (tests/test_architecture.py keeps this map equal to the tree):

stages: the DAG's jobs, each `python -m pipeline.<stage>` (README's stage map), thin over the libraries
    data train_generator generate teacher pseudolabel select analysis threat_model train_robust evaluate
    evaluate_latent table
tools: commands outside the DAG
    export effect_report
workflow: the one configuration and the one DAG description both tools run (docs/workflow.md)
    params config params_schema dag snakemake_rules snakemake_lock provenance
libraries: what the stages share; no module imports a stage
    attacks augment aux_bn checkpoint corruptions cutmix datasets distributed effect ema eval_chunks features
    generators inference labels latent_attack loader losses models optim paper_reference preemption quality
    robustbench seeding shards stats
"""
