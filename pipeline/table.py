"""Stage `table`: every (run, threat) evaluation as one traceable row, plus markdown and a figure.

    python -m pipeline.table --params params.yaml --evaluations results/evaluate \\
        --train-metrics results/train_robust --teacher-metrics results/teacher/metrics.json \\
        --analysis results/analysis [--generated data/generated] \\
        --out results/cifar10_table.csv --out-md results/cifar10_table.md \\
        --out-figure results/figures/cifar10_robust_vs_generated.png

Inputs may be files or directories (Snakemake passes file lists, DVC directories): a directory of
evaluations means every results/evaluate/{run}/{threat}.json in it, of train metrics every
{run}/metrics.json, of analyses every {generator}.json, of generated sets every {generator}/shard-*.h5.

Columns: accuracies are fractions of `n_eval` test images. `n_generated` counts the generated images
the run could draw (after the selection), `n_sampled` those its generator sampled (`generate.n_images`;
0 for the baseline), `cutmix_alpha` the run's CutMix setting (0: off). `pgd_acc` is PGD with `pgd_steps` steps
(40 steps in the default and paper presets, fewer in the test preset, so the step count is its own
column rather than part of the name). `checkpoint` names the evaluated model of the run: `best` (the EMA
model chosen by validation robust accuracy, evaluate.checkpoint's default) or `last`, with
`checkpoint_epoch` the epoch it was taken at. `fid` is the run's generated set against training images
and `fid_reference` the real test set's against the same images (what a perfect generator reaches), both
in `fid_feature_space`: `inception` (the standard FID) or `teacher` (the teacher's features, used when no
local Inception weights are configured; not comparable with published FIDs). `flags` lists the evaluation's sanity
checks that fired (';'-separated, empty when none). Provenance: `git_commit` (of the working tree the
table was built in, "-dirty" when it has uncommitted changes, empty outside git), `params_sha256`
(sha256 of the validated params as canonical JSON), `model_sha256` (of the evaluated checkpoint),
`generated_sha256` (sha256 of the newline-joined sorted shard sha256 attributes of the generator's
set; empty for the baseline) and the paths of the evaluation JSON, model and per-example file.
`source` is `robustgen` for the pipeline's own runs and `robustbench_zoo:<architecture>` for a RobustBench
model-zoo file evaluated through the pipeline (`evaluate --zoo-architecture`): such a row has no training
run (generator `zoo`, no generated-data or training columns) and its `model_sha256` is the zoo file's.

The paper's published numbers (pipeline/paper_reference.py) appear only in the markdown and the figure,
labelled as the paper's; the CSV holds our measurements only.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import paper_reference
from pipeline import params as params_mod
from pipeline.provenance import git_commit, params_sha256
from pipeline.shards import ShardError, atomic_path, expand, set_sha256

log = logging.getLogger("pipeline.table")
COLUMNS = [
    "dataset", "run", "source", "generator", "variant", "seed", "train_threat", "n_generated", "n_sampled",
    "cutmix_alpha", "model", "threat", "eps", "eps_255",
    "clean_acc", "autoattack_acc", "pgd_acc", "pgd_steps", "corrupted_acc", "teacher_acc",
    "complementarity_train", "complementarity_test", "complementarity_self", "coverage_train", "coverage_test",
    "fid", "fid_reference", "fid_feature_space",
    "epochs", "checkpoint", "checkpoint_epoch", "n_eval", "flags", "gradient_masking_suspected",
    "git_commit", "params_sha256", "model_sha256", "generated_sha256",
    "evaluation_path", "model_path", "examples_path",
]


class TableError(ValueError):
    """An input is missing, incomplete or inconsistent; the message names the file."""


# --- reading inputs defensively ---


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise TableError(f"{path}: missing") from None
    except json.JSONDecodeError as error:
        raise TableError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise TableError(f"{path}: expected a JSON object")
    return data


def need(data: dict[str, Any], key: str, path: Path, *alternatives: str) -> Any:
    """data[key] (or the first alternative present), else an error naming the file and key."""
    for name in (key, *alternatives):
        if name in data and data[name] is not None:
            return data[name]
    names = " or ".join(repr(k) for k in (key, *alternatives))
    raise TableError(f"{path}: required key {names} missing")


def planned(cfg: dict[str, Any], evaluations: list[Path]) -> list[Path]:
    """The evaluations of runs and threats params defines, by the run and threat each JSON names: a stale
    run's file left in a folder (DVC hands the folder; a run or threat since dropped from params) never
    joins the table. Both tools hand every planned evaluation, so this only ever removes."""
    threats = {*cfg["evaluate"]["threats"], *cfg["evaluate"]["learned_threats"]}
    runs = set(params_mod.runs(cfg))
    kept = []
    for path in evaluations:
        ev = read_json(path)
        run, threat = str(ev.get("run")), str(ev.get("threat"))
        if run in runs and threat in threats:
            kept.append(path)
        else:
            log.info("%s: run %s under %s is not among the runs params defines: left out", path, run, threat)
    return kept


def files(paths: list[Path], pattern: str) -> list[Path]:
    """Files as given, directories expanded with `pattern` (sorted)."""
    out: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            out += sorted(path.glob(pattern))
        elif path.exists():
            out.append(path)
        else:
            raise TableError(f"{path}: missing")
    return out


def generated_set_sha256(shards: list[Path]) -> str:
    """The generated-set checksum (see shards.set_sha256), as a table error when there are no shards."""
    try:
        return set_sha256(shards)
    except ShardError as error:
        raise TableError(str(error)) from None


def generated_checksums(paths: list[Path]) -> dict[str, str]:
    """{generator: checksum} from generated-set folders or shard files (grouped by parent folder)."""
    groups: dict[str, list[Path]] = {}
    for path in map(Path, paths):
        if path.is_dir() and not list(path.glob("shard-*.h5")):  # data/generated: one folder per generator
            for sub in sorted(p for p in path.iterdir() if p.is_dir()):
                groups.setdefault(sub.name, []).extend(expand([sub]))
        else:
            for shard in expand([path]):
                groups.setdefault(shard.parent.name, []).append(shard)
    return {name: generated_set_sha256(shards) for name, shards in groups.items()}


def quality_values(data: dict[str, Any]) -> dict[str, Any]:
    """FID of the generated set and of the real test set (reference), and the feature space both are in
    (pipeline/quality.py); blank for an analysis without a quality block."""
    block = data.get("quality")
    if not isinstance(block, dict):
        return dict.fromkeys(("fid", "fid_reference", "fid_feature_space"), "")
    value = lambda x: "" if x is None else float(x)
    return {"fid": value(block["generated"]["fid"]), "fid_reference": value(block["reference_test"]["fid"]),
            "fid_feature_space": block["feature_space"]}


def analysis_values(data: dict[str, Any], path: Path) -> dict[str, Any]:
    """complementarity train/test/self and coverage train/test, nested or flat keys, and the FID."""
    out: dict[str, Any] = quality_values(data)
    for group, parts in [("complementarity", ("train", "test", "self")), ("coverage", ("train", "test"))]:
        found = data.get(group)
        nested = found if isinstance(found, dict) else {}
        for part in parts:
            value = nested.get(part, data.get(f"{group}_{part}"))
            if value is None:
                raise TableError(f"{path}: required key '{group}.{part}' (or '{group}_{part}') missing")
            out[f"{group}_{part}"] = float(value)
    return out


# --- rows ---


Keyed = dict[str, tuple[Path, dict[str, Any]]]   # name -> (file, its JSON)


@dataclass(frozen=True)
class Context:
    """What every row is joined with: training metrics by run, analyses by generator, shard checksums,
    and the provenance shared by all rows."""
    cfg: dict[str, Any]
    trains: Keyed
    analysis: Keyed
    generated: dict[str, str]
    teacher_acc: float
    commit: str
    params_sha256: str
    runs: dict[str, params_mod.Run]   # the run table of cfg, by name (resolved once, not per row)


def build_rows(cfg: dict[str, Any], evaluations: list[Path], train_metrics: list[Path], teacher_metrics: Path,
               analyses: list[Path], generated: dict[str, str], commit: str) -> list[dict[str, Any]]:
    """One row per evaluation JSON, joined with its run's training metrics and its generator's analysis."""
    if not evaluations:
        raise TableError("no evaluation JSON files given (--evaluations)")
    teacher_acc = float(need(read_json(teacher_metrics), "test_acc", teacher_metrics))
    trains: Keyed = {}
    for path in train_metrics:
        data = read_json(path)
        trains[str(need(data, "run", path))] = (path, data)
    analysis: Keyed = {}
    for path in analyses:
        data = read_json(path)
        analysis[str(data.get("generator") or path.stem)] = (path, data)
    context = Context(cfg, trains, analysis, generated, teacher_acc, commit, params_sha256(cfg),
                      {run.name: run for run in params_mod.run_table(cfg)})
    rows = [evaluation_row(path, context) for path in evaluations]
    rows.sort(key=lambda r: (r["generator"] != "none", r["generator"], r["n_generated"], r["model"],
                             r["variant"] != "none", r["variant"], r["threat"], r["run"]))   # run: a seed's
    seen = set()
    for row in rows:
        run_threat = (row["run"], row["threat"])
        if run_threat in seen:
            raise TableError(f"two evaluations of run {row['run']} under {row['threat']} "
                             f"(one is {row['evaluation_path']})")
        seen.add(run_threat)
    return rows


def evaluation_row(path: Path, context: Context) -> dict[str, Any]:
    """The row of one evaluation JSON; refuses an evaluation of another model than its run describes."""
    ev = read_json(path)
    run, threat = str(need(ev, "run", path)), str(need(ev, "threat", path))
    if ev.get("source") == "robustbench_zoo":
        return zoo_row(path, ev, context)
    if run not in context.trains:
        raise TableError(f"{path}: run {run!r} has no training metrics among --train-metrics "
                         f"({', '.join(sorted(context.trains)) or 'none given'})")
    train_path, train = context.trains[run]
    entry = context.runs.get(run)   # variant runs (e.g. gaussian-cutmix) reuse a generator
    generator = train.get("generator") or (entry.generator if entry else None)
    variant = entry.variant if entry else None
    is_baseline = generator in (None, "", "none")
    model_sha = str(need(ev, "model_sha256", path))
    kind = str(ev.get("checkpoint") or "last")   # evaluations that do not say attacked the last model
    trained_sha = train.get("best_sha256" if kind == "best" else "model_sha256")
    if trained_sha and trained_sha != model_sha:
        raise TableError(f"{path}: evaluated {kind} model sha256 {model_sha[:12]} differs from the {kind} "
                         f"model {train_path} describes ({str(trained_sha)[:12]}): stale evaluation")
    row: dict[str, Any] = {
        "dataset": context.cfg["base"]["dataset"], "run": run, "source": "robustgen",
        "generator": "none" if is_baseline else generator,
        "variant": train.get("variant") or variant or "none",
        "seed": int(train.get("seed_index", 0)),   # variants.seeds entry the run trained with
        "train_threat": train.get("threat") or "",   # linf, l2 or cvae (trained in the learned set)
        "n_generated": 0 if is_baseline else int(need(train, "n_generated", train_path)),
        # what the generator sampled (generate.n_images), before the selection: the count papers report
        "n_sampled": 0 if is_baseline else int(context.cfg["generate"]["n_images"]),
        "cutmix_alpha": float(need(train, "cutmix_alpha", train_path)),
        "model": need(train, "model", train_path),
        # learned threat models (pipeline/evaluate_latent.py) have a latent radius, no pixel eps and no
        # AutoAttack value; their pgd_acc is the latent attack's accuracy
        "threat": threat, "eps": ev.get("eps_label") or f"{float(need(ev, 'eps_255', path)):g}/255",
        "eps_255": "" if ev.get("eps_255") is None else f"{float(ev['eps_255']):g}",
        "clean_acc": float(need(ev, "clean_acc", path)),
        "autoattack_acc": "" if "eps_label" in ev else float(need(ev, "autoattack_acc", path)),
        "corrupted_acc": float(ev["corrupted_acc"]) if "corrupted_acc" in ev else "",
        "pgd_acc": float(need(ev, "pgd_acc", path)), "pgd_steps": int(need(ev, "pgd_steps", path)),
        "teacher_acc": context.teacher_acc,
        "epochs": need(train, "epochs", train_path), "checkpoint": kind,
        "checkpoint_epoch": "" if ev.get("checkpoint_epoch") is None else int(ev["checkpoint_epoch"]),
        "n_eval": int(need(ev, "n_eval", path)),
        "flags": ";".join(need(ev, "flags", path)),
        "gradient_masking_suspected": bool(ev.get("gradient_masking_suspected", False)),
        "git_commit": context.commit, "params_sha256": context.params_sha256, "model_sha256": model_sha,
        "generated_sha256": "", "evaluation_path": str(path), "model_path": ev.get("model_path", ""),
        "examples_path": ev.get("examples_path", ""),
        **dict.fromkeys(("complementarity_train", "complementarity_test", "complementarity_self",
                         "coverage_train", "coverage_test", "fid", "fid_reference", "fid_feature_space"), ""),
    }
    if not is_baseline:
        if generator not in context.analysis:
            raise TableError(f"{path}: generator {generator!r} has no analysis JSON among --analysis "
                             f"({', '.join(sorted(context.analysis)) or 'none given'})")
        row.update(analysis_values(context.analysis[generator][1], context.analysis[generator][0]))
        row["generated_sha256"] = generated_checksum(generator, train, train_path, context.generated)
    return row


def zoo_row(path: Path, ev: dict[str, Any], context: Context) -> dict[str, Any]:
    """The row of a RobustBench zoo model's evaluation: no training run, generator `zoo`."""
    return {
        "dataset": context.cfg["base"]["dataset"], "run": ev["run"],
        "source": f"robustbench_zoo:{need(ev, 'zoo_architecture', path)}", "generator": "zoo", "variant": "none",
        "train_threat": "", "n_generated": "", "model": need(ev, "model", path), "threat": ev["threat"],
        "eps": f"{float(need(ev, 'eps_255', path)):g}/255", "eps_255": f"{float(ev['eps_255']):g}",
        "clean_acc": float(need(ev, "clean_acc", path)), "autoattack_acc": float(need(ev, "autoattack_acc", path)),
        "corrupted_acc": "", "pgd_acc": float(need(ev, "pgd_acc", path)), "pgd_steps": int(need(ev, "pgd_steps", path)),
        "teacher_acc": context.teacher_acc, "epochs": "", "checkpoint": "zoo", "checkpoint_epoch": "",
        "n_eval": int(need(ev, "n_eval", path)), "flags": ";".join(need(ev, "flags", path)),
        "gradient_masking_suspected": bool(ev.get("gradient_masking_suspected", False)),
        "git_commit": context.commit, "params_sha256": context.params_sha256,
        "model_sha256": str(need(ev, "model_sha256", path)), "generated_sha256": "", "evaluation_path": str(path),
        "model_path": ev.get("model_path", ""), "examples_path": ev.get("examples_path", ""),
        **dict.fromkeys(("complementarity_train", "complementarity_test", "complementarity_self",
                         "coverage_train", "coverage_test", "fid", "fid_reference", "fid_feature_space"), ""),
    }


def generated_checksum(generator: str, train: dict[str, Any], train_path: Path, generated: dict[str, str]) -> str:
    """From the shards themselves (--generated) when given, checked against the training metrics."""
    recorded = train.get("generated_sha256")
    if generator in generated:
        if recorded and recorded != generated[generator]:
            raise TableError(f"{train_path}: trained on generated set {str(recorded)[:12]}, but the shards "
                             f"of {generator!r} now hash to {generated[generator][:12]}: retrain or restore")
        return generated[generator]
    if recorded:
        return str(recorded)
    raise TableError(f"{train_path}: no 'generated_sha256' key and no --generated shards for {generator!r}: "
                     "cannot trace the row to its generated set")


# --- renderings ---


def _cell(key: str, value: Any) -> Any:
    """Accuracies and analysis values to 4 decimals (1/10,000 = one test image at paper scale); FID to 6
    significant digits (its scale depends on the feature space)."""
    measured = key.endswith("_acc") or key.startswith(("complementarity", "coverage"))
    if key in ("fid", "fid_reference") and isinstance(value, float):
        return f"{value:.6g}"
    return f"{value:.4f}" if measured and isinstance(value, float) else value


FID_SPACES = {"inception": "Inception", "teacher": "teacher features"}


def fid_header(rows: list[dict[str, Any]]) -> str:
    """The FID column's name says its feature space: Inception-v3 (the standard FID) or the teacher's."""
    spaces = sorted({FID_SPACES.get(r["fid_feature_space"], r["fid_feature_space"]) for r in rows
                     if r.get("fid_feature_space")})
    return f"FID ({', '.join(spaces)})" if spaces else "FID"


def _fid(value: Any) -> str:
    return "" if value == "" else f"{value:.4g}"


def fid_note(rows: list[dict[str, Any]]) -> list[str]:
    """The reference that makes an FID readable: the real test set's FID against the same train sample."""
    scored = [r for r in rows if r.get("fid_reference", "") != ""]
    if not scored:
        return []
    space = scored[0]["fid_feature_space"]
    what = ("Inception-v3 pool3 features (2015 TF weights, torch-fidelity): the standard FID" if space == "inception"
            else "the teacher's penultimate features, NOT the standard Inception FID (set analysis.inception_weights "
            "for that); comparable only between rows of this table")
    return ["", f"FID of the generated set against training images, in {what}. Reference: the real test set "
            f"scores {_fid(scored[0]['fid_reference'])} against the same training images (the training set's "
            "own held-out split); per-generator quality details are in results/analysis/{generator}.json and "
            "results/complementarity.csv."]


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: _cell(key, value) for key, value in row.items()})
    with atomic_path(path) as tmp:
        tmp.write_text(buffer.getvalue())


def _pct(value: Any) -> str:
    return f"{100 * value:.2f}" if isinstance(value, float) else ""


def _count(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else str(value)


def checkpoint_label(row: dict[str, Any]) -> str:
    """'best (epoch 3)', 'last' ...: which of the run's models was evaluated."""
    epoch = row.get("checkpoint_epoch", "")
    return f"{row['checkpoint']} (epoch {epoch})" if row.get("checkpoint") == "best" and epoch != "" \
        else str(row.get("checkpoint", ""))


def markdown(rows: list[dict[str, Any]], dataset: str) -> str:
    lines = [f"# Robust accuracy on {dataset} (ours)", "",
             "Accuracies in % of the first `n_eval` test images; AutoAttack = standard version "
             "(APGD-CE, APGD-T, FAB-T, Square); PGD with `pgd_steps` steps. Provenance (git commit, params "
             f"hash, model and generated-set checksums) is in results/{dataset}_table.csv.", "",
             "| generator | variant | trained under | n generated | model | threat | eps | clean | AutoAttack "
             f"| PGD (steps) | teacher | compl. test | coverage test | {fid_header(rows)} | epochs | checkpoint "
             "| n eval | flags |",
             "|---|---|---|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---|"]
    for r in rows:
        lines.append(f"| {r['generator']} | {r['variant']} | {r['train_threat']} | {_count(r['n_generated'])} "
                     f"| {r['model']} | {r['threat']} | {r['eps']} "
                     f"| {_pct(r['clean_acc'])} | {_pct(r['autoattack_acc'])} | {_pct(r['pgd_acc'])} "
                     f"({r['pgd_steps']}) | {_pct(r['teacher_acc'])} | "
                     f"{'' if r['complementarity_test'] == '' else format(r['complementarity_test'], '.4f')} | "
                     f"{'' if r['coverage_test'] == '' else format(r['coverage_test'], '.4f')} | {_fid(r['fid'])} "
                     f"| {r['epochs']} | {checkpoint_label(r)} | {r['n_eval']} "
                     f"| {r['flags'].replace(';', ', ') or 'none'} |")
    lines += fid_note(rows)
    flagged = [r for r in rows if r["gradient_masking_suspected"]]
    if flagged:
        lines += ["", "**Gradient masking suspected** for " + ", ".join(
            f"{r['run']}/{r['threat']}" for r in flagged) + ": treat their robust accuracy as an upper bound "
            "(reasons in the evaluation JSON, `flag_reasons`)."]
    refs = paper_reference.matching(dataset)
    lines += ["", f"## For comparison: published results ({paper_reference.CITATION})", "",
              "NOT our measurements. Full CIFAR test set, AutoAttack; each value's source is named in "
              "pipeline/paper_reference.py. A blank clean accuracy was not checked against a source. A published "
              "number compares with one of ours only when model, training threat, evaluated threat, "
              "generator, CutMix and the number of images sampled all match.", ""]
    if refs:
        lines += ["| paper model | generated data | trained under | threat | eps | clean | AutoAttack | source |",
                  "|---|---|---|---|---|---:|---:|---|"]
        for ref in refs:
            data = f"{ref.n_generated:,} {ref.data}" if ref.n_generated else ref.data
            lines.append(f"| {ref.model} | {data} | {ref.trained_under} | {ref.threat} | {ref.eps_255:g}/255 "
                         f"| {_pct(ref.clean_acc)} | {_pct(ref.autoattack_acc)} | {ref.source} |")
        lines += ["", *comparisons(rows, refs)]
    else:
        lines.append(f"(no published {dataset} numbers recorded)")
    return "\n".join(lines) + "\n"


def comparable_refs(row: dict[str, Any], refs: list[paper_reference.PaperResult]) -> list[paper_reference.PaperResult]:
    """The published results measuring the same setting as one of our rows (PaperResult.comparable)."""
    return [ref for ref in refs if ref.comparable(str(row["model"]), str(row["train_threat"] or row["threat"]),
                                                  str(row["threat"]), str(row["generator"]), int(row["n_sampled"]),
                                                  float(row["cutmix_alpha"]) > 0)]


def comparisons(rows: list[dict[str, Any]], refs: list[paper_reference.PaperResult]) -> list[str]:
    """Markdown lines pairing each of our rows with the published results of the same setting, if any."""
    pairs = [(row, ref) for row in rows if row["autoattack_acc"] != "" and row.get("generator") != "zoo"
             for ref in comparable_refs(row, refs)]
    if not pairs:
        return ["None of our rows has a published counterpart (same model, training threat, evaluated threat, "
                "generator, CutMix and number of images sampled): a difference to the rows above is not a gap "
                "to close."]
    lines = ["Same setting, ours beside the published result:", ""]
    for row, ref in pairs:
        lines.append(f"- {row['run']} ({row['model']}, {row['n_generated']:,} generated, trained "
                     f"{row['train_threat'] or row['threat']}, {row['threat']}): ours clean {_pct(row['clean_acc'])} / "
                     f"AutoAttack {_pct(row['autoattack_acc'])} on {row['n_eval']:,} images; {ref.label}: clean "
                     f"{_pct(ref.clean_acc) or 'not checked'} / AutoAttack {_pct(ref.autoattack_acc)}")
    return lines


def figure(path: Path, rows: list[dict[str, Any]], dataset: str) -> None:
    """Left: AutoAttack accuracy vs generated images per generator; right: clean vs robust accuracy."""
    # pixel-norm threats only (AutoAttack rows), the pipeline's own runs (zoo rows have no generated count)
    rows = [r for r in rows if r["autoattack_acc"] != "" and r["generator"] != "zoo"]
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    threats = sorted({r["threat"] for r in rows})
    styles = {"linf": "-", "l2": "--"}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    generators = sorted({r["generator"] for r in rows if r["generator"] != "none"})
    color_of = {g: colors[i % len(colors)] for i, g in enumerate(["none", *generators])}
    for threat in threats:
        for base in (r for r in rows if r["threat"] == threat and r["generator"] == "none"):
            left.axhline(100 * base["autoattack_acc"], color=color_of["none"], ls=":",
                         label=f"ours: baseline, real only ({threat}, {base['model']})")
        for gen in generators:
            pts = sorted((r["n_generated"], 100 * r["autoattack_acc"]) for r in rows
                         if r["threat"] == threat and r["generator"] == gen)
            if pts:
                left.plot(*zip(*pts), marker="o", ls=styles.get(threat, "-"), color=color_of[gen],
                          label=f"ours: {gen} ({threat})")
        trained = {r["train_threat"] or threat for r in rows if r["threat"] == threat}
        for ref in (ref for ref in paper_reference.matching(dataset, threat) if ref.trained_under in trained):
            left.axhline(100 * ref.autoattack_acc, color="grey", ls="-.", lw=0.8)
            left.annotate(f"{ref.label} ({threat} {ref.eps_255:g}/255)", (0.01, 100 * ref.autoattack_acc),
                          xycoords=("axes fraction", "data"), fontsize=7, color="grey", va="bottom")
    if any(r["n_generated"] > 0 for r in rows):
        left.set_xscale("log")
    left.set_xlabel("generated images used in training")
    left.set_ylabel("AutoAttack accuracy (%)")
    left.set_title(f"{dataset}: robust accuracy vs generated data\n(grey dash-dot: the paper's published values)")
    left.legend(fontsize=7, loc="center right")
    markers = {"linf": "o", "l2": "s"}
    for r in rows:
        right.scatter(100 * r["clean_acc"], 100 * r["autoattack_acc"], color=color_of[r["generator"]],
                      marker=markers.get(r["threat"], "o"))
        right.annotate(f"{r['generator']} {r['threat']}", (100 * r["clean_acc"], 100 * r["autoattack_acc"]),
                       fontsize=7, xytext=(3, 3), textcoords="offset points")
    for ref in (ref for threat in threats for ref in paper_reference.matching(dataset, threat)):
        # only the threat models we evaluated, only checked values
        if ref.clean_acc is not None and any(r["threat"] == ref.threat and (r["train_threat"] or r["threat"])
                                             == ref.trained_under for r in rows):
            right.scatter(100 * ref.clean_acc, 100 * ref.autoattack_acc, marker="*", s=120, color="grey")
            right.annotate(f"{ref.label} ({ref.threat})", (100 * ref.clean_acc, 100 * ref.autoattack_acc),
                           fontsize=7, color="grey", xytext=(-4, -10), textcoords="offset points", ha="right")
    right.set_xlabel("clean accuracy (%)")
    right.set_ylabel("AutoAttack accuracy (%)")
    right.set_title("clean vs robust (ours: circles Linf, squares L2; grey stars: paper)")
    right.title.set_fontsize(9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, metadata={"Software": None})
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.table", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--evaluations", type=Path, nargs="+", required=True,
                        help="evaluation JSONs or folders of {run}/{threat}.json")
    parser.add_argument("--train-metrics", type=Path, nargs="+", required=True,
                        help="train_robust metrics.json files or folders of {run}/metrics.json")
    parser.add_argument("--teacher-metrics", type=Path, required=True)
    parser.add_argument("--analysis", type=Path, nargs="*", default=[],
                        help="analysis {generator}.json files or their folder (none for baseline only)")
    parser.add_argument("--generated", type=Path, nargs="*", default=[],
                        help="generated shards or folders, to checksum each generator's set")
    parser.add_argument("--out", type=Path, required=True, help="CSV table")
    parser.add_argument("--out-md", type=Path, required=True)
    parser.add_argument("--out-figure", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        cfg = params_mod.load(args.params)
        rows = build_rows(cfg, planned(cfg, files(args.evaluations, "*/*.json")),
                          files(args.train_metrics, "*/metrics.json"),
                          args.teacher_metrics, files(args.analysis, "*.json"),
                          generated_checksums(args.generated), git_commit())
    except (TableError, params_mod.ParamsError) as error:
        raise SystemExit(f"error: {error}") from None
    dataset = cfg["base"]["dataset"]
    write_csv(args.out, rows)
    with atomic_path(args.out_md) as tmp:
        tmp.write_text(markdown(rows, dataset))
    figure(args.out_figure, rows, dataset)
    for row in rows:  # learned threats (cvae) have no AutoAttack value
        autoattack = "-" if row["autoattack_acc"] == "" else f"{row['autoattack_acc']:.4f}"
        log.info("%s %s: clean %.4f AutoAttack %s PGD-%d %.4f%s", row["run"], row["threat"], row["clean_acc"],
                 autoattack, row["pgd_steps"], row["pgd_acc"], f"  FLAGS {row['flags']}" if row["flags"] else "")
    log.info("wrote %s (%d rows), %s, %s", args.out, len(rows), args.out_md, args.out_figure)


if __name__ == "__main__":
    main()
