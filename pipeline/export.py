"""Export an evaluated model for RobustBench: its checkpoint and its model-info JSON.

    python -m pipeline.export --table results/cifar10_table.csv --run ddpm --threat linf \\
        --name Ours2026Generated_WRN-28-10 --out-dir export \\
        [--model models/robust/ddpm/best.pt] [--paper-name ... --authors ... --venue ... --link ...]

writes `export/{name}.pt`, the state dict of RobustBench's DMWideResNet / DMPreActResNet (built with
`activation_fn=Swish` and the mean/std recorded in the JSON; it loads with `strict=True`), and
`export/{name}.json`, the fields of RobustBench's model_info files (robustbench/utils.py `ModelInfo`:
link, name, authors, additional_data, number_forward_passes, dataset, venue, architecture, eps, clean_acc,
reported, autoattack_acc, footnote) filled from the table row, plus `provenance`: where every number
came from (table, evaluation JSON, model and export sha256, git commit, params hash). Only a model whose
sha256 is the row's is exported, and only an evaluation of the full test set unless `--allow-subset`: a
leaderboard entry is on all 10,000 images. Before writing, the exported weights are mapped back onto our
model and must give bit-identical logits.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline import models, robustbench
from pipeline.shards import atomic_path, file_sha256

log = logging.getLogger("pipeline.export")
LEADERBOARD_N = 10_000   # RobustBench evaluates on the whole CIFAR test set


class ExportError(ValueError):
    """A row or model that cannot be exported; one line naming the cause."""


def table_row(table: Path, run: str, threat: str) -> dict[str, str]:
    """The table's one row of (run, threat)."""
    try:
        with open(table, newline="") as handle:
            rows = [row for row in csv.DictReader(handle) if row["run"] == run and row["threat"] == threat]
    except FileNotFoundError:
        raise ExportError(f"{table}: results table missing") from None
    except KeyError as error:
        raise ExportError(f"{table}: not a results table (no column {error})") from None
    if len(rows) != 1:
        raise ExportError(f"{table}: {len(rows)} rows of run {run!r} under {threat!r}, expected one")
    return rows[0]


def load_row_model(row: dict[str, str], path: Path) -> nn.Module:
    """The row's evaluated model: the file must be the one the row's model_sha256 names."""
    sha = file_sha256(path)
    if sha != row["model_sha256"]:
        raise ExportError(f"{path}: sha256 {sha[:12]} is not the evaluated model's ({row['model_sha256'][:12]})")
    source = row.get("source", "robustgen")
    if source.startswith("robustbench_zoo:"):
        return robustbench.load_zoo_file(path, source.split(":", 1)[1].split("-")[0])[0]
    return models.load_checkpoint(path, expected=row["model"])


def check_round_trip(model: nn.Module, state_dict: dict[str, torch.Tensor], arch: robustbench.ZooArchitecture
                     ) -> None:
    """The exported weights, mapped back onto our model, give bit-identical logits on a fixed batch."""
    back, _ = robustbench.from_zoo(state_dict, arch.name, "exported state dict")
    back.normalize = models.Normalize(arch.mean, arch.std)
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        if not torch.equal(model.eval()(x), back.eval()(x)):
            raise ExportError("exported weights do not reproduce the model's logits (mapping error)")


def eps_text(row: dict[str, str]) -> str:
    """RobustBench's spelling: '8/255' for Linf, a decimal for L2 (its leaderboard's 0.5)."""
    eps_255 = float(row["eps_255"])
    return f"{eps_255:g}/255" if row["threat"] == "linf" else f"{eps_255 / 255:.4g}"


def footnote(row: dict[str, str]) -> str:
    parts = []
    if row.get("generator") == "zoo":
        parts.append(f"The RobustBench zoo file {row['model_sha256'][:12]} evaluated through robustgen.")
    elif row.get("n_generated") not in ("", "0", None):
        parts.append(f"It uses additional {int(row['n_generated']):,} synthetic images ({row['generator']}) "
                     "in training.")
    if int(row["n_eval"]) != LEADERBOARD_N:
        parts.append(f"Evaluated on the first {int(row['n_eval']):,} test images only.")
    if row.get("flags"):
        parts.append(f"Sanity checks fired: {row['flags'].replace(';', ', ')}.")
    return " ".join(parts)


def model_info(row: dict[str, str], arch: robustbench.ZooArchitecture, args: argparse.Namespace,
               provenance: dict[str, Any]) -> dict[str, Any]:
    """RobustBench's model_info fields (its ModelInfo order), accuracies in % with 2 decimals as strings."""
    aa = f"{100 * float(row['autoattack_acc']):.2f}"
    return {"link": args.link, "name": args.paper_name, "authors": args.authors, "additional_data": False,
            "number_forward_passes": 1, "dataset": row["dataset"], "venue": args.venue,
            "architecture": arch.paper_name, "eps": eps_text(row), "clean_acc": f"{100 * float(row['clean_acc']):.2f}",
            "reported": aa, "autoattack_acc": aa, "footnote": footnote(row), "provenance": provenance}


def export(args: argparse.Namespace) -> tuple[Path, Path]:
    row = table_row(args.table, args.run, args.threat)
    if row.get("autoattack_acc", "") == "":
        raise ExportError(f"{args.table}: run {args.run} under {args.threat} has no AutoAttack accuracy")
    if int(row["n_eval"]) < LEADERBOARD_N and not args.allow_subset:
        raise ExportError(f"{args.table}: run {args.run} was evaluated on {row['n_eval']} test images, not the "
                          f"leaderboard's {LEADERBOARD_N} (--allow-subset to export anyway)")
    model_path = args.model or Path(row["model_path"])
    model = load_row_model(row, model_path)
    state_dict, arch = robustbench.to_zoo(model)
    check_round_trip(model, state_dict, arch)
    out_pt, out_json = args.out_dir / f"{args.name}.pt", args.out_dir / f"{args.name}.json"
    with atomic_path(out_pt) as tmp:
        torch.save(state_dict, tmp)
    provenance = {
        "exported_by": "robustgen pipeline.export", "table": str(args.table), "table_sha256": file_sha256(args.table),
        **{key: row.get(key, "") for key in ("run", "threat", "source", "model", "checkpoint", "checkpoint_epoch",
                                             "n_eval", "pgd_acc", "pgd_steps", "flags", "git_commit",
                                             "params_sha256", "generated_sha256", "evaluation_path")},
        "model_path": str(model_path), "model_sha256": row["model_sha256"],
        "checkpoint_file": out_pt.name, "checkpoint_sha256": file_sha256(out_pt),
        "robustbench_class": arch.name, "constructor": {**arch.kwargs(), "activation_fn": "Swish"},
    }
    with atomic_path(out_json) as tmp:
        tmp.write_text(json.dumps(model_info(row, arch, args, provenance), indent=2) + "\n")
    return out_pt, out_json


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", type=Path, required=True, help="results table CSV (pipeline.table)")
    parser.add_argument("--run", required=True)
    parser.add_argument("--threat", choices=["linf", "l2"], required=True)
    parser.add_argument("--name", required=True, help="RobustBench model name (file stem of both outputs)")
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--model", type=Path, help="the evaluated checkpoint (default: the row's model_path)")
    parser.add_argument("--paper-name", default="", help="model_info `name`: the paper's title")
    parser.add_argument("--authors", default="")
    parser.add_argument("--venue", default="")
    parser.add_argument("--link", default="")
    parser.add_argument("--allow-subset", action="store_true", help="export an evaluation of fewer than 10,000 images")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        out_pt, out_json = export(args)
    except (FileNotFoundError, ValueError) as error:   # ExportError, ZooError, a stale model
        raise SystemExit(f"error: {error}") from None
    log.info("wrote %s and %s", out_pt, out_json)


if __name__ == "__main__":
    main()
