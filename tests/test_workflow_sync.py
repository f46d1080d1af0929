"""Snakefile and dvc.yaml describe the same DAG, from one table (pipeline/dag.py).

dvc.yaml and rules/stages.smk are the table rendered (regenerate and diff); every rule is a stage of the
table; every path a command names is declared; every stage declares exactly the params keys it reads, in
both tools; and the two tools plan the same stage modules and outputs. Granularity may differ (Snakemake
has one job per shard, DVC one stage per generator writing the shard directory), so a Snakemake output
counts as matched when it equals a DVC output or lies inside one.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from pipeline import dag, snakemake_rules
from pipeline import params as P
from tests.helpers import BIN, REPO, env, make_workdir, save_params
from tests.params_reads import Reads, mismatches, stage_reads

MODULE = re.compile(r"python -m (pipeline\.\w+(?: grid| summary| chunk| sweep| merge)?)")
COMMITTED = P.load(REPO / "params.yaml")


# --- dvc.yaml is generated from the table ---


def test_dvc_yaml_is_the_rendered_stage_table():
    committed, generated = (REPO / "dvc.yaml").read_text(), dag.render(COMMITTED)
    diff = "".join(difflib.unified_diff(committed.splitlines(True), generated.splitlines(True),
                                        "dvc.yaml", "pipeline/dag.py"))
    assert committed == generated, f"run `python -m pipeline.dag write dvc.yaml`:\n{diff}"


def test_rendered_yaml_is_the_stanzas():
    """The hand-written emitter (comments, folded commands) says what the stanzas say."""
    assert yaml.safe_load(dag.render(COMMITTED)) == {"stages": {s.name: s.body for s in dag.stanzas(COMMITTED)}}


def test_snakemake_rules_are_the_rendered_stage_table():
    """Editing rules/stages.smk by hand (a rule losing an input, a flag) fails here."""
    committed, generated = (REPO / "rules" / "stages.smk").read_text(), snakemake_rules.render()
    diff = "".join(difflib.unified_diff(committed.splitlines(True), generated.splitlines(True),
                                        "rules/stages.smk", "pipeline/dag.py"))
    assert committed == generated, f"run `python -m pipeline.dag write rules/stages.smk`:\n{diff}"


def test_every_rule_is_a_stage_and_takes_its_params_from_the_table():
    """One rule per stage (check_params is DVC's: Snakemake validates when it parses), no hand-written rule
    besides `all`; a rule whose command reads params.yaml declares the table's keys for its stage."""
    rules = {}
    for path in [REPO / "Snakefile", *sorted((REPO / "rules").glob("*.smk"))]:
        for block in re.split(r"^rule ", path.read_text(), flags=re.MULTILINE)[1:]:
            name, _, body = block.partition(":")
            rules[name.strip()] = (path.name, body)
    assert {name: path for name, (path, _) in rules.items()} == \
        {"all": "Snakefile", **{name: "stages.smk" for name, stage in dag.STAGES.items() if stage.snakemake}}
    for name, (_, body) in rules.items():
        declared = re.findall(r"^\s+cfg=(.*),$", body, flags=re.MULTILINE)
        assert declared == ([f'stage_params("{name}")'] if "--params" in body else []), name


PATH = re.compile(r"^(data|models|results|work|logs)/")


@pytest.mark.parametrize("name", sorted(dag.STAGES))
def test_every_path_a_command_names_is_declared(name):
    """A stage's command reads and writes only files it declares (or the folder of declared files, to a
    `-dir` flag; workdirs, resume state, excepted):
    deleting an input from the table leaves its path in the command and fails here; the rules and
    dvc.yaml are written from the table, so neither tool can run a command on an undeclared file."""
    stage = dag.STAGES[name]
    declared = set()
    for entry in (*stage.deps, *stage.outs, *stage.metrics, *stage.plots):
        entry = entry.text if isinstance(entry, dag.FromGenerated) else entry
        if isinstance(entry, dag.Files):
            declared |= {entry.folder, *(f"{entry.folder}/{member}" for member in entry.names)}
        elif isinstance(entry, dag.Dynamic):
            declared.add(entry.dvc)
        else:
            declared.add(entry)
    for part in stage.cmd[1:]:
        text = part.text if isinstance(part, dag.FromGenerated) else part
        flag, _, value = str(text).partition(" ")
        inside = flag.endswith("-dir") and any(path.startswith(value + "/") for path in declared)
        if PATH.match(value) and flag not in ("--workdir", "--ensure-dir") and not inside:
            assert value in declared, f"{name}: {flag} {value} is not among the stage's inputs and outputs"


def test_an_undeclared_input_is_caught(monkeypatch):
    """The check above fails when an input is dropped (evaluate_sweep without the test set)."""
    stage = dag.STAGES["evaluate_sweep"]
    monkeypatch.setitem(dag.STAGES, "evaluate_sweep",
                        dataclasses.replace(stage, deps=tuple(d for d in stage.deps if d != f"{dag.DATA}/test.h5")))
    with pytest.raises(AssertionError, match="--test"):
        test_every_path_a_command_names_is_declared("evaluate_sweep")


def test_check_params_and_table_declare_every_section():
    """check_params validates every section; the table hashes them all into each row."""
    sections = tuple(P.load_schema()["properties"])
    assert dag.SECTIONS == sections
    assert dag.STAGES["check_params"].params == dag.STAGES["table"].params == sections


def test_job_params_keep_the_shape_snakemake_recorded(tiny_params):
    """Snakemake reruns a job when its params' repr changes: a run's train_robust stays one merged section,
    a generator's train_generator entry its own."""
    cfg = tiny_params
    run = f"baseline-{cfg['variants']['names'][0]}"
    assert dag.job_params("train_robust", cfg, {"run": run}) == \
        {"base": cfg["base"], "train_robust": P.train_robust_for(cfg, run)}
    assert dag.job_params("threat_model", cfg, {"run": run}) == \
        {"train_robust": {"threat": P.train_robust_for(cfg, run)["threat"]}}
    assert dag.job_params("train_generator", cfg, {"generator": "ddpm"}) == \
        {"base": cfg["base"], "train_generator": {"ddpm": cfg["train_generator"]["ddpm"]}}
    assert list(dag.job_params("evaluate", cfg, {"run": "baseline", "threat": "linf"})["evaluate"]) == \
        [key for key in cfg["evaluate"] if key not in ("threats", "learned_threats")]
    # a chunk's results do not depend on n_eval (nor on the sweep or the check thresholds): raising it runs
    # only the new chunks' jobs, and the merge
    chunk = dag.job_params("evaluate_chunk", cfg, {"run": "baseline", "threat": "linf", "chunk": "00001"})
    assert set(chunk["evaluate"]) == {"checkpoint", "eps_255", "batch_size", "chunk_size", "version", "pgd_steps"}
    assert "n_eval" not in dag.job_params("evaluate_sweep", cfg, {"run": "baseline", "threat": "linf"})["evaluate"]


# --- both tools plan the same jobs from the same params ---


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """The test-scale params with every optional part of the DAG switched on: every generator (but
    import, which needs a file), both norm threats, the learned cvae threat (evaluated, and trained in by
    the latent_at variant), the variants of tests/params.yaml, and two evaluation chunks per run and
    threat. The DVC config is the committed one."""
    path = make_workdir(tmp_path_factory.mktemp("sync"))
    cfg = yaml.safe_load((path / "params.yaml").read_text())
    cfg["evaluate"]["chunk_size"] = cfg["evaluate"]["n_eval"] // 2
    cfg["generate"]["generators"] = ["gaussian", "ddpm", "cvae"]
    cfg["evaluate"]["threats"] = ["linf", "l2"]
    cfg["evaluate"]["learned_threats"] = ["cvae"]
    cfg["variants"]["names"] = [*cfg["variants"]["names"], "latent_at"]   # runs trained in the cvae set
    save_params(path, cfg)
    subprocess.run(["git", "init", "-q"], cwd=path, check=True)
    return path


def snakemake_jobs(workdir: Path) -> tuple[set[str], set[str]]:
    """(stage modules, output files) of the full Snakemake DAG from a dry run."""
    result = subprocess.run([str(BIN / "snakemake"), "-n", "-p", "--forceall", "results/cifar10_table.csv"],
                            cwd=workdir, env=env(), capture_output=True, text=True, check=True)
    modules = set(MODULE.findall(result.stdout))
    summary = subprocess.run([str(BIN / "snakemake"), "--summary", "results/cifar10_table.csv"],
                             cwd=workdir, env=env(), capture_output=True, text=True, check=True)
    outputs = {line.split("\t")[0] for line in summary.stdout.splitlines()[1:] if line.strip()}
    return modules, outputs


@dataclass(frozen=True)
class DvcStage:
    """One stage of dvc.yaml as DVC resolves it for the workdir's params."""
    name: str
    cmd: str
    deps: tuple[str, ...]
    outs: tuple[str, ...]
    params: tuple[str, ...]

    @property
    def stage(self) -> dag.Stage:
        return dag.STAGES[self.name.split("@")[0]]


@pytest.fixture(scope="module")
def dvc_stages(workdir) -> list[DvcStage]:
    from dvc.repo import Repo

    stages = []
    with Repo(str(workdir)) as repo:
        for stage in repo.index.stages:
            params = tuple(key for dep in stage.deps if hasattr(dep, "params") for key in (dep.params or []))
            deps = tuple(str(Path(dep.fs_path).relative_to(workdir)) for dep in stage.deps
                         if not hasattr(dep, "params"))
            outs = tuple(str(Path(out.fs_path).relative_to(workdir)) for out in stage.outs)
            stages.append(DvcStage(stage.name, stage.cmd, deps, outs, params))
    return stages


@pytest.mark.slow
def test_same_stage_modules(workdir, dvc_stages):
    snake_modules, _ = snakemake_jobs(workdir)
    dvc_modules = {MODULE.search(stage.cmd).group(1) for stage in dvc_stages}
    assert dvc_modules - {"pipeline.params"} == snake_modules


@pytest.mark.slow
def test_same_outputs(workdir, dvc_stages):
    _, snake_outputs = snakemake_jobs(workdir)
    dvc_outputs = {out for stage in dvc_stages for out in stage.outs}
    dvc_outputs.discard("work/params.ok")  # DVC's parse-time validation stamp (Snakemake validates in-process)

    def covered(path: str, by: set[str]) -> bool:
        return any(path == other or path.startswith(other.rstrip("/") + "/") for other in by)

    assert sorted(p for p in snake_outputs if not covered(p, dvc_outputs)) == []
    assert sorted(p for p in dvc_outputs if not any(s == p or s.startswith(p + "/") for s in snake_outputs)) == []
    # Snakemake attacks each evaluation chunk in its own job; DVC's chunk stage writes the same folder
    cfg = P.load(workdir / "params.yaml")
    chunks = sorted(p for p in snake_outputs if re.fullmatch(r"results/evaluate/[^/]+/\w+/chunks/chunk-\d{5}\.h5", p))
    assert P.eval_chunk_count(cfg["evaluate"]) == 2
    assert len(chunks) == len(P.runs(cfg)) * len(cfg["evaluate"]["threats"]) * 2, chunks


# --- every stage declares exactly the params keys it reads ---


@dataclass(frozen=True)
class Job:
    """One job: the keys it declares, the lists it is an item of (exempt), and what its command read."""
    label: str
    declared: tuple[str, ...]
    exempt: tuple[str, ...]
    reads: Reads

    def problems(self, declared: list[str] | None = None) -> list[str]:
        found = mismatches(self.reads, self.declared if declared is None else declared, self.exempt)
        return [f"{self.label}: {problem}" for problem in found]


@pytest.fixture(scope="module")
def reads_of(workdir, tmp_path_factory) -> Callable[[str, tuple[str, ...]], Reads]:
    """What a command reads from the workdir's params; remembered, as both tools run many of the same."""
    cache: dict[tuple[str, tuple[str, ...]], Reads] = {}

    def reads(cmd: str, deps: tuple[str, ...]) -> Reads:
        if (cmd, deps) not in cache:
            cache[cmd, deps] = stage_reads(cmd, deps, workdir / "params.yaml", tmp_path_factory.mktemp("reads"))
        return cache[cmd, deps]
    return reads


@pytest.fixture(scope="module")
def dvc_jobs(dvc_stages, reads_of) -> list[Job]:
    """Every resolved DVC stage but check_params (it reads every key, through validation; see
    test_check_params_and_table_declare_every_section)."""
    return [Job(f"dvc stage {stage.name}", stage.params, dag.axis_keys(stage.stage, dvc=True),
                reads_of(stage.cmd, stage.deps))
            for stage in dvc_stages if stage.stage.name != "check_params"]


@pytest.fixture(scope="module")
def snakemake_jobs_reads(workdir, reads_of) -> list[Job]:
    """Every Snakemake job's keys (dag.job_keys, which `stage_params` resolves) against what the job's
    command reads. The command is the table's, filled for the job: the rules spell out the same flags
    (one shard where DVC passes the folder, which reads the same keys; one run where DVC's threat_model
    passes `all`). A variant's settings are read as the run's train_robust, which is how the rule
    declares them."""
    cfg = P.load(workdir / "params.yaml")
    jobs = []
    for stage in dag.STAGES.values():
        if stage.name == "check_params":
            continue
        for wildcards in job_wildcards(stage, cfg):
            reads = reads_of(" ".join(job_parts(stage.cmd, wildcards, cfg)), job_parts(stage.deps, wildcards, cfg))
            variant = P.get_run(cfg, wildcards["run"]).variant if "run" in wildcards else None
            if variant:
                reads = reads.renamed(("variants", "settings", variant), ("train_robust",))
            jobs.append(Job(f"snakemake {stage.name} {wildcards}", dag.job_keys(stage.name, wildcards),
                            dag.axis_keys(stage), reads))
    return jobs


def job_wildcards(stage: dag.Stage, cfg: dict) -> list[dict[str, str]]:
    """The wildcards of every Snakemake job of a stage."""
    values = {"generator": P.generators(cfg), "run": P.runs(cfg), "threat": cfg["evaluate"]["threats"],
              "learned": cfg["evaluate"]["learned_threats"],
              "shard": [f"{i:05d}" for i in range(P.shard_count(cfg))],
              "chunk": [f"{i:05d}" for i in range(P.eval_chunk_count(cfg["evaluate"]))]}
    jobs: list[dict[str, str]] = [{}]
    for axis in stage.axes:
        jobs = [{**job, axis: value} for job in jobs for value in values[axis]]
    return jobs


def job_parts(parts: tuple[dag.Part | dag.Dep, ...], wildcards: dict[str, str], cfg: dict) -> tuple[str, ...]:
    """Command parts or inputs of the table for one job, `${section.key}` filled from params as DVC does.
    A run's `{generator}` is the generator it trains on; the baseline has no generated inputs."""
    source = P.get_run(cfg, wildcards["run"]).generator if "run" in wildcards else None
    generated = source is not None
    values = {**wildcards, "generator": str(source)} if generated else wildcards
    kept = [dag.dvc_path(part.text) if isinstance(part, dag.FromGenerated)
            else part.dvc if isinstance(part, dag.Dynamic) else dag.dvc_path(part) for part in parts
            if (generated or not isinstance(part, dag.FromGenerated)) and not (isinstance(part, dag.Dynamic)
                                                                              and not part.dvc)]
    return tuple(re.sub(r"\$\{([\w.]+)\}", lambda match: str(lookup(cfg, match.group(1))), dag.fill(part, values))
                 for part in kept)


def lookup(cfg: dict, key: str) -> object:
    value: object = cfg
    for part in key.split("."):
        value = value[part]   # type: ignore[index]
    return value


@pytest.mark.slow
def test_each_dvc_stage_declares_the_keys_it_reads(dvc_jobs):
    problems = [problem for job in dvc_jobs for problem in job.problems()]
    assert not problems, "\n".join(problems[:30])


@pytest.mark.slow
def test_each_snakemake_job_declares_the_keys_it_reads(snakemake_jobs_reads):
    problems = [problem for job in snakemake_jobs_reads for problem in job.problems()]
    assert not problems, "\n".join(problems[:30])


@pytest.mark.slow
def test_removing_any_declared_key_is_caught(dvc_jobs, snakemake_jobs_reads):
    """Each declared key is needed: without it the job reads something it does not declare, so removing a
    key from the table (or from dvc.yaml) fails the tests above."""
    unnoticed = [f"{job.label}: without {key}" for job in [*dvc_jobs, *snakemake_jobs_reads]
                 for key in job.declared if not job.problems([k for k in job.declared if k != key])]
    assert unnoticed == []


@pytest.mark.slow
def test_every_snakemake_job_runs_torch_on_its_own_threads(workdir):
    """Each job's command caps OpenMP/MKL at the job's `threads` (concurrent jobs would oversubscribe the
    cores otherwise), and a job asking for more threads than `--cores` gets the cores it was given."""
    result = subprocess.run([str(BIN / "snakemake"), "-n", "-p", "--forceall", "--cores", "3",
                             "results/cifar10_table.csv"], cwd=workdir, env=env(), capture_output=True, text=True,
                            check=True)
    commands = [line.strip().removeprefix("Shell command: ") for line in result.stdout.splitlines()
                if "-m pipeline." in line]
    assert commands
    for command in commands:
        threads = re.match(r"OMP_NUM_THREADS=(\d+) MKL_NUM_THREADS=(\d+) ", command)
        assert threads and threads.group(1) == threads.group(2), command
        assert 1 <= int(threads.group(1)) <= 3, command
    assert any(c.startswith("OMP_NUM_THREADS=3 ") and "pipeline.train_robust" in c for c in commands)


@pytest.mark.slow
def test_both_tools_plan_every_seed_and_amount_run(tmp_path):
    """variants.seeds and variants.amounts are DAG axes: one training and one evaluation job per run of the
    table, the generator's data sampled, labelled and selected once for all of its runs; dvc.yaml, written
    for the same params, plans the same runs (its stage names are the run names)."""
    from dvc.repo import Repo

    path = make_workdir(tmp_path)
    cfg = yaml.safe_load((path / "params.yaml").read_text())
    cfg["generate"]["generators"] = ["gaussian"]
    cfg["variants"].update(names=[], amounts=[10, 20], seeds=[0, 1, 2])
    save_params(path, cfg)
    plan = subprocess.run([str(BIN / "snakemake"), "-n", "-p", "--forceall", "results/cifar10_table.csv"],
                          cwd=path, env=env(), capture_output=True, text=True, check=True).stdout
    trained = set(re.findall(r"--run (\S+)", " ".join(line for line in plan.splitlines() if "train_robust" in line)))
    assert trained == {"baseline", "baseline-s1", "baseline-s2", "gaussian", "gaussian-s1", "gaussian-s2",
                       "gaussian-n10", "gaussian-n10-s1", "gaussian-n10-s2", "gaussian-n20", "gaussian-n20-s1",
                       "gaussian-n20-s2"}
    assert plan.count("python -m pipeline.select") == 1
    assert len(re.findall(r"pipeline.evaluate merge", plan)) == len(trained)
    subprocess.run(["git", "init", "-q"], cwd=path, check=True)
    with Repo(str(path)) as repo:
        stages = {stage.name for stage in repo.index.stages}
    assert {name.split("@")[1] for name in stages if name.startswith("train_robust@")} == trained
    assert {name.split("@")[1] for name in stages if name.startswith("evaluate@")} == {f"{run}-linf" for run in trained}


def test_readmes_stage_map_is_the_one_generated_from_the_table():
    """README's map of stages, modules, jobs, params and outputs is `python -m pipeline.dag map`."""
    readme = (REPO / "README.md").read_text()
    start, end = readme.index(dag.MAP_BEGIN), readme.index(dag.MAP_END) + len(dag.MAP_END)
    assert readme[start:end] == dag.stage_map(), "run `python -m pipeline.dag map --readme README.md`"


def test_chunk_and_sweep_jobs_read_exactly_the_keys_the_table_declares():
    """pipeline/evaluate.py's ChunkConfig and SweepConfig (the views a chunk or sweep job builds) are the
    table's CHUNK_KEYS and SWEEP_KEYS, typed as their declarations in EvaluateConfig."""
    from typing import get_type_hints

    from pipeline import config
    from pipeline import evaluate as E

    declared = get_type_hints(config.EvaluateConfig)
    for view, keys in ((E.ChunkConfig, dag.CHUNK_KEYS), (E.SweepConfig, dag.SWEEP_KEYS)):
        assert tuple(f"evaluate.{field.name}" for field in dataclasses.fields(view)) == keys
        assert get_type_hints(view) == {name: declared[name] for name in get_type_hints(view)}
