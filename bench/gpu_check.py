"""One command that proves the GPU path, and what it costs: throughput and peak GPU memory side by side.

    python bench/gpu_check.py                         # on one GPU: all four parts (about 8 minutes budgeted)
    python bench/gpu_check.py --device cpu --skip-dag # the tiny CPU setting the tests run, labelled "cpu"

1. DAG: the test-scale workflow (configs/default.yaml + tests/params.yaml) with `base.device` set to the
   device, end to end through Snakemake in a temporary copy; the table must have one row per (run,
   threat) with 0 <= AutoAttack accuracy <= clean accuracy <= 1.
2. Robust training: WRN-28-10 TRADES (10 attack steps) images/s at batch 512: ours
   (pipeline.train_robust.train_step: bf16 autocast, channels-last, `compile` off and on) against the
   PyTorch port's `trades_loss` loop as that repository runs it (fp32, `model.train()` with running
   statistics frozen for the attack): bench/bench_train.py's `make_ours` and `make_port`, one copy. Also
   the host synchronisations in one training step (torch.cuda.set_sync_debug_mode; 0 expected).
3. Sampling and evaluation: DDPM ancestral sampling (pipeline.generators.ddpm.DDPMSampler, the paper
   UNet), EDM Heun sampling (pipeline.generators.edm.heun_sample, the paper DDPM++-like UNet, when that
   module exists), and AutoAttack (standard, as pipeline.evaluate runs it) images/s on WRN-28-10.
4. The peak GPU memory of each (torch.cuda.max_memory_allocated; for the DAG, the most device memory in
   use while its jobs ran).
5. With `--zoo FILE --zoo-test data/cifar10/test.h5` (a local RobustBench zoo file, e.g.
   Gowal2021Improving_70_16_ddpm_100m.pt, and the full CIFAR-10 test set): the file through
   pipeline/robustbench.py, its clean accuracy on all 10,000 test images against RobustBench's published
   value (within 5 images), and AutoAttack on the first `--zoo-aa-images`. The full leaderboard
   reproduction is one `pipeline.evaluate` command over all 10,000 images (docs/robustbench.md), not this check.

Randomly initialised networks: throughput does not depend on the weights, except AutoAttack's, which
attacks only the images still classified correctly. Labels are the model's own clean predictions, so
every image starts correct; how many survive is reported beside the rate (a robust model keeps more
images through all four attacks and runs slower per image).

On a CPU (`--device cpu`, or no GPU visible) every part runs at toy scale (small_cnn, batch 8, two
sampling steps): it shows the script works, not how fast anything is. Writes
`<out>/gpu_check-<label>.json` and `.md`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
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

from pipeline import models  # noqa: E402
from pipeline import params as P  # noqa: E402


@dataclass(frozen=True)
class Scale:
    label: str               # "cuda" or "cpu": printed with every figure
    model: str               # robust model of parts 2 and 3
    batch: int               # training batch
    attack_steps: int
    steps: int               # timed training steps per block
    repeats: int             # timed blocks per training variant
    config: str              # params overlay the generator shapes come from
    sampling_steps: int      # DDPM ancestral steps (the stage's default at test scale is far fewer than 1000)
    edm_steps: int           # EDM Heun steps (2 * steps - 1 network calls)
    sample_images: int
    sample_batch: int
    aa_images: int


GPU = Scale("cuda", "wrn-28-10", 512, 10, 5, 2, "configs/paper.yaml", 20, 18, 512, 256, 256)
CPU = Scale("cpu", "small_cnn", 8, 1, 1, 1, "tests/params.yaml", 2, 2, 4, 4, 8)


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
    yield
    if device.type == "cuda":
        synchronize(device)
        into["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    else:
        into["peak_gib"] = None


def rate(fn: Callable[[], None], images: int, device: torch.device) -> float:
    """Images per second of one call of `fn` that handles `images` images."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return images / (time.perf_counter() - start)


# --- 1. the DAG ---


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


def dag_part(device: torch.device, cores: int, keep: Path | None) -> dict[str, Any]:
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
    seconds = time.perf_counter() - start
    stop.set()
    result: dict[str, Any] = {"seconds": round(seconds, 1), "returncode": done.returncode, "workdir": str(workdir),
                              "peak_gib": peak()}
    if done.returncode != 0:
        result["error"] = (done.stdout + done.stderr)[-3000:]
        return result
    result.update(table_check(workdir / table, cfg))
    return result


def table_check(path: Path, cfg: dict[str, Any]) -> dict[str, Any]:
    """The DAG's table has one row per (run, threat), each with 0 <= AutoAttack <= clean <= 1."""
    from tests.helpers import read_table

    rows = read_table(path)
    sane = all(0 <= float(r["autoattack_acc"]) <= float(r["clean_acc"]) <= 1 for r in rows)
    found = {(r["run"], r["threat"]) for r in rows}
    expected = {(run, threat) for run in P.runs(cfg) for threat in cfg["evaluate"]["threats"]}
    return {"rows": len(rows), "expected_rows": len(expected),
            "table_ok": sane and found == expected and len(rows) == len(expected)}


# --- 2. robust training ---


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
            train_variant("ours, eager", scale, device, compiled=False, port=False),
            train_variant("ours, compile", scale, device, compiled=True, port=False)]
    for row in rows:
        row["vs_port"] = round(row["images_per_s"] / rows[0]["images_per_s"], 2)
    return rows


# --- 3. sampling and AutoAttack ---


def generator_sections(scale: Scale) -> dict[str, Any]:
    """train_generator's sections at the scale's overlay (paper shapes on a GPU, test shapes on a CPU)."""
    default = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())
    overlay = yaml.safe_load((ROOT / scale.config).read_text())
    return dict(P.deep_merge(default, overlay)["train_generator"])


def ddpm_part(scale: Scale, device: torch.device) -> dict[str, Any]:
    from pipeline.generators import base, ddpm, diffusion_training

    cfg = P.section(ddpm.Config, {**generator_sections(scale)["ddpm"], "pretrained": ""})
    unet = ddpm.build_unet(cfg)
    model = {"kind": ddpm.NAME, "unet_config": diffusion_training.unet_config(unet), "state_dict": unet.state_dict(),
             "num_train_timesteps": cfg.num_train_timesteps, "beta_start": ddpm.BETA_START, "beta_end": ddpm.BETA_END}
    flags = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark   # the sampler sets both
    record: dict[str, Any] = {"part": "sampling", "variant": f"DDPM ancestral, {scale.sampling_steps} steps"}
    try:
        with peak_memory(device, record):
            sampler = ddpm.DDPMSampler(model, base.SampleSettings(0, scale.sample_batch, "ddpm", scale.sampling_steps),
                                       device)
            sampler.sample(0, scale.sample_batch)   # warm-up
            record["images_per_s"] = round(rate(lambda: sampler.sample(0, scale.sample_images),
                                                scale.sample_images, device), 2)
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = flags
    return record


def edm_part(scale: Scale, device: torch.device) -> dict[str, Any]:
    """EDM Heun sampling through `heun_sample`, the sampler of the edm generator."""
    from pipeline.generators import edm

    section = generator_sections(scale)["edm"]
    denoiser = edm.Denoiser(edm.build_unet(P.section(edm.Config, section), 10)).to(device).eval()
    labels = torch.arange(scale.sample_images, device=device) % 10
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu",
                                                                                                        enabled=False)

    def sample(n: int) -> None:
        latents = torch.randn(n, 3, 32, 32, device=device)
        with torch.inference_mode(), autocast:
            for lo in range(0, n, scale.sample_batch):
                part = slice(lo, min(n, lo + scale.sample_batch))
                edm.heun_sample(lambda x, sigma, c=labels[part]: denoiser(x, sigma.expand(len(x)), c),
                                latents[part], scale.edm_steps)

    record: dict[str, Any] = {"part": "sampling", "variant": f"EDM Heun, {scale.edm_steps} steps"}
    with peak_memory(device, record):
        sample(scale.sample_batch)   # warm-up
        record["images_per_s"] = round(rate(lambda: sample(scale.sample_images), scale.sample_images, device), 2)
    return record


def autoattack_part(scale: Scale, device: torch.device) -> dict[str, Any]:
    """AutoAttack standard, Linf 8/255, as pipeline.evaluate calls it, on the scale's model."""
    from pyautoattack import AutoAttack

    torch.manual_seed(0)
    model = models.build(scale.model).to(device).eval()
    x = torch.rand(scale.aa_images, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        y = model(x).argmax(1)      # every image starts classified "correctly"
    record: dict[str, Any] = {"part": "autoattack", "variant": "standard, Linf 8/255"}
    with peak_memory(device, record), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adversary = AutoAttack(model, norm="Linf", eps=8 / 255, version="standard", seed=0, device=device)
        found: dict[str, torch.Tensor] = {}
        record["images_per_s"] = round(rate(lambda: found.update(x=adversary.run_standard_evaluation(
            x, y, batch_size=scale.aa_images)[0]), scale.aa_images, device), 2)
    with torch.no_grad():
        record["survived"] = float((model(found["x"]).argmax(1) == y).float().mean())
    return record


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


# --- report ---


def markdown(report: dict[str, Any]) -> str:
    head = (f"# gpu_check ({report['label']}): {report['device_name']}, torch {report['torch']}, "
            f"Python {report['python']}\n\n")
    dag = report.get("dag")
    if dag:
        head += (f"DAG (test scale, base.device {report['label']}): {dag['seconds']} s, exit {dag['returncode']}, "
                 f"table ok: {dag.get('table_ok')}, peak device memory {dag['peak_gib']} GiB\n\n")
    lines = ["| part | variant | images/s | vs port | peak GPU memory GiB | notes |", "|---|---|---:|---:|---:|---|"]
    for row in report["parts"]:
        notes = [f"{k} {row[k]}" for k in ("first_step_s", "host_syncs_per_step", "survived", "clean_acc",
                                           "clean_published", "autoattack_published", "ok") if row.get(k) is not None]
        peak = "n/a (cpu)" if row["peak_gib"] is None else row["peak_gib"]
        lines.append(f"| {row['part']} | {row['variant']} | {row['images_per_s']} | {row.get('vs_port', '')} | "
                     f"{peak} | {', '.join(notes)} |")
    return head + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "gpu_check")
    parser.add_argument("--skip-dag", action="store_true", help="leave out part 1 (the tests do, on a CPU)")
    parser.add_argument("--dag-dir", type=Path, help="run the DAG here (kept) instead of a temporary folder")
    parser.add_argument("--cores", type=int, default=8, help="snakemake --cores of the DAG part")
    parser.add_argument("--zoo", type=Path, help="a local RobustBench zoo file (part 5; docs/robustbench.md)")
    parser.add_argument("--zoo-test", type=Path, help="the full CIFAR-10 test set (HDF5) for --zoo")
    parser.add_argument("--zoo-aa-images", type=int, default=500, help="AutoAttack images of part 5")
    args = parser.parse_args(argv)
    device = models.resolve_device(args.device)
    scale = GPU if device.type == "cuda" else CPU
    report: dict[str, Any] = {
        "label": scale.label, "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
        else platform.processor() or platform.machine(), "torch": torch.__version__,
        "python": platform.python_version(), "scale": dataclasses.asdict(scale), "parts": []}
    if not args.skip_dag:
        report["dag"] = dag_part(device, args.cores, args.dag_dir)
    report["parts"] += train_part(scale, device)
    report["parts"].append(autoattack_part(scale, device))
    report["parts"].append(ddpm_part(scale, device))
    report["parts"].append(edm_part(scale, device))
    if args.zoo:
        if not args.zoo_test:
            parser.error("--zoo needs --zoo-test (the full CIFAR-10 test set)")
        report["parts"].append(zoo_part(args.zoo, args.zoo_test, args.zoo_aa_images, device))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"gpu_check-{scale.label}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / f"gpu_check-{scale.label}.md").write_text(markdown(report))
    print(markdown(report))
    dag_ok = args.skip_dag or bool(report["dag"].get("table_ok"))
    zoo_ok = all(row.get("ok", True) for row in report["parts"])
    return 0 if dag_ok and zoo_ok else 1


if __name__ == "__main__":
    sys.exit(main())
