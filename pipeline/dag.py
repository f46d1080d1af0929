"""The DAG as one table: every stage's command, inputs, outputs, params keys and axes, for both tools.

    python -m pipeline.dag dvc                         # print dvc.yaml
    python -m pipeline.dag write dvc.yaml              # after editing STAGES or the runs in params.yaml
    python -m pipeline.dag write rules/stages.smk      # after editing STAGES (the Snakemake rules)
    python -m pipeline.dag check dvc.yaml              # exit 1, with a diff, when the file has drifted
    python -m pipeline.dag map --readme README.md      # README's map: stage, module, jobs, params, outputs

Both files are generated from STAGES and committed (users read them; tests/test_workflow_sync.py fails when
either differs from its rendering). The Snakemake rules (pipeline/snakemake_rules.py) do not depend on
params: they expand over lists rules/common.smk reads from params.yaml, one job per shard, chunk and run.
dvc.yaml is rendered with the run table of params.yaml (pipeline.params.run_table): stages over
generators keep DVC's foreach over the params list; the run stages list their runs and threats, because
DVC's templating can neither name a run (seed 0 adds no suffix) nor drop the baseline's generated inputs.
So changing the runs (generators, variants, amounts, seeds, threats) means regenerating dvc.yaml:
`python -m pipeline.params use` does, and DVC's first stage (check_params) stops on a stale file. A rule
takes its params from here too (`stage_params` in rules/common.smk calls `job_params`), so a rule and its
DVC stage rerun on the same keys; tests/test_workflow_sync.py runs every stage with a recording params
mapping and fails when the keys a stage reads differ from the keys declared here.

Axes say which jobs exist, never how one job computes: a job does not declare the list it is one item of
(adding a generator must not resample the Gaussian's shards, adding l2 or the cvae threat must not rerun
the finished linf AutoAttack jobs, days of GPU time at paper scale).
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline import params as params_mod

Axis = Literal["generator", "run", "threat", "learned", "shard", "chunk"]
YamlValue = str | bool | list["YamlValue"] | dict[str, "YamlValue"]

# The params list each axis runs over, written as DVC templating.
AXIS_LISTS: dict[str, str] = {
    "generator": "generate.generators",
    "threat": "evaluate.threats",
    "learned": "evaluate.learned_threats",
}
# The lists the run table repeats runs over, besides the generators (pipeline.params.run_table).
RUN_LISTS = ("variants.names", "variants.amounts", "variants.amounts_for", "variants.seeds")
PARAMS_OK = "work/params.ok"   # check_params' stamp: every stage that reads params.yaml runs after it
SECTIONS = ("base", "data", "train_generator", "generate", "teacher", "pseudolabel", "select", "analysis",
            "train_robust", "variants", "evaluate")   # every section of pipeline/params.schema.yaml
WIDTH = 110   # longest dvc.yaml line, indentation included, before a command is folded
HEADER = """\
# Generated from the stage table in pipeline/dag.py and the runs params.yaml defines: after editing either,
#     python -m pipeline.dag write dvc.yaml
# (`python -m pipeline.params use <preset>` does it; check_params stops `dvc repro` when this file is stale,
# and tests/test_workflow_sync.py fails when the committed file differs from the committed params).
# The same DAG as the Snakefile, for `dvc repro`. Granularity differs where DVC has no per-shard
# wildcards: one stage per generator writes the whole shard directory, with byte-identical shards, and
# one stage per run and threat attacks every evaluation chunk, with byte-identical chunk files. The run
# stages list their runs (pipeline.params.run_table: generators, variants, data amounts, training seeds)
# and threats; every other value comes from params.yaml through DVC's templating.
"""


@dataclass(frozen=True)
class Files:
    """A folder of one file per item of the axes its names use (`shard-{shard}.h5`): DVC tracks the folder,
    Snakemake the files, listed (an added or removed file is a changed input), or only its job's one when
    the stage runs per item (one job per shard)."""
    folder: str
    names: tuple[str, ...]


def files(folder: str, *names: str) -> Files:
    return Files(folder, names)


@dataclass(frozen=True)
class Dynamic:
    """An input known only when a job is planned: Snakemake's is `snakemake`, an expression of
    rules/common.smk (a function of the job's wildcards, or a list); DVC declares `dvc` (or nothing)."""
    name: str
    snakemake: str
    dvc: str = ""


@dataclass(frozen=True)
class FromGenerated:
    """A command part or input only runs trained on generated data have (not the real-data baseline)."""
    text: str | Files


Path_ = str | Files
Part = str | FromGenerated
Dep = str | Files | FromGenerated | Dynamic


@dataclass(frozen=True)
class Stage:
    """One stage of both tools: `python -m pipeline.<stage>` with its inputs, outputs and params.

    Paths and commands use `{generator}`, `{run}`, `{threat}`, `{learned}`, `{shard}`, `{chunk}` for the
    job's item of an axis and DVC's `${section.key}` for params values. `params` are the keys one job
    reads: whole sections (`base`) or single keys (`evaluate.n_eval`, `train_generator.{generator}`). A key
    under `train_robust` is read through the run's variant (pipeline.params.train_robust_for), so a variant
    run also declares `variants.settings.<variant>`.

    A command part is `--flag value`; Snakemake passes a value that is an input or output as such (a
    `Files` value as its files, or as its folder to a `-dir` flag), a value naming a wildcard as the
    wildcard, and any other value with placeholders as a param (pipeline/snakemake_rules.py).
    """
    name: str
    cmd: tuple[Part, ...]                 # argument groups; the first is `python -m pipeline.<module>`
    deps: tuple[Dep, ...] = ()
    outs: tuple[Path_, ...] = ()
    metrics: tuple[str, ...] = ()         # small JSON files, never cached
    plots: tuple[str, ...] = ()           # CSV curves, never cached
    params: tuple[str, ...] = ()
    axes: tuple[Axis, ...] = ()           # `shard` and `chunk`: Snakemake runs one job per item, DVC one with `all`
    cache: bool = True                    # False: cheap outs, left out of the DVC cache
    all_runs: bool = False                # DVC runs it once with `--run all`; Snakemake once per run
    note: str = ""                        # why the stage exists or looks the way it does (a dvc.yaml comment)
    # Snakemake only
    message: str = ""                     # the line Snakemake prints for each job
    log: str = ""                         # the job's stderr (`benchmark`: time and memory under benchmarks/)
    benchmark: bool = False
    threads: int = 1
    gpu: bool = False                     # takes one `gpu` resource (SLURM: one GPU)
    local: bool = False                   # seconds of work: runs in the controller, never submitted
    priority: int = 0                     # Snakemake starts ready jobs of higher priority first
    launcher: bool = False                # torchrun over the job's GPUs when it has more than one
    snakemake: bool = True                # False: DVC only (Snakemake validates params when it parses)


PER_ITEM: tuple[Axis, ...] = ("shard", "chunk")   # the axes DVC runs as `all` in one job


def dvc_path(part: str | Files) -> str:
    """What DVC tracks of a path of the table: a `Files`' folder."""
    return part.folder if isinstance(part, Files) else part


DATA = "data/${base.dataset}"
EVALUATE_KEYS = tuple(f"evaluate.{key}" for key in (
    "checkpoint", "eps_255", "n_eval", "batch_size", "chunk_size", "version", "pgd_steps", "sweep_factors",
    "n_sweep", "tolerance", "max_pgd_gap"))
# What decides one AutoAttack chunk and the eps sweep (pipeline.evaluate.ChunkConfig and SweepConfig, tested
# equal): n_eval only says which chunks exist, so raising it attacks only the new chunks.
CHUNK_KEYS = tuple(f"evaluate.{key}" for key in ("checkpoint", "eps_255", "batch_size", "chunk_size", "version",
                                                 "pgd_steps"))
SWEEP_KEYS = tuple(f"evaluate.{key}" for key in ("checkpoint", "eps_255", "batch_size", "pgd_steps",
                                                 "sweep_factors", "n_sweep"))
EVAL_MODEL = "models/robust/{run}/${evaluate.checkpoint}.pt"
EVAL_PARTS = "results/evaluate/{run}/{threat}"   # the chunk and sweep files of one (run, threat)
SHARD_FILE = "shard-{shard}.h5"   # one generated shard (or its sidecar) in its folder
GENERATED = files("data/generated/{generator}", SHARD_FILE)
LABELS = files("data/pseudolabels/{generator}", SHARD_FILE)
CHUNKS = files(f"{EVAL_PARTS}/chunks", "chunk-{chunk}.h5")

STAGES: dict[str, Stage] = {stage.name: stage for stage in (
    Stage(
        "check_params",
        cmd=("python -m pipeline.params check params.yaml", "--dvc-yaml dvc.yaml", f"--stamp {PARAMS_OK}",
             "--ensure-dir models/generators"),
        outs=(PARAMS_OK,),
        params=SECTIONS,
        cache=False,
        note="DVC has no parse hook: validate params.yaml first (Snakemake validates when it parses the "
             "Snakefile). The stamp is constant, so a params change does not cascade through it.",
        snakemake=False,
    ),
    Stage(
        "data",
        cmd=("python -m pipeline.data", "--params params.yaml", f"--out-dir {DATA}"),
        deps=(PARAMS_OK, Dynamic("archive", "data_archive()", dvc="${data.archive}")),
        outs=(f"{DATA}/train.h5", f"{DATA}/val.h5", f"{DATA}/test.h5", f"{DATA}/unlabelled.h5"),
        params=("base", "data"),
        message="${base.dataset} archive (md5 checked) -> HDF5 train / val / test / unlabelled",
        log="logs/data.log",
    ),
    Stage(
        "train_generator",
        cmd=("python -m pipeline.train_generator", "--params params.yaml", "--generator {generator}",
             f"--train {DATA}/train.h5", "--workdir work/train_generator/{generator}",
             "--out models/generators/{generator}/model.pt"),
        deps=(PARAMS_OK, f"{DATA}/train.h5", f"{DATA}/unlabelled.h5", Dynamic("source", "import_source"),
              Dynamic("pretrained", "pretrained_source")),
        outs=("models/generators/{generator}/model.pt",),
        params=("base", "train_generator.{generator}"),
        axes=("generator",),
        note="The oracle generator reads unlabelled.h5 beside --train (data.n_labelled). Every generator "
             "declares it (a foreach gives all items the same deps); it is an empty set unless n_labelled is set, "
             "and a new one comes with a new train.h5.",
        message="fit / train generator {generator} on the training set only",
        log="logs/train_generator/{generator}.log", benchmark=True, threads=4, gpu=True, launcher=True,
    ),
    Stage(
        "generate",
        cmd=("python -m pipeline.generate", "--params params.yaml", "--generator {generator}",
             "--model models/generators/{generator}/model.pt", "--shard {shard}",
             "--out-dir data/generated/{generator}"),
        deps=(PARAMS_OK, "models/generators/{generator}/model.pt"),
        outs=(GENERATED,),
        params=("base", "generate.n_images", "generate.shard_size", "generate.batch_size", "generate.sampler",
                "generate.sampling_steps", "generate.ddpm_variance", "generate.edm_steps", "generate.grid_images"),
        axes=("generator", "shard"),
        note="Every generate key but the axis `generators`: adding a generator must not resample the others.",
        message="sample shard {shard} of {generator}",
        log="logs/generate/{generator}/shard-{shard}.log", benchmark=True, threads=2, gpu=True,
    ),
    Stage(
        "sample_grid",
        cmd=("python -m pipeline.generate grid", "--shard data/generated/{generator}/shard-00000.h5",
             "--out results/figures/samples_{generator}.png", "--n ${generate.grid_images}"),
        deps=(files("data/generated/{generator}", "shard-00000.h5"),),
        outs=("results/figures/samples_{generator}.png",),
        axes=("generator",),
        cache=False,
        log="logs/sample_grid/{generator}.log", local=True,
    ),
    Stage(
        "teacher",
        cmd=("python -m pipeline.teacher", "--params params.yaml", f"--train {DATA}/train.h5",
             f"--test {DATA}/test.h5", "--workdir work/teacher", "--out-model models/teacher/model.pt",
             "--out-metrics results/teacher/metrics.json"),
        deps=(PARAMS_OK, f"{DATA}/train.h5", f"{DATA}/test.h5"),
        outs=("models/teacher/model.pt",),
        metrics=("results/teacher/metrics.json",),
        params=("base", "teacher"),
        message="train the non-robust teacher that pseudo-labels generated images",
        log="logs/teacher.log", benchmark=True, threads=4, gpu=True,
    ),
    Stage(
        "pseudolabel",
        cmd=("python -m pipeline.pseudolabel", "--params params.yaml", "--teacher models/teacher/model.pt",
             "--shards data/generated/{generator}", "--out-dir data/pseudolabels/{generator}"),
        deps=(PARAMS_OK, "models/teacher/model.pt", GENERATED),
        outs=(LABELS,),
        params=("base", "pseudolabel"),
        axes=("generator", "shard"),
        message="teacher labels for shard {shard} of {generator}",
        log="logs/pseudolabel/{generator}/shard-{shard}.log", benchmark=True, threads=2, gpu=True,
    ),
    Stage(
        "select",
        cmd=("python -m pipeline.select", "--params params.yaml", "--labels-dir data/pseudolabels/{generator}",
             "--out data/selection/{generator}/index.npy"),
        deps=(PARAMS_OK, LABELS),
        outs=("data/selection/{generator}/index.npy",),
        params=("base", "select"),
        axes=("generator",),
        note="The paper's filter: an index of the kept generated images (class balance by pseudo-label, most "
             "confident first); every training run of the generator reads it.",
        message="the paper's filter on {generator}: class balance by pseudo-label, most confident first",
        log="logs/select/{generator}.log",
    ),
    Stage(
        "analysis",
        cmd=("python -m pipeline.analysis", "--params params.yaml", "--generator {generator}",
             f"--train {DATA}/train.h5", f"--test {DATA}/test.h5", "--teacher models/teacher/model.pt",
             "--shards data/generated/{generator}", "--labels data/pseudolabels/{generator}",
             "--out results/analysis/{generator}.json", "--out-figure results/figures/quality_{generator}.png"),
        deps=(PARAMS_OK, f"{DATA}/train.h5", f"{DATA}/test.h5", "models/teacher/model.pt", GENERATED, LABELS),
        outs=("results/figures/quality_{generator}.png",),
        metrics=("results/analysis/{generator}.json",),
        params=("base", "analysis"),
        axes=("generator",),
        cache=False,
        note="Complementarity and coverage (the paper's table) and the generated data's own quality: FID, IS, "
             "KID, precision/recall, density/coverage, per-class FID by pseudo-label, test-set leakage "
             "(pipeline/quality.py).",
        message="complementarity, coverage and quality (FID, leakage) of {generator} against train and test",
        log="logs/analysis/{generator}.log", benchmark=True, threads=2,
    ),
    Stage(
        "analysis_mixup",
        cmd=("python -m pipeline.analysis", "--params params.yaml", "--generator mixup", f"--train {DATA}/train.h5",
             f"--test {DATA}/test.h5", "--teacher models/teacher/model.pt", "--out results/analysis/mixup.json",
             "--out-figure results/figures/quality_mixup.png"),
        deps=(PARAMS_OK, f"{DATA}/train.h5", f"{DATA}/test.h5", "models/teacher/model.pt"),
        outs=("results/figures/quality_mixup.png",),
        metrics=("results/analysis/mixup.json",),
        params=("base", "analysis"),
        cache=False,
        message="complementarity, coverage and quality of the mixup baseline (the paper's reference row)",
        log="logs/analysis/mixup.log", benchmark=True, threads=2,
    ),
    Stage(
        "analysis_summary",
        cmd=("python -m pipeline.analysis summary", "--inputs results/analysis",
             "--out-csv results/complementarity.csv", "--out-figure results/figures/complementarity.png"),
        deps=(files("results/analysis", "{generator}.json", "mixup.json"),),
        outs=("results/complementarity.csv", "results/figures/complementarity.png"),
        cache=False,
        log="logs/analysis/summary.log", local=True,
    ),
    Stage(
        "threat_model",
        cmd=("python -m pipeline.threat_model", "--params params.yaml", "--run {run}",
             "--generators-dir models/generators", "--out-dir models/threat"),
        deps=(PARAMS_OK, Dynamic("learned", "run_learned_threat_model", dvc="models/generators")),
        outs=(files("models/threat", "{run}.json"),),
        params=("train_robust.threat",),
        axes=("run",),
        all_runs=True,
        note="One file per run: train_robust depends on its own, so retraining the cvae generator reruns only "
             "the runs trained in its learned set (pipeline/threat_model.py); norm-ball files never change. "
             "One stage writes every run's file, so it also depends on the lists of runs.",
        message="which threat run {run} trains under (a norm ball, or the learned set's model)",
        log="logs/threat_model/{run}.log", local=True,
    ),
    Stage(
        "train_robust",
        cmd=("python -m pipeline.train_robust", "--params params.yaml", "--run {run}", f"--train {DATA}/train.h5",
             f"--val {DATA}/val.h5", "--threat-model models/threat/{run}.json",
             FromGenerated("--generated data/generated/{generator}"),
             FromGenerated("--labels data/pseudolabels/{generator}"),
             FromGenerated("--selection data/selection/{generator}/index.npy"),
             "--workdir work/train_robust/{run}", "--out-model models/robust/{run}/last.pt",
             "--out-best models/robust/{run}/best.pt", "--out-metrics results/train_robust/{run}/metrics.json",
             "--out-curve results/train_robust/{run}/curve.csv"),
        deps=(PARAMS_OK, f"{DATA}/train.h5", f"{DATA}/val.h5", "models/threat/{run}.json",
              FromGenerated(GENERATED), FromGenerated(LABELS), FromGenerated("data/selection/{generator}/index.npy")),
        outs=("models/robust/{run}/last.pt", "models/robust/{run}/best.pt"),
        metrics=("results/train_robust/{run}/metrics.json",),
        plots=("results/train_robust/{run}/curve.csv",),
        params=("base", "train_robust"),
        axes=("run",),
        message="adversarial training of run {run} on real + generated batches",
        log="logs/train_robust/{run}.log", benchmark=True, threads=4, gpu=True, launcher=True,
    ),
    Stage(
        "evaluate_chunk",
        cmd=("python -m pipeline.evaluate chunk", "--params params.yaml", "--run {run}", f"--model {EVAL_MODEL}",
             f"--test {DATA}/test.h5", "--threat {threat}", "--chunk {chunk}", "--workdir work/evaluate/{run}/{threat}",
             f"--out-dir {EVAL_PARTS}/chunks"),
        deps=(PARAMS_OK, EVAL_MODEL, f"{DATA}/test.h5"),
        outs=(CHUNKS,),
        # train_robust: the checkpoint must be the architecture the run trained (train_robust.model)
        params=("base", *CHUNK_KEYS, "train_robust"),
        axes=("run", "threat", "chunk"),
        note="AutoAttack (with clean and PGD) on evaluate.chunk_size test images: Snakemake runs one GPU job per "
             "chunk, ceil(n_eval / chunk_size) of them. DVC cannot expand over a count computed from params "
             "(foreach and matrix take lists only) and runs one stage at a time, so it runs every chunk here in one "
             "job, resuming from the workdir, and writes the same chunk files (it then also declares n_eval).",
        message="clean, PGD and AutoAttack results of run {run} under {threat}, chunk {chunk}",
        log="logs/evaluate/{run}/{threat}/chunk-{chunk}.log", benchmark=True, threads=4, gpu=True,
    ),
    Stage(
        "evaluate_sweep",
        cmd=("python -m pipeline.evaluate sweep", "--params params.yaml", "--run {run}", f"--model {EVAL_MODEL}",
             f"--test {DATA}/test.h5", "--threat {threat}", f"--out {EVAL_PARTS}/sweep.h5"),
        deps=(PARAMS_OK, EVAL_MODEL, f"{DATA}/test.h5"),
        outs=(f"{EVAL_PARTS}/sweep.h5",),
        params=("base", *SWEEP_KEYS, "train_robust"),
        axes=("run", "threat"),
        note="The masking check's PGD at sweep_factors x eps on the first n_sweep images, once per run and threat: "
             "its settings rerun no AutoAttack chunk.",
        message="eps sweep (PGD at multiples of eps) of run {run} under {threat}",
        log="logs/evaluate/{run}/{threat}/sweep.log", benchmark=True, threads=4, gpu=True,
    ),
    Stage(
        "evaluate",
        cmd=("python -m pipeline.evaluate merge", "--params params.yaml", "--run {run}", f"--model {EVAL_MODEL}",
             f"--test {DATA}/test.h5", "--threat {threat}", f"--chunk-dir {EVAL_PARTS}/chunks",
             f"--sweep {EVAL_PARTS}/sweep.h5", "--out results/evaluate/{run}/{threat}.json",
             "--out-examples results/evaluate/{run}/{threat}.h5"),
        deps=(PARAMS_OK, EVAL_MODEL, f"{DATA}/test.h5", CHUNKS, f"{EVAL_PARTS}/sweep.h5"),
        outs=("results/evaluate/{run}/{threat}.h5",),
        metrics=("results/evaluate/{run}/{threat}.json",),
        params=("base", *EVALUATE_KEYS, "train_robust"),
        axes=("run", "threat"),
        note="Checks and merges the chunks and the sweep into the JSON and per-example HDF5 a one-process "
             "`python -m pipeline.evaluate` writes, byte for byte (local, seconds).",
        message="merge the evaluation chunks of run {run} under {threat}",
        # seconds: a run's result lands as soon as its chunks do, not after the trainings queued behind
        log="logs/evaluate/{run}/{threat}.log", benchmark=True, local=True, priority=10,
    ),
    Stage(
        "evaluate_latent",
        cmd=("python -m pipeline.evaluate_latent", "--params params.yaml", "--run {run}",
             f"--model {EVAL_MODEL}", "--cvae models/generators/{learned}/model.pt",
             f"--test {DATA}/test.h5", "--out results/evaluate/{run}/{learned}.json",
             "--out-examples results/evaluate/{run}/{learned}.h5"),
        deps=(PARAMS_OK, EVAL_MODEL, "models/generators/{learned}/model.pt", f"{DATA}/test.h5"),
        outs=("results/evaluate/{run}/{learned}.h5",),
        metrics=("results/evaluate/{run}/{learned}.json",),
        params=("base", "evaluate.checkpoint", "evaluate.n_eval", "evaluate.batch_size", "evaluate.pgd_steps"),
        axes=("run", "learned"),
        message="clean, corrupted and latent-attack accuracy of run {run} under the learned {learned} set",
        log="logs/evaluate/{run}/{learned}.log", benchmark=True, threads=4, gpu=True,
    ),
    Stage(
        "table",
        cmd=("python -m pipeline.table", "--params params.yaml", "--evaluations results/evaluate",
             "--train-metrics results/train_robust", "--teacher-metrics results/teacher/metrics.json",
             "--analysis results/analysis", "--out results/${base.dataset}_table.csv",
             "--out-md results/${base.dataset}_table.md",
             "--out-figure results/figures/${base.dataset}_robust_vs_generated.png"),
        deps=(files("results/evaluate", "{run}/{threat}.json", "{run}/{learned}.json"),
              files("results/train_robust", "{run}/metrics.json"), "results/teacher/metrics.json",
              files("results/analysis", "{generator}.json"), "results/complementarity.csv",
              # not read by the table, but part of what one `snakemake results/cifar10_table.csv` delivers
              Dynamic("grids", 'expand("results/figures/samples_{generator}.png", generator=GENERATORS)')),
        outs=("results/${base.dataset}_table.csv", "results/${base.dataset}_table.md",
              "results/figures/${base.dataset}_robust_vs_generated.png"),
        params=SECTIONS,
        cache=False,
        note="Every section: each row carries the sha256 of the whole params (pipeline.provenance.params_sha256), "
             "so any params change rewrites the (cheap) table.",
        message="collect every run into results/${base.dataset}_table.csv (+ markdown and figure)",
        log="logs/table.log", local=True,
    ),
)}


# --- the jobs of one stage, for Snakemake ---


def axis_keys(stage: Stage, dvc: bool = False) -> tuple[str, ...]:
    """The params lists that say which jobs exist. A job is one item of them and never declares them: it
    may read one (evaluate's config mirrors its whole section), but it must not compute with it. DVC's
    `all_runs` stage is not expanded over the runs, so it declares the lists it covers."""
    return () if dvc and stage.all_runs else (*AXIS_LISTS.values(), *RUN_LISTS)


def job_keys(name: str, wildcards: Mapping[str, str]) -> tuple[str, ...]:
    """The params keys one job of a stage declares, its wildcards filled in (`train_generator.ddpm`)."""
    return tuple(fill(key, wildcards) for key in STAGES[name].params)


def job_params(name: str, cfg: dict[str, Any], wildcards: Mapping[str, str]) -> dict[str, Any]:
    """The values of `job_keys`, nested by section: Snakemake's params of the job (it reruns the job when
    they change). `train_robust` keys are the run's own, its variant's settings laid over."""
    run = wildcards.get("run")
    values: dict[str, Any] = {}
    for key in job_keys(name, wildcards):
        path = key.split(".")
        value = params_mod.train_robust_for(cfg, run) if path[0] == "train_robust" and run else cfg[path[0]]
        for part in path[1:]:
            value = value[part]
        target = values
        for part in path[:-1]:
            target = target.setdefault(part, {})
        target[path[-1]] = value
    return values


def fill(text: str, values: Mapping[str, str]) -> str:
    """A path or command of the table with its `{axis}` placeholders replaced; DVC's `${...}` left alone."""
    return re.sub(r"(?<!\$)\{(\w+)\}", lambda match: values[match.group(1)], text)


# --- dvc.yaml ---


@dataclass(frozen=True)
class Stanza:
    """One entry of dvc.yaml's `stages:`: one per stage of the table."""
    name: str
    stage: Stage
    body: dict[str, YamlValue]


def stanzas(cfg: dict[str, Any]) -> list[Stanza]:
    """Every dvc.yaml stage, in STAGES order; the run stages over the run table of `cfg`."""
    return [_run_stanza(stage, cfg) if "run" in stage.axes and not stage.all_runs else _stanza(stage)
            for stage in STAGES.values()]


def _stanza(stage: Stage) -> Stanza:
    """A stage expanded by DVC's own templating over the params lists of its axes (or not at all)."""
    axes = [axis for axis in stage.axes if axis != "run" and axis not in PER_ITEM]
    item: dict[str, str] = {axis: "${item}" if len(axes) == 1 else f"${{item.{axis}}}" for axis in axes}
    item.update({axis: "all" for axis in stage.axes if axis in PER_ITEM})
    params = list(stage.params)
    if stage.all_runs:   # every run's file, so the run table's lists and every variant's settings
        item["run"] = "all"
        params += ["variants", AXIS_LISTS["generator"]]
    body = _body(stage, item, params, {})
    if len(axes) == 1:
        body = {"foreach": f"${{{AXIS_LISTS[axes[0]]}}}", "do": body}
    elif axes:
        body = {"matrix": {axis: f"${{{AXIS_LISTS[axis]}}}" for axis in axes}, **body}
    return Stanza(stage.name, stage, body)


def _run_stanza(stage: Stage, cfg: dict[str, Any]) -> Stanza:
    """A run stage as one `foreach` over its jobs, written out from the run table (pipeline.params.run_table):
    DVC's templating cannot build run names (seed 0 adds no suffix) nor drop the generated inputs of the
    baseline. Each job's item holds what differs between runs: its name and threat, its generated inputs
    (the baseline repeats the params stamp in their place: a DVC list cannot be interpolated), and its
    variant's settings (others repeat `train_robust`)."""
    others: list[str] = [axis for axis in stage.axes if axis != "run" and axis not in PER_ITEM]   # threat, learned
    axis_values = {"threat": cfg["evaluate"]["threats"], "learned": cfg["evaluate"]["learned_threats"]}
    generated_deps = [dvc_path(part.text) for part in stage.deps if isinstance(part, FromGenerated)]
    has_generated_cmd = any(isinstance(part, FromGenerated) for part in stage.cmd)
    variant_params = any(key.split(".")[0] == "train_robust" for key in stage.params)
    items: dict[str, YamlValue] = {}
    for run in params_mod.run_table(cfg):
        combos: list[dict[str, str]] = [{}]
        for axis in others:
            combos = [{**combo, axis: value} for combo in combos for value in axis_values[axis]]
        for combo in combos:
            item: dict[str, YamlValue] = {"run": run.name, **combo}
            generator = {"generator": run.generator or ""}
            if has_generated_cmd:
                item["generated_args"] = " ".join(fill(dvc_path(part.text), generator) for part in stage.cmd
                                                  if isinstance(part, FromGenerated)) if run.generator else ""
            for i, path in enumerate(generated_deps):
                item[f"generated_dep{i}"] = fill(path, generator) if run.generator else PARAMS_OK
            if variant_params:
                item["settings"] = f"variants.settings.{run.variant}" if run.variant else "train_robust"
            items["-".join([run.name, *combo.values()])] = item
    placeholders = {"run": "${item.run}", **{axis: f"${{item.{axis}}}" for axis in others}}
    placeholders.update({axis: "all" for axis in stage.axes if axis in PER_ITEM})
    params = [*stage.params, *(["${item.settings}"] if variant_params else []),
              *(["evaluate.n_eval"] if "chunk" in stage.axes else [])]   # how many chunks `--chunk all` attacks
    generated = {path: f"${{item.generated_dep{i}}}" for i, path in enumerate(generated_deps)}
    return Stanza(stage.name, stage, {"foreach": items, "do": _body(stage, placeholders, params, generated)})


def _body(stage: Stage, item: Mapping[str, str], params: list[str], generated: dict[str, str]) -> dict[str, YamlValue]:
    """cmd, deps, params, outs, metrics and plots of one stanza, `{axis}` filled with `item`'s placeholders;
    the generated command parts become `${item.generated_args}` and the generated deps `generated`'s."""
    cmd, seen_generated = [], False
    for part in stage.cmd:
        if isinstance(part, FromGenerated):
            if not seen_generated:
                cmd.append("${item.generated_args}")
            seen_generated = True
        else:
            cmd.append(fill(part, item))
    deps = [generated[dvc_path(part.text)] if isinstance(part, FromGenerated)
            else fill(part.dvc if isinstance(part, Dynamic) else dvc_path(part), item)
            for part in stage.deps if not (isinstance(part, Dynamic) and not part.dvc)]
    body: dict[str, YamlValue] = {"cmd": " ".join(cmd)}
    for key, paths, cached in (("deps", deps, True), ("params", [fill(key, item) for key in params], True),
                               ("outs", [fill(dvc_path(p), item) for p in stage.outs], stage.cache),
                               ("metrics", [fill(p, item) for p in stage.metrics], False),
                               ("plots", [fill(p, item) for p in stage.plots], False)):
        entries: list[YamlValue] = [path if cached else {path: {"cache": False}} for path in paths]
        if entries:
            body[key] = entries
    return body


def render(cfg: dict[str, Any]) -> str:
    """dvc.yaml's text for params `cfg`: the header, then one block per stanza, blank lines between."""
    blocks = []
    for stanza in stanzas(cfg):
        lines = [f"  {stanza.name}:"]
        lines += [f"    # {line}" for line in _wrap(stanza.stage.note.split(), WIDTH - 6)] if stanza.stage.note else []
        lines += _block(stanza.body, 4)
        blocks.append("\n".join(lines))
    return HEADER + "stages:\n" + "\n\n".join(blocks) + "\n"


def _block(mapping: Mapping[str, YamlValue], indent: int) -> list[str]:
    pad = " " * indent
    lines = []
    for key, value in mapping.items():
        if key == "cmd" and isinstance(value, str) and len(f"{pad}cmd: {value}") > WIDTH:
            lines += [f"{pad}cmd: >-", *(f"{pad}  {line}" for line in _wrap(_groups(value), WIDTH - indent - 2))]
        elif isinstance(value, (str, bool)):
            lines.append(f"{pad}{key}: {_scalar(value)}")
        elif isinstance(value, dict):
            lines += [f"{pad}{key}:", *_block(value, indent + 2)] if value else [f"{pad}{key}: {{}}"]
        else:
            lines.append(f"{pad}{key}:")
            for entry in value:
                if isinstance(entry, dict):
                    for path, options in entry.items():
                        assert isinstance(options, dict)
                        lines += [f"{pad}  - {path}:", *_block(options, indent + 6)]
                else:
                    lines.append(f"{pad}  - {_scalar(entry)}")
    return lines


def _scalar(value: YamlValue) -> str:
    """A YAML scalar that reads back as `value`: plain where it can be, double-quoted otherwise ("")."""
    if isinstance(value, bool):
        return "true" if value else "false"
    assert isinstance(value, str)
    return value if value and yaml.safe_load(f"k: {value}") == {"k": value} else json.dumps(value)


def _groups(cmd: str) -> list[str]:
    """A command's flags, each kept with its value so a fold never separates them."""
    return re.split(r" (?=--)", cmd)


def _wrap(words: list[str], width: int) -> list[str]:
    lines: list[str] = []
    for word in words:
        if lines and len(lines[-1]) + 1 + len(word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines


MAP_BEGIN, MAP_END = "<!-- stage-map:begin -->", "<!-- stage-map:end -->"
JOBS = {"generator": "generator", "run": "run", "threat": "threat", "learned": "learned threat", "shard": "shard",
        "chunk": "chunk"}


def stage_map() -> str:
    """README's map of the DAG, from STAGES: each stage (the Snakemake rule and the DVC stage of the same
    name) with its module, what one job is, the params it reads and what it writes."""
    lines = [MAP_BEGIN, "<!-- generated by `python -m pipeline.dag map` from pipeline/dag.py; do not edit -->", "",
             "| stage | module | one job per | params.yaml | writes |", "|---|---|---|---|---|"]
    for stage in STAGES.values():
        module = " ".join(word for word in str(stage.cmd[0]).split()[2:] if not word.endswith(".yaml"))
        jobs = " × ".join(JOBS[axis] for axis in stage.axes) or "-"
        if any(axis in PER_ITEM for axis in stage.axes):
            jobs += " (DVC: all in one)"
        if not stage.snakemake:
            jobs += " (DVC only)"
        sections: dict[str, list[str]] = {}
        for key in stage.params:
            section, _, rest = key.partition(".")
            sections.setdefault(section, []).append(rest)
        read = "all" if len(sections) == len(SECTIONS) else ", ".join(
            section if "" in keys else f"{section} ({', '.join(keys)})" for section, keys in sections.items())
        written = ", ".join(f"`{fill_map(path)}`" for path in (*stage.outs, *stage.metrics, *stage.plots))
        lines.append(f"| {stage.name} | `{module}` | {jobs} | {read or '-'} | {written} |")
    return "\n".join([*lines, MAP_END])


def fill_map(path: str | Files) -> str:
    """A written path for the map: a folder with its files' names, `${section.key}` as `{key}`."""
    text = path if isinstance(path, str) else f"{path.folder}/{'|'.join(path.names)}"
    return re.sub(r"\$\{[\w]+\.([\w]+)\}", r"{\1}", text)


def rendered(path: Path, cfg: dict[str, Any]) -> str:
    """The text of a generated file: the Snakemake rules (`.smk`, from the table alone) or dvc.yaml."""
    if path.suffix == ".smk":
        from pipeline import snakemake_rules
        return snakemake_rules.render()
    return render(cfg)


def stale(path: Path, cfg: dict[str, Any]) -> str:
    """A diff of the file at `path` against what the table and `cfg` give; empty when up to date."""
    current, text = (path.read_text() if path.exists() else ""), rendered(path, cfg)
    return "".join(difflib.unified_diff(current.splitlines(True), text.splitlines(True), str(path), "pipeline/dag.py"))


def write(path: Path, cfg: dict[str, Any]) -> None:
    path.write_text(rendered(path, cfg))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.dag", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (("dvc", "print dvc.yaml"), ("rules", "print rules/stages.smk"),
                       ("map", "print README's stage map, or write it into --readme")):
        printing = commands.add_parser(name, help=text)
        printing.add_argument("--params", type=Path, default=Path("params.yaml"))
        if name == "map":
            printing.add_argument("--readme", type=Path, help="replace the map between its markers in this file")
    for name, text in (("write", "write dvc.yaml or rules/stages.smk"),
                       ("check", "exit 1 when dvc.yaml or rules/stages.smk differs from the table")):
        command = commands.add_parser(name, help=text)
        command.add_argument("path", type=Path, nargs="?", default=Path("dvc.yaml"))
        command.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args(argv)
    try:
        cfg = params_mod.load(args.params)
    except params_mod.ParamsError as error:
        sys.exit(f"error: {error}")
    if args.command == "map" and args.readme:
        text = args.readme.read_text()
        start, end = text.index(MAP_BEGIN), text.index(MAP_END) + len(MAP_END)
        args.readme.write_text(text[:start] + stage_map() + text[end:])
        print(f"{args.readme}: stage map written from pipeline/dag.py")
    elif args.command == "map":
        print(stage_map())
    elif args.command in ("dvc", "rules"):
        sys.stdout.write(rendered(Path("dvc.yaml" if args.command == "dvc" else "rules/stages.smk"), cfg))
    elif args.command == "write":
        write(args.path, cfg)
        print(f"{args.path}: written from pipeline/dag.py" + ("" if args.path.suffix == ".smk"
                                                            else f" and the runs of {args.params}"))
    else:
        diff = stale(args.path, cfg)
        if diff:
            sys.stdout.write(diff)
            sys.exit(f"{args.path} differs from pipeline/dag.py" + ("" if args.path.suffix == ".smk" else
                     f" and {args.params}") + f": run `python -m pipeline.dag write {args.path}`")
        print(f"{args.path}: up to date")


if __name__ == "__main__":
    main()
