"""One command that proves the GPU path and what it costs, built so that no failure loses a result.

    python bench/gpu_check.py                    # one GPU, about 8 minutes: every part but the DAG
    python bench/gpu_check.py --device cpu       # the toy CPU setting the tests run, labelled "cpu"
    python bench/gpu_check.py --parts stages,sampling --dag   # a choice of parts; --dag adds the whole test DAG

Each part runs in its own guarded call, and `<out>/gpu_check-<label>.json` (and `.md`) is rewritten
atomically before each part starts (the part marked `running`) and the moment it ends (`ok`, with its
rows, or `error`, with the exception and the tail of its traceback). A part that raises, runs out of
memory or is killed with the whole process leaves every earlier part's result on disk. The risky part,
torch.compile, runs last. Parts, in order:

1. `stages`: the stages themselves, end to end through their CLIs in a temporary folder, on the device:
   `pipeline.data` (the shipped demo archive), `pipeline.threat_model`, `pipeline.train_robust` (the
   baseline run: loader, TRADES with bf16 autocast, validation of the EMA model, checkpoints) and
   `pipeline.evaluate` (AutoAttack standard on the model it trained, with the PGD sweep). Seconds per
   stage, training images/s end to end, the run's validation robust accuracy, the evaluation's clean,
   PGD and AutoAttack accuracies and flags, and whether the newest checkpoint reads back at the last step.
2. `train`: WRN-28-10 TRADES (10 attack steps) images/s at batch 512: ours (pipeline.train_robust's
   step: bf16 autocast, channels-last, eager) against the PyTorch port's `trades_loss` loop as that
   repository runs it (fp32): bench/bench_train.py's `make_ours` and `make_port`. Also the host
   synchronisations of one training step (torch.cuda.set_sync_debug_mode; 0 expected).
3. `sampling`: the generate stage's own samplers as they run in that stage (fp32, each image's noise
   drawn on the CPU from its own seed, tiles of `generate.batch_size`): pipeline.generators.ddpm's
   DDPMSampler (ancestral, the paper UNet) and pipeline.generators.edm's EDMSampler (Heun, the paper
   EDM UNet), randomly initialised (the cost of sampling does not depend on the weights).
4. `dag` (only with --dag): the test-scale workflow through Snakemake with `base.device` set to the
   device (about 100 processes: not a first smoke test); the table must have one row per (run,
   threat) with 0 <= AutoAttack accuracy <= clean accuracy <= 1.
5. `compile`: ours with `train_robust.compile: true` (inductor): first step (compilation) and images/s.

Peak GPU memory (torch.cuda.max_memory_allocated) beside each figure. On a CPU (`--device cpu`, or no GPU
visible) every part runs at toy scale (small_cnn, batch 8, two sampling steps): it shows the script
works, not how fast anything is. Preparing a machine that has torch but not the other dependencies:
bench/prepare_device.sh and bench/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import bench_train  # noqa: E402

from pipeline import params as P  # noqa: E402
from pipeline.models import resolve_device  # noqa: E402

DEMO_ARCHIVE = ROOT / "data" / "demo" / "cifar-10-demo-python.tar.gz"


@dataclass(frozen=True)
class Scale:
    label: str               # "cuda" or "cpu": printed with every figure
    model: str               # robust model of the train and compile parts
    batch: int               # training batch
    attack_steps: int
    steps: int               # timed training steps per block
    repeats: int             # timed blocks per training variant
    config: str              # params overlay the generator shapes come from
    sampling_steps: int      # DDPM ancestral steps (the stage's default at test scale is far fewer than 1000)
    edm_steps: int           # EDM Heun steps (2 * steps - 1 network calls)
    sample_images: int
    sample_batch: int        # generate.batch_size: the samplers' tile
    stages: dict[str, Any]   # laid over configs/default.yaml for the stages part


# The stages part on a GPU: WRN-28-10 as the paper trains it (TRADES-10, batch 512 here), 20 steps over
# two epochs (so validation, best.pt and an epoch boundary all happen), a checkpoint every 10 steps, then
# AutoAttack on the 500 demo test images. About 2 minutes on one recent GPU (an estimate, not measured).
GPU_STAGES = {
    "data": {"val_size": 512},
    "train_robust": {"model": "wrn-28-10", "batch_size": 512, "epochs": 2, "epoch_size": 5120, "attack_steps": 10,
                     "lr": 0.2, "warmup_epochs": 1, "val_pgd_steps": 10, "val_batch_size": 512,
                     "checkpoint_every": 10, "num_workers": 4},
    "evaluate": {"n_eval": 500, "batch_size": 500, "chunk_size": 500, "pgd_steps": 20, "n_sweep": 100},
}
GPU = Scale("cuda", "wrn-28-10", 512, 10, 5, 2, "configs/paper.yaml", 20, 18, 512, 256, GPU_STAGES)
# On a CPU: the test settings (tests/params.yaml), AutoAttack on 4 images (one chunk): an 8-step small_cnn
# keeps a few images correct, and each survivor costs AutoAttack's later attacks tens of seconds on a CPU.
CPU_STAGES = {key: value for key, value in yaml.safe_load((ROOT / "tests" / "params.yaml").read_text()).items()
              if key in ("data", "train_robust", "evaluate")}
CPU_STAGES["evaluate"] = {**CPU_STAGES["evaluate"], "n_eval": 4, "batch_size": 4, "chunk_size": 4, "n_sweep": 4}
CPU = Scale("cpu", "small_cnn", 8, 1, 1, 1, "tests/params.yaml", 2, 2, 4, 4, CPU_STAGES)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def peak_memory(device: torch.device, into: dict[str, Any]) -> Iterator[None]:
    """Peak allocated GPU memory of the block in GiB into `into["peak_gib"]` (None on a CPU)."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    into["peak_gib"] = None
    yield
    if device.type == "cuda":
        synchronize(device)
        into["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)


def rate(fn: Callable[[], Any], images: int, device: torch.device) -> float:
    """Images per second of one call of `fn` that handles `images` images."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return images / (time.perf_counter() - start)


@contextmanager
def cudnn_flags() -> Iterator[None]:
    """Restore cudnn's flags after the block (the samplers set deterministic kernels for themselves)."""
    flags = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = flags


# --- 1. the stages, end to end ---


def stage_params(scale: Scale, device: torch.device, root: Path) -> Path:
    """configs/default.yaml with the scale's stage settings and base.device, validated, as root/params.yaml."""
    cfg = P.deep_merge(yaml.safe_load((ROOT / "configs" / "default.yaml").read_text()), scale.stages)
    cfg["base"]["device"] = device.type
    cfg["data"]["archive"] = str(DEMO_ARCHIVE)
    cfg["generate"]["generators"], cfg["variants"]["names"] = [], []   # the real-data baseline run only
    root.mkdir(parents=True, exist_ok=True)
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(P.validate(cfg)))
    return path


def stages_part(scale: Scale, device: torch.device, root: Path) -> list[dict[str, Any]]:
    """data -> threat_model -> train_robust -> evaluate through their CLIs (in this process)."""
    from pipeline import checkpoint
    from pipeline import data as data_stage
    from pipeline import evaluate as evaluate_stage
    from pipeline import threat_model as threat_stage
    from pipeline import train_robust as train_stage

    params = stage_params(scale, device, root)
    cfg = P.load(params)
    data, work = root / "data", root / "work"
    run = "baseline"
    model, best = root / "models" / run / "last.pt", root / "models" / run / "best.pt"
    metrics, evaluation = root / "results" / "train_robust.json", root / "results" / "evaluate.json"
    calls: list[tuple[str, Callable[[list[str]], None], list[str]]] = [
        ("data", data_stage.main, ["--params", str(params), "--out-dir", str(data), "--raw-dir", str(root / "raw")]),
        ("threat_model", threat_stage.main, ["--params", str(params), "--run", run, "--generators-dir",
                                             str(root / "generators"), "--out-dir", str(root / "threat")]),
        ("train_robust", train_stage.main, [
            "--params", str(params), "--run", run, "--train", str(data / "train.h5"), "--val", str(data / "val.h5"),
            "--threat-model", str(root / "threat" / f"{run}.json"), "--workdir", str(work / "train_robust"),
            "--out-model", str(model), "--out-best", str(best), "--out-metrics", str(metrics),
            "--out-curve", str(root / "results" / "curve.csv")]),
        ("evaluate", evaluate_stage.main, [
            "--params", str(params), "--model", str(best if cfg["evaluate"]["checkpoint"] == "best" else model),
            "--test", str(data / "test.h5"), "--threat", "linf", "--run", run, "--workdir", str(work / "evaluate"),
            "--out", str(evaluation), "--out-examples", str(root / "results" / "evaluate.h5")])]
    record: dict[str, Any] = {"part": "stages", "variant": f"{run}: {cfg['train_robust']['model']}, TRADES-"
                              f"{cfg['train_robust']['attack_steps']}, batch {cfg['train_robust']['batch_size']}"}
    with peak_memory(device, record):
        for name, main, argv in calls:
            start = time.perf_counter()
            main(argv)
            synchronize(device)
            record[f"{name}_s"] = round(time.perf_counter() - start, 1)
    trained, evaluated = json.loads(metrics.read_text()), json.loads(evaluation.read_text())
    saved = checkpoint.latest(work / "train_robust")
    record.update({
        "images_per_s": round(trained["steps"] * cfg["train_robust"]["batch_size"] / record["train_robust_s"], 2),
        "steps": trained["steps"], "val_robust_acc_best": trained["val_robust_acc_best"],
        "checkpoint_ok": saved is not None and saved["step"] == trained["steps"],
        **{key: evaluated.get(key) for key in ("n_eval", "clean_acc", "pgd_acc", "autoattack_acc", "flags")}})
    return [record]


# --- 2 and 5. robust training throughput ---


def host_syncs_per_step(step: Callable[[], None], device: torch.device, steps: int = 2) -> float | None:
    """Synchronisations torch reports (set_sync_debug_mode) per training step; None on a CPU."""
    if device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught) / steps


def train_variant(name: str, scale: Scale, device: torch.device, compiled: bool, port: bool) -> dict[str, Any]:
    """Warm up (compiling, if asked), then `repeats` timed blocks of `steps` steps; median images/s."""
    record: dict[str, Any] = {"part": "train", "variant": name}
    with peak_memory(device, record):
        ours, port_step = bench_train.build(scale.model, scale.attack_steps, scale.batch, device, compile=compiled)
        step = port_step if port else ours
        del ours, port_step
        start = time.perf_counter()
        step()
        synchronize(device)
        record["first_step_s"] = round(time.perf_counter() - start, 2)   # includes compilation
        step()
        rates = [scale.batch * scale.steps / bench_train.timed(step, scale.steps) for _ in range(scale.repeats)]
        if not port and not compiled:
            record["host_syncs_per_step"] = host_syncs_per_step(step, device)
    record["images_per_s"] = round(statistics.median(rates), 2)
    return record


def train_part(scale: Scale, device: torch.device) -> list[dict[str, Any]]:
    rows = [train_variant("port (fp32)", scale, device, compiled=False, port=True),
            train_variant("ours, eager", scale, device, compiled=False, port=False)]
    rows[1]["vs_port"] = round(rows[1]["images_per_s"] / rows[0]["images_per_s"], 2)
    return rows


def compile_part(scale: Scale, device: torch.device) -> list[dict[str, Any]]:
    return [train_variant("ours, compile", scale, device, compiled=True, port=False)]


# --- 3. the generate stage's samplers ---


def generator_sections(scale: Scale) -> dict[str, Any]:
    """train_generator's sections at the scale's overlay (paper shapes on a GPU, test shapes on a CPU)."""
    default = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())
    overlay = yaml.safe_load((ROOT / scale.config).read_text())
    return dict(P.deep_merge(default, overlay)["train_generator"])


def sampler_models(scale: Scale) -> dict[str, dict[str, Any]]:
    """Randomly initialised DDPM and EDM in the checkpoint form train_generator writes (what generate loads)."""
    from pipeline.generators import ddpm, diffusion_training, edm

    torch.manual_seed(0)
    sections = generator_sections(scale)
    cfg = P.section(ddpm.Config, {**sections["ddpm"], "pretrained": ""})
    unet = ddpm.build_unet(cfg)
    ddpm_model = {"kind": ddpm.NAME, "unet_config": diffusion_training.unet_config(unet),
                  "state_dict": unet.state_dict(), "num_train_timesteps": cfg.num_train_timesteps,
                  "beta_start": ddpm.BETA_START, "beta_end": ddpm.BETA_END}
    edm_unet = edm.build_unet(P.section(edm.Config, sections["edm"]), 10)
    edm_model = {"kind": edm.NAME, "unet_config": diffusion_training.unet_config(edm_unet),
                 "state_dict": edm_unet.state_dict(), "num_classes": 10, "sigma_data": edm.SIGMA_DATA}
    return {"ddpm": ddpm_model, "edm": edm_model}


def sampling_part(scale: Scale, device: torch.device) -> list[dict[str, Any]]:
    """images/s of DDPMSampler and EDMSampler, as `python -m pipeline.generate` runs them."""
    from pipeline.generators import base, ddpm, edm

    settings = base.SampleSettings(seed=0, batch_size=scale.sample_batch, sampler="ddpm",
                                   sampling_steps=scale.sampling_steps, ddpm_variance="fixedlarge",
                                   edm_steps=scale.edm_steps)
    made = sampler_models(scale)
    samplers = {f"DDPM ancestral, {scale.sampling_steps} steps": (ddpm.DDPMSampler, made["ddpm"]),
                f"EDM Heun, {scale.edm_steps} steps": (edm.EDMSampler, made["edm"])}
    rows = []
    for variant, (kind, model) in samplers.items():
        record: dict[str, Any] = {"part": "sampling", "variant": variant}
        with cudnn_flags(), peak_memory(device, record):
            sampler = kind(model, settings, device)
            sampler.sample(0, scale.sample_batch)   # warm-up
            record["images_per_s"] = round(rate(lambda s=sampler: s.sample(0, scale.sample_images),
                                                scale.sample_images, device), 2)
        rows.append(record)
    return rows


# --- 4. the whole test DAG (opt-in) ---


def device_memory_poller(device: torch.device) -> tuple[Callable[[], float | None], threading.Event]:
    """A thread sampling the device memory in use (every process) every 0.2 s; returns (peak GiB, stop)."""
    stop, peak = threading.Event(), {"used": 0}
    if device.type != "cuda":
        return (lambda: None), stop
    free, total = torch.cuda.mem_get_info(device)
    base = total - free

    def poll() -> None:
        while not stop.wait(0.2):
            free_now, _ = torch.cuda.mem_get_info(device)
            peak["used"] = max(peak["used"], total - free_now - base)
    threading.Thread(target=poll, daemon=True).start()
    return (lambda: round(peak["used"] / 2**30, 2)), stop


def dag_part(device: torch.device, cores: int, keep: Path | None) -> list[dict[str, Any]]:
    """The test-scale DAG with base.device = the device, in a fresh copy of the workflow."""
    from tests.helpers import BIN, env, make_workdir

    root = Path(tempfile.mkdtemp(prefix="gpu_check_dag_")) if keep is None else keep
    workdir = make_workdir(root / "workflow")
    cfg = yaml.safe_load((workdir / "params.yaml").read_text())
    cfg["base"]["device"] = device.type
    (workdir / "params.yaml").write_text(yaml.safe_dump(P.validate(cfg)))
    peak, stop = device_memory_poller(device)
    start = time.perf_counter()
    table = f"results/{cfg['base']['dataset']}_table.csv"
    done = subprocess.run([str(BIN / "snakemake"), "--cores", str(cores), table], cwd=workdir, env=env(),
                          capture_output=True, text=True)
    stop.set()
    record: dict[str, Any] = {"part": "dag", "variant": "test DAG through Snakemake",
                              "seconds": round(time.perf_counter() - start, 1), "returncode": done.returncode,
                              "workdir": str(workdir), "peak_gib": peak()}
    if done.returncode != 0:
        raise RuntimeError(f"snakemake exited {done.returncode}: {(done.stdout + done.stderr)[-3000:]}")
    record.update(table_check(workdir / table, cfg))
    if not record["table_ok"]:
        raise RuntimeError(f"the DAG's table fails its checks: {record}")
    return [record]


def table_check(path: Path, cfg: dict[str, Any]) -> dict[str, Any]:
    """The DAG's table has one row per (run, threat), each with 0 <= AutoAttack <= clean <= 1."""
    from tests.helpers import read_table

    rows = read_table(path)
    sane = all(0 <= float(r["autoattack_acc"]) <= float(r["clean_acc"]) <= 1 for r in rows)
    found = {(r["run"], r["threat"]) for r in rows}
    expected = {(run, threat) for run in P.runs(cfg) for threat in cfg["evaluate"]["threats"]}
    return {"rows": len(rows), "expected_rows": len(expected),
            "table_ok": sane and found == expected and len(rows) == len(expected)}


# --- the guarded runner and the report ---

# --- 5. a RobustBench zoo file (opt-in, --zoo) ---


# RobustBench's published numbers (its model_info/cifar10/Linf/<name>.json): clean, AutoAttack accuracy
ZOO_PUBLISHED: dict[str, tuple[str, float, float]] = {
    "Gowal2021Improving_70_16_ddpm_100m": ("DMWideResNet", 0.8874, 0.6611),
}
ZOO_CLEAN_SLACK = 5 / 10_000   # GPU convolution rounding may flip a few borderline images


def zoo_part(path: Path, test: Path, aa_images: int, device: torch.device) -> dict[str, Any]:
    """A zoo file's clean accuracy on the whole test set against RobustBench's, and AutoAttack on a few."""
    from pyautoattack import AutoAttack

    from pipeline import robustbench
    from pipeline.inference import predict_labels, to_float
    from pipeline.shards import read_imageset

    if path.stem not in ZOO_PUBLISHED:
        raise SystemExit(f"error: {path}: no published numbers recorded for {path.stem} (ZOO_PUBLISHED)")
    architecture, clean_ref, aa_ref = ZOO_PUBLISHED[path.stem]
    model = robustbench.load_zoo_file(path, architecture)[0].to(device).eval()
    images, labels = read_imageset(test)
    record: dict[str, Any] = {"part": "zoo", "variant": f"{path.stem} (clean {len(labels)}, AutoAttack {aa_images})"}
    with peak_memory(device, record):
        start = time.perf_counter()
        clean = float((predict_labels(model, to_float(images), 500, device) == labels).mean())
        record["images_per_s"] = round(len(labels) / (time.perf_counter() - start), 2)
        x = to_float(images[:aa_images]).to(device)
        y = torch.from_numpy(labels[:aa_images].astype("int64")).to(device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            adversary = AutoAttack(model, norm="Linf", eps=8 / 255, version="standard", seed=0, device=device)
            x_adv = adversary.run_standard_evaluation(x, y, batch_size=500)[0]
        with torch.no_grad():
            robust = float((model(x_adv).argmax(1) == y).float().mean())
    record.update(clean_acc=clean, clean_published=clean_ref, autoattack_acc_first=robust,
                  autoattack_published=aa_ref, survived=robust,
                  ok=len(labels) == 10_000 and abs(clean - clean_ref) <= ZOO_CLEAN_SLACK)
    return record



PART_ORDER = ("stages", "train", "sampling", "dag", "zoo", "compile")   # compile last: the likeliest to fail or hang
DEFAULT_PARTS = ("stages", "train", "sampling", "compile")


def write_report(report: dict[str, Any], out: Path) -> None:
    """JSON and markdown of the report so far, each replaced atomically (a kill leaves the previous one)."""
    out.mkdir(parents=True, exist_ok=True)
    for suffix, text in (("json", json.dumps(report, indent=2) + "\n"), ("md", markdown(report))):
        final = out / f"gpu_check-{report['label']}.{suffix}"
        tmp = final.with_name(f".{final.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, final)


def run_part(name: str, fn: Callable[[], list[dict[str, Any]]], report: dict[str, Any], out: Path,
             device: torch.device) -> bool:
    """Run one part guarded: its entry is `running` on disk while it runs, then `ok` with its rows,
    `failed` with its rows when a row's check (`ok`, `*_ok`) is false, or `error` with the exception; the
    report is written after each. Returns whether it succeeded."""
    entry: dict[str, Any] = {"status": "running"}
    report["parts"][name] = entry
    write_report(report, out)
    start = time.perf_counter()
    try:
        entry["rows"] = fn()
        failed = sorted({key for row in entry["rows"] for key, value in row.items()
                         if (key == "ok" or key.endswith("_ok")) and value is False})
        entry["status"] = "failed" if failed else "ok"
        if failed:   # ran to the end, but a check came out false: the rows stay, the exit code says so
            entry["error"] = f"check failed: {', '.join(failed)}"
            print(f"gpu_check: part {name}: {entry['error']}", file=sys.stderr)
    except (Exception, SystemExit) as error:  # a stage CLI leaves with SystemExit("error: ...")
        entry.update(status="error", error=f"{type(error).__name__}: {error}"[:2000],
                     traceback=traceback.format_exc()[-4000:])
        print(f"gpu_check: part {name} failed: {entry['error']}", file=sys.stderr)
    finally:
        entry["seconds"] = round(time.perf_counter() - start, 1)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        write_report(report, out)
    return entry["status"] == "ok"


NOTES = ("first_step_s", "host_syncs_per_step", "data_s", "threat_model_s", "train_robust_s", "evaluate_s",
         "steps", "val_robust_acc_best", "checkpoint_ok", "n_eval", "clean_acc", "pgd_acc", "autoattack_acc", "flags",
         "seconds", "table_ok")


def markdown(report: dict[str, Any]) -> str:
    head = (f"# gpu_check ({report['label']}): {report['device_name']}, torch {report['torch']}, "
            f"Python {report['python']}\n\n")
    lines = ["| part | variant | images/s | vs port | peak GPU memory GiB | notes |", "|---|---|---:|---:|---:|---|"]
    problems = []
    for name, entry in report["parts"].items():
        if entry["status"] != "ok":
            problems.append(f"- {name}: {entry['status']}" + (f" ({entry['error']})" if "error" in entry else ""))
        for row in entry.get("rows", []):
            notes = [f"{k} {row[k]}" for k in NOTES if row.get(k) not in (None, "")]
            peak = "n/a (cpu)" if row.get("peak_gib") is None else row["peak_gib"]
            lines.append(f"| {row['part']} | {row['variant']} | {row.get('images_per_s', '')} | "
                         f"{row.get('vs_port', '')} | {peak} | {', '.join(notes)} |")
    tail = "\n\nNot finished or failed:\n" + "\n".join(problems) if problems else ""
    return head + "\n".join(lines) + tail + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "gpu_check")
    parser.add_argument("--parts", default=",".join(DEFAULT_PARTS),
                        help=f"comma-separated, run in the order {', '.join(PART_ORDER)} (default: all but dag)")
    parser.add_argument("--dag", action="store_true", help="add part dag (the whole test DAG; ~100 processes)")
    parser.add_argument("--dag-dir", type=Path, help="run the DAG here (kept) instead of a temporary folder")
    parser.add_argument("--cores", type=int, default=8, help="snakemake --cores of the DAG part")
    parser.add_argument("--work", type=Path, help="folder of the stages part (default: a temporary one)")
    parser.add_argument("--zoo", type=Path, help="adds part zoo: a local RobustBench zoo file (docs/robustbench.md)")
    parser.add_argument("--zoo-test", type=Path, help="the full CIFAR-10 test set (HDF5) for --zoo")
    parser.add_argument("--zoo-aa-images", type=int, default=500, help="AutoAttack images of part zoo")
    args = parser.parse_args(argv)
    if args.zoo and not args.zoo_test:
        parser.error("--zoo needs --zoo-test (the full CIFAR-10 test set)")
    chosen = {part.strip() for part in args.parts.split(",") if part.strip()} | ({"dag"} if args.dag else set()) \
        | ({"zoo"} if args.zoo else set())
    unknown = chosen - set(PART_ORDER)
    if unknown:
        parser.error(f"--parts: unknown {', '.join(sorted(unknown))}; known: {', '.join(PART_ORDER)}")
    device = resolve_device(args.device)
    scale = GPU if device.type == "cuda" else CPU
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu_check_"))
    parts: dict[str, Callable[[], list[dict[str, Any]]]] = {
        "stages": lambda: stages_part(scale, device, work / "stages"),
        "train": lambda: train_part(scale, device),
        "sampling": lambda: sampling_part(scale, device),
        "dag": lambda: dag_part(device, args.cores, args.dag_dir),
        "zoo": lambda: [zoo_part(args.zoo, args.zoo_test, args.zoo_aa_images, device)],
        "compile": lambda: compile_part(scale, device),
    }
    report: dict[str, Any] = {
        "label": scale.label, "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
        else platform.processor() or platform.machine(), "torch": torch.__version__,
        "python": platform.python_version(), "scale": dataclasses.asdict(scale), "parts": {}}
    ok = [run_part(name, parts[name], report, args.out, device) for name in PART_ORDER if name in chosen]
    print(markdown(report))
    return 0 if all(ok) else 1


if __name__ == "__main__":
    sys.exit(main())
