"""The effect study's kept results (configs/effect.yaml, docs/effect.md): collect a study's small outputs
into the repository, attack a subset with standard AutoAttack, and regenerate the summary, the figure and
its sections in docs/results.md and README.md from what was collected.

    python -m pipeline.effect_report gap WORKDIR        # standard AutoAttack on the first images, seed-0 runs
    python -m pipeline.effect_report last WORKDIR       # the study's attack on every run's last checkpoint
    python -m pipeline.effect_report collect WORKDIR    # WORKDIR's finished runs -> results/effect/
    python -m pipeline.effect_report write              # summary.csv, figures/effect.png, the two sections
    python -m pipeline.effect_report targets WORKDIR    # evaluations and analyses results/effect/ lacks

`collect` copies, for every run params defines whose evaluation has finished, its evaluation (JSON and
per-example HDF5), training metrics and curve and the evaluated model (a small CNN: under 300 kB), the
second looks (`gap`; `last` and the last checkpoint it attacked), the teacher's metrics, the generators'
analysis, Snakemake's per-job benchmarks and the params the study ran with; provenance.json records the
commit and the params' sha256, and a collection from other params is refused (results of two studies
never mix). Run it as often as runs finish: a study cut short keeps what it finished, and `targets` lists
the evaluations still missing from results/effect/, so a fresh checkout redoes the shared stages (seeded:
the same bytes on the same kind of device) and trains only the runs not yet kept. `write` reads only
results/effect/: the numbers in docs/results.md and README.md come from there, never typed in.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import logging
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from pipeline import effect
from pipeline import params as params_mod
from pipeline.provenance import changed_files, git_commit, params_sha256
from pipeline.shards import atomic_path, read_arrays

log = logging.getLogger("pipeline.effect_report")
RESULTS = Path("results/effect")
FIGURE = Path("results/figures/effect.png")
README = Path("README.md")
RESULTS_DOC = Path("docs/results.md")
BEGIN, END = "<!-- effect-study:begin -->", "<!-- effect-study:end -->"                 # docs/results.md
HEADLINE_BEGIN, HEADLINE_END = "<!-- effect-headline:begin -->", "<!-- effect-headline:end -->"   # README.md
GAP_N_EVAL = 100   # test images standard AutoAttack attacks per gap run (minutes each for a small CNN on a CPU)


class ReportError(ValueError):
    """A study folder or kept results that cannot be collected or reported; the message names the file."""


def provenance(workdir: Path) -> dict[str, Any]:
    """The commit the study ran from ('-dirty': with `changed_files`, params.yaml and dvc.yaml for a preset)
    and the sha256 of the params it ran with, as the table stamps its rows."""
    return {"commit": git_commit(workdir), "changed_files": changed_files(workdir),
            "params_sha256": params_sha256(params_mod.load(workdir / "params.yaml"))}


def _copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)


def finished_runs(workdir: Path, cfg: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(runs params defines, those with every threat's evaluation and their training metrics written)."""
    planned = params_mod.runs(cfg)
    threats = cfg["evaluate"]["threats"]
    done = [run for run in planned
            if (workdir / "results" / "train_robust" / run / "metrics.json").exists()
            and all((workdir / "results" / "evaluate" / run / f"{t}.json").exists() for t in threats)]
    return planned, done


STAMP = re.compile(r"^\[(\w{3} \w{3} +\d+ \d\d:\d\d:\d\d \d{4})\]$")
JOB_START = re.compile(r"^Job (\d+):")
JOB_END = re.compile(r"^Finished jobid: (\d+) \(Rule: ([\w-]+)\)")
JOB_LOG = re.compile(r"^Shell command: .* 2> (\S+\.log)\s*$")
JOB_FIELDS = ["log", "rule", "jobid", "job_log", "start", "end", "seconds"]


def snakemake_jobs(workdir: Path) -> list[dict[str, Any]]:
    """Every finished job of the Snakemake logs in WORKDIR/.snakemake/log/: its rule, its own log file (which
    names its benchmark) and the wall seconds between the times Snakemake printed when it started and
    finished it (the only cost record of a job without a benchmark)."""
    jobs = []
    for path in sorted((Path(workdir) / ".snakemake" / "log").glob("*.log")):
        stamp, started, job_logs, current = None, {}, {}, None
        for line in path.read_text(errors="replace").splitlines():
            if match := STAMP.match(line):
                stamp = datetime.datetime.strptime(" ".join(match.group(1).split()), "%a %b %d %H:%M:%S %Y")
            elif (match := JOB_START.match(line)) and stamp is not None:
                current = match.group(1)
                started[current] = stamp
            elif (match := JOB_LOG.match(line)) and current is not None:
                job_logs[current] = match.group(1)
            elif (match := JOB_END.match(line)) and stamp is not None and match.group(1) in started:
                start = started.pop(match.group(1))
                jobs.append({"log": path.name, "rule": match.group(2), "jobid": int(match.group(1)),
                             "job_log": job_logs.pop(match.group(1), ""), "start": start.isoformat(),
                             "end": stamp.isoformat(), "seconds": (stamp - start).total_seconds()})
    return jobs


def collect(workdir: Path, out: Path = RESULTS) -> dict[str, Any]:
    """Copy the finished runs' small outputs of `workdir` into `out`; the provenance written."""
    workdir = Path(workdir)
    cfg = params_mod.load(workdir / "params.yaml")
    origin = provenance(workdir)
    kept = out / "provenance.json"
    if kept.exists():
        previous = json.loads(kept.read_text())
        if previous["params_sha256"] != origin["params_sha256"]:
            raise ReportError(f"{kept}: collected from params {previous['params_sha256'][:12]}, but "
                              f"{workdir}/params.yaml is {origin['params_sha256'][:12]}; move {out} away to "
                              "start another study")
    planned, done = finished_runs(workdir, cfg)
    results = workdir / "results"
    files = [results / "teacher" / "metrics.json", *sorted((results / "analysis").glob("*.json")),
             *sorted((workdir / "benchmarks").rglob("*.tsv")), *sorted((results / "gap").glob("*/*.json")),
             *sorted((results / "gap").glob("*/*.h5")), *sorted((results / "last").glob("*/*.json")),
             *sorted((results / "last").glob("*/*.h5"))]
    checkpoint = cfg["evaluate"]["checkpoint"]
    for run in done:
        files += [results / "train_robust" / run / "metrics.json", results / "train_robust" / run / "curve.csv",
                  workdir / "models" / "robust" / run / f"{checkpoint}.pt"]
        if (results / "last" / run).is_dir():   # the model `last` evaluated
            files.append(workdir / "models" / "robust" / run / "last.pt")
        for threat in cfg["evaluate"]["threats"]:
            files += [results / "evaluate" / run / f"{threat}.json", results / "evaluate" / run / f"{threat}.h5"]
    for source in files:
        if source.exists():
            _copy(source, out / source.relative_to(results if source.is_relative_to(results) else workdir))
    _copy(workdir / "params.yaml", out / "params.yaml")
    jobs = snakemake_jobs(workdir)
    with atomic_path(out / "jobs.csv") as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, JOB_FIELDS)
        writer.writeheader()
        writer.writerows(jobs)
    record = {**origin, "runs_planned": planned, "runs_collected": done, "n_planned": len(planned),
              "n_collected": len(done)}
    with atomic_path(kept) as tmp:
        tmp.write_text(json.dumps(record, indent=1) + "\n")
    log.info("%d of %d runs collected from %s into %s", len(done), len(planned), workdir, out)
    return record


def missing_targets(workdir: Path, kept: Path = RESULTS) -> list[str]:
    """What `kept` lacks, as targets relative to `workdir`: the evaluation JSONs of the runs params defines
    and the generators' analysis (their FID)."""
    cfg = params_mod.load(Path(workdir) / "params.yaml")
    evaluations = [f"results/evaluate/{run}/{threat}.json" for run in params_mod.runs(cfg)
                   for threat in cfg["evaluate"]["threats"]
                   if not (kept / "evaluate" / run / f"{threat}.json").exists()]
    return evaluations + [f"results/analysis/{generator}.json" for generator in params_mod.generators(cfg)
                          if not (kept / "analysis" / f"{generator}.json").exists()]


# --- second looks at the kept models: declared in docs/effect.md, reported beside the study's own numbers ---


def gap_runs(cfg: dict[str, Any]) -> list[str]:
    """The seed-0 run of each arm on all its images (baseline, each generator): one model per arm."""
    return [run.name for run in params_mod.run_table(cfg)
            if run.seed == cfg["variants"]["seeds"][0] and run.amount is None and run.variant is None]


def attack_runs(workdir: Path, runs: list[str], overlay: dict[str, Any], name: str) -> list[Path]:
    """Evaluate each run's model with the study's `evaluate:` settings changed by `overlay`, through the
    evaluate stage (resumable per chunk), into WORKDIR/results/<name>/<run>/<threat>.json and .h5; runs
    already done or not yet trained are skipped (rerun it as runs finish)."""
    workdir = Path(workdir)
    cfg = params_mod.load(workdir / "params.yaml")
    evaluate = {**cfg["evaluate"], **overlay}
    params_path = workdir / "work" / name / "params.yaml"
    params_path.parent.mkdir(parents=True, exist_ok=True)
    params_path.write_text(yaml.safe_dump(params_mod.validate({**cfg, "evaluate": evaluate})))
    written = []
    for run in runs:
        model = workdir / "models" / "robust" / run / f"{evaluate['checkpoint']}.pt"
        for threat in cfg["evaluate"]["threats"]:
            out = workdir / "results" / name / run / f"{threat}.json"
            if out.exists() or not model.exists():
                continue
            subprocess.run([sys.executable, "-m", "pipeline.evaluate", "--params", str(params_path), "--run", run,
                            "--model", str(model), "--test", str(workdir / "data" / cfg["base"]["dataset"] / "test.h5"),
                            "--threat", threat, "--workdir", str(workdir / "work" / name / run / threat),
                            "--out", str(out), "--out-examples", str(out.with_suffix(".h5"))], check=True)
            written.append(out)
    return written


def gap(workdir: Path, n_eval: int = GAP_N_EVAL) -> list[Path]:
    """Standard AutoAttack on the first `n_eval` test images of each arm's seed-0 model: how far the study's
    cheaper attack overstates robust accuracy (results/gap/)."""
    cfg = params_mod.load(Path(workdir) / "params.yaml")
    overlay = {"version": "standard", "n_eval": n_eval, "chunk_size": n_eval, "n_sweep": min(20, n_eval)}
    return attack_runs(workdir, gap_runs(cfg), overlay, "gap")


def last(workdir: Path) -> list[Path]:
    """The study's attack on every run's last checkpoint (results/last/): the end of the equal training
    budget, free of best.pt's selection on the small validation split (docs/effect.md)."""
    cfg = params_mod.load(Path(workdir) / "params.yaml")
    return attack_runs(workdir, params_mod.runs(cfg), {"checkpoint": "last"}, "last")


def gap_rows(results: Path) -> list[dict[str, Any]]:
    """Per gap run: standard AutoAttack and the study's attack on the same first images."""
    rows = []
    for path in sorted((results / "gap").glob("*/*.json")):
        run, threat = path.parent.name, path.stem
        standard = read_arrays(path.with_suffix(".h5"))
        study = read_arrays(results / "evaluate" / run / f"{threat}.h5")
        n = len(standard["index"])
        if list(study["index"][:n]) != list(standard["index"]):
            raise ReportError(f"{path}: not the first test images of {run}'s evaluation")
        rows.append({"run": run, "threat": threat, "n": n,
                     "study_attack": effect.attack_name(json.loads((results / "evaluate" / run / f"{threat}.json")
                                                                   .read_text())["attack"]["attacks"]),
                     "study_acc": float(study["aa_correct"][:n].mean()),
                     "autoattack_acc": float(standard["aa_correct"].mean())})
    return rows


# --- the sections of docs/results.md and README.md ---


def job_hours(results: Path) -> dict[str, tuple[float, float]]:
    """Snakemake's per-job (wall, CPU) seconds summed by rule (benchmarks/<rule>/...), in hours."""
    hours: dict[str, tuple[float, float]] = {}
    for path in (results / "benchmarks").rglob("*.tsv"):
        rule = path.relative_to(results / "benchmarks").parts[0].removesuffix(".tsv")
        with open(path) as handle:
            rows = list(csv.DictReader(handle, delimiter="\t"))
        wall, cpu = hours.get(rule, (0.0, 0.0))
        hours[rule] = (wall + sum(float(row["s"]) for row in rows) / 3600,
                       cpu + sum(float(row.get("cpu_time") or 0) for row in rows) / 3600)
    return dict(sorted(hours.items()))


def core_hours(results: Path) -> dict[str, float]:
    """Per Snakemake rule, the hours of one core its jobs took: a job's CPU time where its benchmark was kept
    (benchmarks/ mirrors logs/), else its wall time from Snakemake's log (jobs.csv; every job runs on one
    thread, so that bounds its CPU time). Without jobs.csv, the benchmarks alone, by folder."""
    if not (results / "jobs.csv").exists():
        return {rule: cpu for rule, (_, cpu) in job_hours(results).items()}
    hours: dict[str, float] = {}
    used: set[Path] = set()
    with open(results / "jobs.csv", newline="") as handle:
        jobs = list(csv.DictReader(handle))
    for row in reversed(jobs):   # a job run twice: its benchmark holds the last run
        seconds = float(row["seconds"])
        if row["job_log"].startswith("logs/"):
            benchmark = results / "benchmarks" / Path(row["job_log"]).relative_to("logs").with_suffix(".tsv")
            if benchmark.exists() and benchmark not in used:
                used.add(benchmark)
                seconds = _cpu_seconds(benchmark)
        hours[row["rule"]] = hours.get(row["rule"], 0.0) + seconds / 3600
    for benchmark in (results / "benchmarks").rglob("*.tsv"):   # jobs the kept logs do not list: by folder
        if benchmark not in used:
            rule = benchmark.relative_to(results / "benchmarks").parts[0].removesuffix(".tsv")
            hours[rule] = hours.get(rule, 0.0) + _cpu_seconds(benchmark) / 3600
    return dict(sorted(hours.items()))


def _cpu_seconds(benchmark: Path) -> float:
    with open(benchmark) as handle:
        return sum(float(row.get("cpu_time") or row["s"]) for row in csv.DictReader(handle, delimiter="\t"))


def _missing(value: Any) -> bool:
    """A summary cell with no number: empty, None or NaN (no interval with one seed)."""
    return value in ("", None) or math.isnan(float(value))


def _pct(value: Any) -> str:
    return "" if _missing(value) else f"{100 * float(value):.1f}"


def _interval(row: dict[str, Any], name: str) -> str:
    mean, low, high = (row.get(f"{name}_{s}", "") for s in ("mean", "low", "high"))
    if _missing(mean):
        return ""
    return _pct(mean) if _missing(low) else f"{_pct(mean)} [{_pct(low)}, {_pct(high)}]"


def verdict(row: dict[str, Any]) -> str:
    """Whether the seed-paired interval of the robust difference excludes 0."""
    low, high = row.get("robust_diff_low", ""), row.get("robust_diff_high", "")
    if _missing(low) or _missing(high):
        return "no interval (one seed)"
    if float(low) > 0:
        return "above the baseline"
    if float(high) < 0:
        return "below the baseline"
    return "not distinguishable from the baseline"


def section(results: Path, rows: list[dict[str, Any]]) -> str:
    """docs/results.md's study section: the design in one line, the summary table with intervals, per arm
    what the paired interval says, the standard-AutoAttack gap, the teacher's and generators' quality, the
    cost."""
    origin = json.loads((results / "provenance.json").read_text())
    cfg = params_mod.load(results / "params.yaml")
    teacher = json.loads((results / "teacher" / "metrics.json").read_text()) \
        if (results / "teacher" / "metrics.json").exists() else {}
    attack = effect.ATTACK_LABELS.get(rows[0]["robust_attack"], rows[0]["robust_attack"])
    lines = [BEGIN, "<!-- generated by `python -m pipeline.effect_report write` from results/effect/; do not edit -->",
             "",
             f"Collected {origin['n_collected']} of the {origin['n_planned']} planned runs (commit "
             f"`{origin['commit'][:10]}`, params sha256 `{origin['params_sha256'][:12]}`, "
             "[results/effect/params.yaml](../results/effect/params.yaml)). "
             f"{int(cfg['data']['n_labelled']):,} labelled CIFAR-10 training images ({cfg['data']['val_size']} of "
             f"them for validation); the teacher's test accuracy {_pct(teacher.get('test_acc'))}%. Accuracies in % "
             f"on the first {int(rows[0]['n_eval']):,} test images, {rows[0]['threat']} eps "
             f"{float(rows[0]['eps_255']):g}/255, {attack} as the robust attack; mean over seeds with the 95% "
             "t-interval, and the difference to the real-data baseline paired by seed.", "",
             *table_lines(rows)]
    lines += ["", findings(rows)]
    last_rows, _, n_last = last_summary(results)
    if last_rows:
        lines += ["", f"The same attack on every run's last checkpoint (`effect_report last`: the end of the equal "
                  f"training budget, no selection on the {cfg['data']['val_size']} validation images; a second look "
                  "declared in docs/effect.md, the verdicts above stay the study's):", "", *table_lines(last_rows)]
    elif n_last:
        lines += ["", f"Last checkpoints evaluated so far: {n_last} of the {origin['n_collected']} collected runs."]
    gaps = gap_rows(results)
    if gaps:
        lines += ["", f"Standard AutoAttack on the first {gaps[0]['n']} test images of each arm's seed-0 model "
                  f"against {attack} on the same images: " + "; ".join(
                      f"{g['run']} {_pct(g['autoattack_acc'])} vs {_pct(g['study_acc'])}" for g in gaps) + "."]
    quality, space, reference = [], "", math.nan
    for path in sorted((results / "analysis").glob("*.json")):
        if path.stem not in params_mod.generators(cfg):   # mixup: the analysis' reference row, not an arm
            continue
        block = json.loads(path.read_text()).get("quality") or {}
        if block.get("generated", {}).get("fid") is not None:
            quality.append(f"{path.stem} {float(block['generated']['fid']):.4g}")
            space, reference = block["feature_label"], float(block["reference_test"]["fid"])
    if quality:
        lines += ["", f"Generator FID to the labelled training images in {space} (the real test set: "
                  f"{reference:.4g}): " + ", ".join(quality) + "."]
    hours = core_hours(results)
    if hours:
        total = sum(hours.values())
        lines += ["", f"Cost: {total:.2f} core-hours, so about {total / 2:.1f} hours on two idle cores (one thread "
                  "per job; a job's CPU time from its Snakemake benchmark, else its wall time from Snakemake's log, "
                  "results/effect/jobs.csv). By rule: " + ", ".join(f"{rule} {value:.2f}" for rule, value in
                                                                      hours.items() if value >= 0.005) + "."]
    lines.append(END)
    return "\n".join(lines)


def table_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The summary table: per arm and amount, clean and robust accuracy and the difference to the baseline."""
    robust = rows[0]["robust_attack"]
    attack = effect.ATTACK_LABELS.get(robust, robust)
    lines = [f"| arm | generated images | seeds | clean | {attack} | {attack} - baseline | McNemar p < 0.05 "
             "| verdict |",
             "|---|---:|---:|---|---|---|---:|---|"]
    for row in rows:
        baseline = row["arm"] == "none"
        lines.append(f"| {'real only' if baseline else row['arm']} | {int(row['amount']):,} | {row['n_seeds']} | "
                     f"{_interval(row, 'clean')} | {_interval(row, robust)} | "
                     f"{'' if baseline else _interval(row, 'robust_diff')} | "
                     f"{'' if baseline else str(row['mcnemar_n_significant']) + ' of ' + str(row['n_paired'])} | "
                     f"{'' if baseline else verdict(row)} |")
    return lines


def findings(rows: list[dict[str, Any]]) -> str:
    """Per arm, whether any of its amounts is above the baseline with a seed-paired interval excluding 0."""
    verdicts: dict[str, list[str]] = {}
    for row in rows:
        if row["arm"] != "none":
            verdicts.setdefault(row["arm"], []).append(verdict(row))
    above = [arm for arm, found in verdicts.items() if "above the baseline" in found]
    measured = [arm for arm, found in verdicts.items()
                if arm not in above and any(v != "no interval (one seed)" for v in found)]
    return ("Above the real-data baseline at some amount, interval excluding 0: "
            + (", ".join(above) or "no arm") + ". Not found at any amount measured with an interval: "
            + (", ".join(measured) or "no arm") + ".")


def last_summary(results: Path) -> tuple[list[dict[str, Any]], list[str], int]:
    """The summary rows and columns of the last checkpoints, once every collected run has one (else none);
    how many have one."""
    threat = params_mod.load(results / "params.yaml")["evaluate"]["threats"][0]
    collected = json.loads((results / "provenance.json").read_text())["runs_collected"]
    done = [run for run in collected if (results / "last" / run / f"{threat}.json").exists()]
    if not done or len(done) < len(collected):
        return [], [], len(done)
    rows, columns = effect.summarise(effect.load_runs(results / "last", results / "train_robust", threat), "none")
    return rows, columns, len(done)


def headline(results: Path, rows: list[dict[str, Any]]) -> str:
    """README's lines on the study: per arm at its largest amount, the seed-paired difference to the
    baseline and what its interval says; the figure."""
    origin = json.loads((results / "provenance.json").read_text())
    robust = rows[0]["robust_attack"]
    attack = effect.ATTACK_LABELS.get(robust, robust)
    largest: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row["arm"] != "none" and int(row["amount"]) >= int(largest.get(row["arm"], {"amount": -1})["amount"]):
            largest[row["arm"]] = row
    hours = core_hours(results)
    arms = [f"{arm} ({int(row['amount']):,} images): {_interval(row, 'robust_diff') or 'no difference yet'} "
            f"points, {verdict(row)}" for arm, row in largest.items()]
    lines = [HEADLINE_BEGIN, "<!-- generated by `python -m pipeline.effect_report write` from results/effect/; "
             "do not edit -->", "",
             f"**Effect study** (2-core CPU; [docs/results.md](docs/results.md)): {origin['n_collected']} of "
             f"{origin['n_planned']} runs collected. {attack} robust accuracy over the real-only baseline, mean "
             "over seeds with the seed-paired 95% interval: " + ("; ".join(arms) if arms else "no arm with "
                                                                  "generated data collected yet") + "."
             + (f" Its jobs took {sum(hours.values()):.1f} core-hours: about {sum(hours.values()) / 2:.1f} hours "
                "of a 2-core machine." if hours else ""),
             "", "![robust accuracy against the number of generated images](results/figures/effect.png)", HEADLINE_END]
    return "\n".join(lines)


def replace_section(path: Path, text: str, begin: str = BEGIN, end: str = END) -> None:
    content = path.read_text()
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    if not pattern.search(content):
        raise ReportError(f"{path}: no {begin} ... {end} markers to fill")
    with atomic_path(path) as tmp:
        tmp.write_text(pattern.sub(lambda _: text, content))


def summary(results: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The summary rows of the kept runs under the study's first threat (evaluate.threats of its params)."""
    threat = params_mod.load(results / "params.yaml")["evaluate"]["threats"][0]
    return effect.summarise(effect.load_runs(results / "evaluate", results / "train_robust", threat), "none")


def write(results: Path = RESULTS, figure_path: Path = FIGURE, readme: Path = README,
          results_doc: Path = RESULTS_DOC) -> list[dict[str, Any]]:
    """summary.csv, the figure and the two sections, from `results` alone."""
    rows, columns = summary(results)
    effect.write_csv(results / "summary.csv", rows, columns)
    last_rows, last_columns, _ = last_summary(results)
    if last_rows:
        effect.write_csv(results / "summary_last.csv", last_rows, last_columns)
    effect.figure(figure_path, rows, "none")
    replace_section(results_doc, section(results, rows))
    replace_section(readme, headline(results, rows), HEADLINE_BEGIN, HEADLINE_END)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.effect_report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("gap", "last", "collect", "targets"):
        sub = commands.add_parser(name)
        sub.add_argument("workdir", type=Path, help="the study's checkout (params.yaml, results/, models/)")
        if name in ("collect", "targets"):
            sub.add_argument("--kept", type=Path, default=RESULTS, help="the kept results (default results/effect)")
    sub = commands.add_parser("write")
    sub.add_argument("--results", type=Path, default=RESULTS)
    sub.add_argument("--figure", type=Path, default=FIGURE)
    sub.add_argument("--readme", type=Path, default=README)
    sub.add_argument("--results-doc", type=Path, default=RESULTS_DOC)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        if args.command == "gap":
            gap(args.workdir)
        elif args.command == "last":
            last(args.workdir)
        elif args.command == "collect":
            collect(args.workdir, args.kept)
        elif args.command == "targets":
            print(" ".join(missing_targets(args.workdir, args.kept)))
        else:
            write(args.results, args.figure, args.readme, args.results_doc)
    except (ReportError, effect.EffectError, params_mod.ParamsError) as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()
