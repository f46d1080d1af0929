# What the rules of rules/stages.smk (generated from pipeline/dag.py) use: validation before any job, the
# lists of the DAG's axes, and the inputs known only when a job is planned. Logic lives in pipeline/.
import os
import re

import yaml

from pipeline import dag, datasets
from pipeline import params as P

PARAMS_FILE = "params.yaml"
P.validate(config)  # fails before any job starts, naming the key
with open(PARAMS_FILE) as _handle:
    if P.validate(yaml.safe_load(_handle)) != config:
        raise P.ParamsError(
            "the Snakemake config differs from params.yaml (was --config or --configfile given?): "
            "stages read params.yaml, so change it there, e.g. `python -m pipeline.params use paper`"
        )

DATASET = config["base"]["dataset"]
GENERATORS = P.generators(config)
RUN_TABLE = {run.name: run for run in P.run_table(config)}  # every run params defines (pipeline/params.py)
RUNS = list(RUN_TABLE)
THREATS = config["evaluate"]["threats"]
LEARNED_THREATS = config["evaluate"]["learned_threats"]
SHARDS = [f"{i:05d}" for i in range(P.shard_count(config))]
EVAL_CHUNKS = [f"{i:05d}" for i in range(P.eval_chunk_count(config["evaluate"]))]


wildcard_constraints:
    generator="|".join(GENERATORS) or "none",
    run="|".join(re.escape(run) for run in RUNS),
    threat="|".join(THREATS) or "none",  # the params lists: a typo'd path matches no rule
    learned="|".join(LEARNED_THREATS) or "none",
    shard=r"\d{5}",
    chunk=r"\d{5}",


def stage_params(stage):
    """The params keys `stage` declares in pipeline/dag.py (the table dvc.yaml is generated from), resolved
    for one job: Snakemake reruns the job when they change, as `dvc repro` reruns the stage. A run's
    `train_robust` is its own (its variant's settings laid over), so adding or changing one variant reruns
    only that variant's jobs; the DAG's axes are not declared, so adding a generator or a threat reruns
    none of the finished jobs."""

    def params(wildcards):
        return dag.job_params(stage, config, dict(wildcards.items()))

    return params


def run_learned_threat_model(wildcards):
    """The generator model a run trained in a learned perturbation set depends on (none for norm balls)."""
    threat = P.train_robust_for(config, wildcards.run)["threat"]
    return [f"models/generators/{threat}/model.pt"] if threat in P.LEARNED_THREATS else []


def run_generated(pattern):
    """The input function of a run's files of its generator (`{generator}` and `{shard}` in `pattern`): a
    variant, amount or seed run (gaussian-cutmix-s1) reads its generator's; the real-data baseline none."""

    def files(wildcards):
        generator = RUN_TABLE[wildcards.run].generator
        return [] if generator is None else expand(pattern, generator=generator, shard=SHARDS)

    return files


def flag_list(flag, paths):
    """`--flag a b c`, or nothing for an empty list (the real-data baseline)."""
    return f"{flag} {' '.join(paths)}" if paths else ""


def import_source(wildcards):
    """The imported file is an input of the import generator, so a new file reruns it."""
    path = config["train_generator"]["import"]["path"]
    return [path] if wildcards.generator == "import" and path else []


def pretrained_source(wildcards):
    """The files of a local pretrained DDPM folder (train_generator.ddpm.pretrained) are inputs of the ddpm
    generator, so a changed, added or removed file reruns the import (a folder's own mtime misses edits
    inside it). A hub id has no local files to name: model.pt records the weights' sha256 instead."""
    source = config["train_generator"]["ddpm"]["pretrained"]
    if wildcards.generator != "ddpm" or not source or not os.path.isdir(source):
        return []
    files = []
    for root, dirs, names in os.walk(source):
        dirs[:] = [d for d in dirs if not d.startswith(".")]  # `hf download`'s .cache metadata
        files += [os.path.join(root, name) for name in names if not name.startswith(".")]
    return sorted(files)


def data_archive():
    """The local file(s) the data stage reads (SVHN: both .mat files in the folder); none for a URL."""
    sources = datasets.sources(datasets.get(DATASET), config["data"]["archive"])
    return [source for source in sources if "://" not in source]


# Every job's torch (OpenMP, MKL) uses the cores Snakemake gives it: without this each process starts
# one thread per core of the machine, and two concurrent jobs oversubscribe the CPU several times over.
THREADS = "OMP_NUM_THREADS={threads} MKL_NUM_THREADS={threads} "


# Seconds torchrun waits, after forwarding SIGTERM to its ranks, before it SIGKILLs them (its default:
# 30 s). On SIGTERM a rank finishes its step and writes a checkpoint (model, EMA, optimiser: about 3 GB
# for WRN-70-16) and may be in a validation pass (docs/cluster.md, "Preemption"); 30 s does not cover
# that. Through the environment, which every torch release accepts (older ones ignore it and keep 30 s;
# `--shutdown-timeout` would be an unknown flag there). SLURM's KillWait / GraceTime must be as long.
TORCHRUN_SHUTDOWN_TIMEOUT_S = 300


def launcher(resources, threads, module="train_robust"):
    """`python -m pipeline.<module>` with the job's threads, or torchrun over the job's GPUs when it has
    more than one (the job's threads shared by its ranks): train_robust, train_generator (DDPM, EDM).

    The `--` stops torchrun's parser from reading the stage's flags (--run) as its own (--run-path).
    """
    gpus = int(resources.get("gpu", 0) or 0)
    if gpus > 1:
        per_rank = max(1, int(threads) // gpus)
        return (
            f"OMP_NUM_THREADS={per_rank} MKL_NUM_THREADS={per_rank} "
            f"TORCH_ELASTIC_SHUTDOWN_TIMEOUT={TORCHRUN_SHUTDOWN_TIMEOUT_S} "
            f"torchrun --standalone --nproc_per_node {gpus} -m pipeline.{module} --"
        )
    return f"OMP_NUM_THREADS={threads} MKL_NUM_THREADS={threads} python -m pipeline.{module}"


def final_targets():
    return [
        f"results/{DATASET}_table.csv",
        "results/complementarity.csv",
        *expand("results/figures/samples_{generator}.png", generator=GENERATORS),
    ]
