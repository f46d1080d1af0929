"""Load and validate params.yaml, the single configuration of Snakemake and DVC.

    python -m pipeline.params check params.yaml [--stamp work/params.ok]
    python -m pipeline.params use paper        # rewrite params.yaml from configs/default + configs/paper

Validation runs before any job starts: the Snakefile calls `validate` at parse time, and DVC's first
stage is `check_params`. Errors name the offending key, e.g. `train_robust.beta: -1 is less than 0`.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeVar, get_args

import jsonschema
import yaml

from pipeline import datasets

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

SCHEMA_PATH = Path(__file__).with_name("params.schema.yaml")
CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"
T = TypeVar("T", bound="DataclassInstance")
LearnedThreat = Literal["cvae"]   # threats learned by the generator of the same name (pipeline/threat_model.py)
LEARNED_THREATS: tuple[LearnedThreat, ...] = get_args(LearnedThreat)


SCHEMA_KEY = "params_schema"   # the dataclass field metadata pipeline/params_schema.py reads


class ParamsError(ValueError):
    """Invalid parameters; the message names the key."""


def key(doc: str = "", *, items: dict[str, Any] | None = None, values: dict[str, Any] | None = None,
        schema: dict[str, Any] | None = None, **constraints: Any) -> Any:
    """A params key's declaration as a required dataclass field: JSON-schema `constraints` (minimum,
    exclusiveMaximum, uniqueItems, ...) of the value, of a list's `items` or a mapping's `values`, its
    description; `schema` gives the whole node where a type cannot say it. pipeline/params_schema.py
    writes params.schema.yaml from these."""
    declared: dict[str, Any] = {"constraints": {**constraints, **({"description": doc} if doc else {})},
                                "items": items, "values": values}
    if schema is not None:
        declared["schema"] = schema
    return dataclasses.field(metadata={SCHEMA_KEY: declared})


DatasetName = Literal["cifar10", "cifar100", "svhn"]   # the readers of pipeline/datasets.py
Device = Literal["auto", "cpu", "cuda"]
VARIANT_NAME = "^[a-z][a-z0-9_]*$"


@dataclass(frozen=True)
class BaseConfig:
    """params.yaml `base:`, read by every stage."""
    dataset: DatasetName = key("data set name (pipeline/datasets.py)")
    seed: int = key("master seed", minimum=0)
    device: Device = key("compute device")


@dataclass(frozen=True)
class VariantsConfig:
    """params.yaml `variants:`, read by this module's run table."""
    SCHEMA_DESCRIPTION: ClassVar[str] = ("extra robust-training runs, each the baseline and every generator run "
                                         "with some train_robust keys changed")
    names: list[str] = key("variants to run (runs baseline-NAME and GENERATOR-NAME)", uniqueItems=True,
                           items={"pattern": VARIANT_NAME})
    settings: dict[str, dict[str, Any]] = key("train_robust keys each variant changes",
                                              values={"minProperties": 1})
    amounts: list[int] = key("data-amount sweep; each generator run again drawing on only the first N of its "
                             "selected images (runs GENERATOR-nN)", uniqueItems=True, items={"minimum": 1})
    amounts_for: list[str] = key("the generators the data-amount sweep repeats ([] - every generator of "
                                 "generate.generators)", uniqueItems=True)
    seeds: list[int] = key("training seeds; every run once per seed (0 trains with base.seed; runs RUN-sS for "
                           "S > 0)", minItems=1, uniqueItems=True, items={"minimum": 0})


def load_schema() -> dict[str, Any]:
    return yaml.safe_load(SCHEMA_PATH.read_text())


def _key_path(error: jsonschema.ValidationError) -> str:
    parts = [str(part) for part in error.absolute_path]
    if error.validator == "required":  # the missing key is in the message, not the path
        missing = error.message.split("'")[1]
        parts.append(missing)
    if error.validator == "additionalProperties":
        unknown = [p for p in error.instance if p not in error.schema.get("properties", {})]
        parts.append(",".join(unknown))
        return ".".join(parts) + ": unknown key"
    return ".".join(parts) or "<root>"


def validate(cfg: dict[str, Any]) -> dict[str, Any]:
    """Check `cfg` against the schema and cross-key rules; raise ParamsError naming the key."""
    _check_schema_and_keys(cfg)
    _check_runs(cfg)
    return cfg


def _check_schema_and_keys(cfg: dict[str, Any]) -> None:
    if not isinstance(cfg, dict):
        raise ParamsError("<root>: params must be a mapping of sections")
    validator = jsonschema.Draft202012Validator(load_schema())
    errors = sorted(validator.iter_errors(cfg), key=lambda e: (len(list(e.absolute_path)), e.message))
    if errors:
        lines = []
        for error in errors[:10]:
            where = _key_path(error)
            lines.append(where if where.endswith("unknown key") else f"{where}: {error.message}")
        raise ParamsError("invalid params:\n  " + "\n  ".join(lines))
    _check_cross_keys(cfg)


def _check_runs(cfg: dict[str, Any]) -> None:
    """Run names are unique (a variant named like a suffix, e.g. s1, would collide), and a run trained in a
    learned perturbation set (threat cvae) needs that set's generator."""
    names = runs(cfg)
    clashes = sorted({name for name in names if names.count(name) > 1})
    if clashes:
        raise ParamsError(f"variants.names: runs {clashes} would be defined twice (a variant named like an "
                          "amount -nN or seed -sS suffix); rename the variant")
    for run in run_table(cfg):
        threat = train_robust_setting(cfg, run.name, "threat")
        if threat in LEARNED_THREATS and threat not in cfg["generate"]["generators"]:
            where = "train_robust.threat" if run.variant is None else f"variants.settings.{run.variant}.threat"
            raise ParamsError(f"{where}: run {run.name!r} trains in the learned {threat} set, which the {threat} "
                              "generator learns; add it to generate.generators")


def _check_cross_keys(cfg: dict[str, Any]) -> None:
    """The rules the schema cannot express (between keys, or over a list's order). The only place they are
    checked: stage config dataclasses are built from validated sections and do not repeat them."""
    generate, robust = cfg["generate"], cfg["train_robust"]
    if generate["generators"] and robust["generated_fraction"] == 0:
        raise ParamsError(
            "train_robust.generated_fraction: 0 means no generated images per batch, but "
            f"generate.generators asks for {generate['generators']}; use [] for real data only"
        )
    if robust["generated_fraction"] == 1:
        raise ParamsError("train_robust.generated_fraction: 1 leaves no real images for the baseline")
    for threat in cfg["evaluate"]["learned_threats"]:
        if threat not in generate["generators"]:
            raise ParamsError(f"evaluate.learned_threats: {threat} is learned by the {threat} generator; add it "
                              "to generate.generators")
    unknown = [name for name in cfg["variants"]["amounts_for"] if name not in generate["generators"]]
    if unknown:
        raise ParamsError(f"variants.amounts_for: {unknown} not in generate.generators {generate['generators']}")
    if "import" in generate["generators"] and not cfg["train_generator"]["import"]["path"]:
        raise ParamsError("train_generator.import.path: required when generate.generators has import")
    if cfg["analysis"]["feature_space"] == "lpips" and not cfg["analysis"]["lpips_weights"]:
        raise ParamsError("analysis.lpips_weights: required when analysis.feature_space is lpips")
    if cfg["analysis"]["quality_k"] >= cfg["analysis"]["quality_n"]:
        raise ParamsError("analysis.quality_k: must be smaller than analysis.quality_n (k-th neighbour radii)")
    if robust["warmup_epochs"] >= robust["epochs"]:
        raise ParamsError("train_robust.warmup_epochs: must be smaller than train_robust.epochs")
    if robust["epoch_size"] < robust["batch_size"]:
        raise ParamsError("train_robust.epoch_size: smaller than one batch (train_robust.batch_size)")
    if robust["step_255"] > robust["eps_255"]:
        raise ParamsError("train_robust.step_255: larger than train_robust.eps_255")
    if robust["loss"] == "pgd" and robust["cutmix_alpha"] > 0 and robust["cutmix_scheme"] == "reference":
        raise ParamsError("train_robust.cutmix_scheme: reference attacks from the mixed labels, which a label "
                          "attack (loss pgd) cannot (the JAX reference refuses it too); use loss trades or "
                          "cutmix_scheme per_row")
    sweep = cfg["evaluate"]["sweep_factors"]
    if sorted(sweep) != list(sweep):
        raise ParamsError("evaluate.sweep_factors: must be increasing")
    for name in ("ddpm", "edm"):
        unet = cfg["train_generator"][name]
        if unet["attention"] and len(unet["block_out_channels"]) < 2:
            raise ParamsError(f"train_generator.{name}.attention: needs a 16x16 level (2+ block_out_channels)")
    if cfg["data"]["n_train"] and cfg["data"]["val_size"] >= cfg["data"]["n_train"]:
        raise ParamsError("data.val_size: must be smaller than data.n_train")
    _check_labelled(cfg)
    _check_variants(cfg)
    try:  # one md5 string for an archive, a {file: md5} mapping for a multi-file data set (SVHN)
        datasets.check_md5_shape(datasets.get(cfg["base"]["dataset"]), cfg["data"]["md5"])
    except ValueError as error:
        raise ParamsError(str(error)) from None


def _check_labelled(cfg: dict[str, Any]) -> None:
    """data.n_labelled: whole classes' worth of images, more than the validation split, within n_train."""
    data, num_classes = cfg["data"], datasets.get(cfg["base"]["dataset"]).num_classes
    n = data["n_labelled"]
    if not n:
        return
    if n % num_classes:
        raise ParamsError(f"data.n_labelled: {n} is not a multiple of the {num_classes} classes of "
                          f"{cfg['base']['dataset']} (the labelled subset is class-balanced)")
    if data["val_size"] >= n:
        raise ParamsError(f"data.val_size: {data['val_size']} must be smaller than data.n_labelled {n} "
                          "(the validation split is taken from the labelled images)")
    if data["n_train"] and n > data["n_train"]:
        raise ParamsError(f"data.n_labelled: {n} is more than data.n_train {data['n_train']}")


def _check_variants(cfg: dict[str, Any]) -> None:
    """Each listed variant has settings, and its train_robust section passes the schema and cross-checks."""
    names, settings = cfg["variants"]["names"], cfg["variants"]["settings"]
    for name in names:
        if name not in settings:
            raise ParamsError(f"variants.settings: no entry for listed variant {name!r}")
    for name, overrides in settings.items():
        unknown = set(overrides) - set(cfg["train_robust"])
        if unknown:
            raise ParamsError(f"variants.settings.{name}: unknown train_robust keys {sorted(unknown)}")
        merged = copy.deepcopy(cfg)
        merged["train_robust"].update(overrides)
        merged["variants"] = {**cfg["variants"], "names": [], "settings": {}}
        try:  # settings of unlisted variants are checked too, but not whether their runs could train
            _check_schema_and_keys(merged)
        except ParamsError as error:  # name the variant's own key: variants.settings.<name>.<key>
            message = str(error).replace("train_robust.", f"variants.settings.{name}.")
            raise ParamsError(f"variants.settings.{name}: {message}") from None


def load(path: Path | str) -> dict[str, Any]:
    """Read and validate a params file."""
    path = Path(path)
    try:
        cfg = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ParamsError(f"{path}: params file not found") from None
    except yaml.YAMLError as error:
        raise ParamsError(f"{path}: not valid YAML: {error}") from None
    return validate(cfg)


def deep_merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """Overlay wins key by key; nested mappings merge, everything else is replaced."""
    merged = copy.deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def preset(name: str, configs_dir: Path = CONFIGS_DIR, dataset: str | None = None) -> dict[str, Any]:
    """configs/default.yaml with configs/<name>.yaml laid over it, then configs/datasets/<dataset>.yaml
    (official archive and md5 of that data set) when `dataset` is given; validated."""
    cfg = yaml.safe_load((configs_dir / "default.yaml").read_text())
    overlays = [] if name == "default" else [(configs_dir / f"{name}.yaml", "preset", configs_dir.glob("*.yaml"))]
    if dataset is not None:
        overlays.append((configs_dir / "datasets" / f"{dataset}.yaml", "dataset",
                         (configs_dir / "datasets").glob("*.yaml")))
    for path, kind, candidates in overlays:
        if not path.exists():
            known = sorted(p.stem for p in candidates)
            raise ParamsError(f"unknown {kind} {path.stem!r}; known: {', '.join(known)}")
        cfg = deep_merge(cfg, yaml.safe_load(path.read_text()) or {})
    return validate(cfg)


def section(cfg_type: type[T], values: dict[str, Any]) -> T:
    """Build a stage config dataclass from its params section; unknown or missing keys are errors.

    The dataclasses repeat no check: `values` come from a params mapping `validate` accepted, and every rule
    lives once, in the schema (types, ranges, enums) or in `_check_cross_keys` (rules between keys)."""
    names = {field.name for field in dataclasses.fields(cfg_type)}
    unknown, missing = set(values) - names, names - set(values)
    if unknown or missing:
        raise ParamsError(f"{cfg_type.__name__}: unknown keys {sorted(unknown)}, missing {sorted(missing)}")
    return cfg_type(**values)


# --- what the DAG expands over: shared by the Snakefile, dvc.yaml checks and the stages ---


def generators(cfg: dict[str, Any]) -> list[str]:
    return list(cfg["generate"]["generators"])


@dataclass(frozen=True)
class Run:
    """One robust-training run, resolved from params: the DAG's `{run}` is its name, and every stage told
    `--run NAME` looks the rest up here (names are built from these fields, never parsed)."""
    name: str
    generator: str | None     # the generated data it trains on; None: the real-data baseline
    variant: str | None       # its entry of variants.names (train_robust keys changed), or None
    amount: int | None        # draws only on this many of the generator's selected images; None: all
    seed: int                 # training seed index (variants.seeds): 0 trains with base.seed itself


def run_table(cfg: dict[str, Any]) -> list[Run]:
    """Every run params defines, in table order: the baseline and each generator, each generator again
    per data amount (variants.amounts, named -n<amount>; only variants.amounts_for's when it is set), all
    of them again per variant (-<variant>), and each of those once per training seed (variants.seeds;
    seed s > 0 adds -s<s>)."""
    variants = cfg["variants"]
    table = []
    for variant in [None, *variants["names"]]:
        for generator in [None, *generators(cfg)]:
            swept = generator is not None and generator in (variants["amounts_for"] or [generator])
            for amount in [None, *(variants["amounts"] if swept else [])]:
                for seed in variants["seeds"]:
                    name = "-".join([generator or "baseline", *([variant] if variant else []),
                                     *([f"n{amount}"] if amount else []), *([f"s{seed}"] if seed else [])])
                    table.append(Run(name, generator, variant, amount, seed))
    return table


def runs(cfg: dict[str, Any]) -> list[str]:
    """The names of run_table(cfg): e.g. baseline, gaussian, gaussian-n1000, baseline-cutmix, gaussian-s1."""
    return [run.name for run in run_table(cfg)]


def get_run(cfg: dict[str, Any], name: str) -> Run:
    """The run params defines under `name`; ParamsError naming the runs it does define otherwise."""
    for run in run_table(cfg):
        if run.name == name:
            return run
    raise ParamsError(f"run {name!r} is not defined by params (generate.generators, variants.names, "
                      f"variants.amounts, variants.seeds define {runs(cfg)})")


def training_seed(base_seed: int, run: Run) -> int:
    """The seed a run trains with: base.seed for seed index 0 (every stage before training shares it, so
    the seeds vary the training alone), a seed derived from (base.seed, index) otherwise."""
    from pipeline import seeding

    return base_seed if run.seed == 0 else seeding.derive(base_seed, "train_robust", "seed", run.seed)


def train_robust_for(cfg: dict[str, Any], run: str) -> dict[str, Any]:
    """The `train_robust` section a run trains with: its variant's settings laid over the shared one."""
    variant = get_run(cfg, run).variant
    if variant is None:
        return dict(cfg["train_robust"])
    return {**cfg["train_robust"], **cfg["variants"]["settings"][variant]}


def train_robust_setting(cfg: dict[str, Any], run: str, key: str) -> Any:
    """One key of train_robust_for(cfg, run), read without copying the section: a stage that needs only
    the threat then reads (and declares, pipeline/dag.py) only the threat."""
    variant = get_run(cfg, run).variant
    overrides = {} if variant is None else cfg["variants"]["settings"][variant]
    return overrides[key] if key in overrides else cfg["train_robust"][key]


def check_dvc_yaml(path: Path, cfg: dict[str, Any]) -> None:
    """dvc.yaml lists the runs of the params it was written for (pipeline/dag.py): after a change of
    generators, variants, amounts, seeds or threats it would plan other runs, so `dvc repro` stops here,
    before any stage, instead of running a stale plan."""
    from pipeline import dag  # dag reads params: imported here, not at the top

    if dag.stale(path, cfg):
        raise ParamsError(f"{path}: plans other runs than these params (generators, variants, amounts, seeds or "
                          f"threats changed): run `python -m pipeline.dag write {path}`, then `dvc repro` again")


def shard_count(cfg: dict[str, Any]) -> int:
    return math.ceil(cfg["generate"]["n_images"] / cfg["generate"]["shard_size"])


def eval_chunk_count(evaluate: Mapping[str, Any]) -> int:
    """AutoAttack chunks of one (run, threat), from the `evaluate` section: the first n_eval test images
    in chunks of chunk_size (one Snakemake job each; pipeline/evaluate.py, pipeline/eval_chunks.py)."""
    return math.ceil(evaluate["n_eval"] / evaluate["chunk_size"])


def shard_range(cfg: dict[str, Any], index: int) -> tuple[int, int]:
    """Global image indices [start, stop) of shard `index`."""
    size, total = cfg["generate"]["shard_size"], cfg["generate"]["n_images"]
    if not 0 <= index < shard_count(cfg):
        raise ParamsError(f"shard index {index} outside 0..{shard_count(cfg) - 1}")
    return index * size, min((index + 1) * size, total)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.params", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="validate a params file")
    check.add_argument("path", type=Path)
    check.add_argument("--stamp", type=Path, help="write this file when valid (DVC dependency)")
    check.add_argument("--ensure-dir", type=Path, action="append", default=[],
                       help="create this folder when valid (a DVC stage depends on it even when empty)")
    check.add_argument("--dvc-yaml", type=Path,
                       help="also refuse this dvc.yaml when it plans other runs than the params (DVC's first stage)")
    use = commands.add_parser("use", help="write params.yaml from a preset in configs/")
    use.add_argument("name")
    use.add_argument("--dataset", help="also lay configs/datasets/<dataset>.yaml over it (cifar10, cifar100, svhn)")
    use.add_argument("--out", type=Path, default=Path("params.yaml"))
    args = parser.parse_args(argv)
    try:
        if args.command == "check":
            cfg = load(args.path)
            if args.dvc_yaml:
                check_dvc_yaml(args.dvc_yaml, cfg)
            if args.stamp:
                args.stamp.parent.mkdir(parents=True, exist_ok=True)
                args.stamp.write_text("valid\n")  # constant: params changes must not cascade
            for folder in args.ensure_dir:
                folder.mkdir(parents=True, exist_ok=True)
            print(f"{args.path}: valid")
        else:
            cfg = preset(args.name, dataset=args.dataset)
            if args.name == "default" and args.dataset is None:
                text = (CONFIGS_DIR / "default.yaml").read_text()
            else:
                command = f"python -m pipeline.params use {args.name}" + (
                    f" --dataset {args.dataset}" if args.dataset else "")
                layers = (f" with configs/{args.name}.yaml" if args.name != "default" else "") + (
                    f" and configs/datasets/{args.dataset}.yaml" if args.dataset else "")
                text = (f"# Written by `{command}`: configs/default.yaml{layers} laid over it.\n"
                        "# Return to the small default with `python -m pipeline.params use default`.\n")
                text += yaml.safe_dump(cfg, sort_keys=False, default_flow_style=False)
            args.out.write_text(text)
            print(f"{args.out}: now the {args.name!r} configuration"
                  + (f" on {args.dataset}" if args.dataset else ""))
            dvc_yaml = args.out.with_name("dvc.yaml")
            if dvc_yaml.exists():   # its run stages list the runs of these params
                from pipeline import dag

                dag.write(dvc_yaml, cfg)
                print(f"{dvc_yaml}: rewritten for its runs")
    except ParamsError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
