"""Sampling throughput (images/s) of our DDPM loop vs diffusers' DDPMPipeline on the same UNet and steps;
with --solvers, EDM Heun vs DDPM ancestral vs DDIM on that UNet: network calls and images/s.

    python bench/bench_sampling.py [--images 64] [--batch 32] [--steps 20] [--threads 2] [--repeats 3]
    python bench/bench_sampling.py --solvers [--images 8] [--batch 8] [--threads 1] [--repeats 2]

The UNet is the small default's (params.yaml train_generator.ddpm, random weights: speed does not
depend on them). For each sampler (ddpm ancestral, ddim, dpmsolver) both loops get the same scheduler
class and step count; the pipeline is called with one generator per batch, as its docs show, and ours
with per-image generators (what makes shards reproducible). Best of `repeats` runs, alternating which
goes first; the CPU-time ratio (process_time) is less sensitive to other jobs on a shared machine.

--solvers: the same UNet as D's network F in EDM's Heun sampler at 18 steps (pipeline.generators.edm
heun_sample with the EDM preconditioning, unconditional), in our DDPM loop with the ancestral sampler at
1000 steps (Ho et al.'s), and with DDIM at 20 steps (our default). A forward hook on the UNet counts its
calls; images/s is the best of `repeats` runs after a one-call warm-up, and ms per call shows that the
per-call cost is the same in all three, so throughput follows the call count.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import yaml
from diffusers import DDPMPipeline

from pipeline import params as params_mod
from pipeline.generators import SampleSettings, ddpm, edm

REPO = Path(__file__).resolve().parent.parent


class CallCounter:
    """Counts a module's forward calls (one per network evaluation) with a forward hook."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls = 0
        module.register_forward_hook(self._hook)

    def _hook(self, *_: object) -> None:
        self.calls += 1


def solver_runs(model: dict, images: int, batch: int) -> dict[str, tuple[Callable[[], object], CallCounter]]:
    """(sample `images` images, its UNet's call counter) for EDM Heun 18, DDPM ancestral 1000 and DDIM 20."""
    device = torch.device("cpu")
    runs: dict[str, tuple[Callable[[], object], CallCounter]] = {}
    denoiser = edm.Denoiser(ddpm.load_unet(model, device)).eval()
    latents = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    def heun() -> None:
        with torch.inference_mode():
            for _ in range(0, images, batch):
                edm.heun_sample(lambda x, sigma: denoiser(x, sigma, None), latents, 18)
    runs["EDM Heun, 18 steps"] = (heun, CallCounter(denoiser.unet))
    for name, sampler, steps in (("DDPM ancestral, 1000 steps", "ddpm", 1000), ("DDIM, 20 steps", "ddim", 20)):
        ours = ddpm.DDPMSampler(model, SampleSettings(seed=0, batch_size=batch, sampler=sampler, sampling_steps=steps,
                                                      ddpm_variance="fixedlarge", edm_steps=18), device)
        runs[name] = (lambda ours=ours: ours.sample(0, images), CallCounter(ours.unet))
    return runs


def solvers(args: argparse.Namespace, model: dict) -> None:
    """The side-by-side table of --solvers (see the module docstring)."""
    print("| sampler | UNet calls per batch (counted) | img/s (wall) | img/s (CPU time) | CPU ms per call "
          "(UNet + solver step) | speed-up vs ancestral 1000 (CPU time) |")
    print("|---|---|---|---|---|---|")
    rows = {}
    with torch.inference_mode():  # warm-up: oneDNN's primitive cache for this batch shape
        ddpm.load_unet(model, torch.device("cpu"))(torch.zeros(args.batch, 3, 32, 32), 999)
    for name, (run, counter) in solver_runs(model, args.images, args.batch).items():
        wall, cpu = float("inf"), float("inf")
        for _ in range(args.repeats):
            counter.calls = 0
            start, start_cpu = time.perf_counter(), time.process_time()
            run()
            wall, cpu = min(wall, time.perf_counter() - start), min(cpu, time.process_time() - start_cpu)
        rows[name] = (counter.calls * args.batch // args.images, args.images / wall, args.images / cpu,
                      1000 * cpu / counter.calls)
    base = rows["DDPM ancestral, 1000 steps"][2]
    for name, (calls, rate, cpu_rate, ms) in rows.items():
        print(f"| {name} | {calls} | {rate:.3f} | {cpu_rate:.3f} | {ms:.1f} | {cpu_rate / base:.1f}x |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--solvers", action="store_true", help="EDM Heun 18 vs DDPM ancestral 1000 vs DDIM 20")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    default = yaml.safe_load((REPO / "configs" / "default.yaml").read_text())
    cfg = params_mod.section(ddpm.Config, default["train_generator"]["ddpm"])
    torch.manual_seed(0)
    unet = ddpm.build_unet(cfg).eval()
    model = {"kind": "ddpm", "unet_config": dict(unet.config), "state_dict": unet.state_dict(),
             "num_train_timesteps": cfg.num_train_timesteps, "beta_start": ddpm.BETA_START,
             "beta_end": ddpm.BETA_END}
    device = torch.device("cpu")
    print(f"# {platform.machine()} {platform.processor() or ''}, {args.threads} torch threads, "
          f"torch {torch.__version__}, diffusers {__import__('diffusers').__version__}")
    print(f"# UNet {cfg.block_out_channels} x{cfg.layers_per_block}, attention={cfg.attention}, "
          f"{args.images} images, batch {args.batch}, {args.steps if not args.solvers else 'per sampler'} steps")
    if args.solvers:
        return solvers(args, model)
    print("| sampler | ours img/s | DDPMPipeline img/s | ratio ours/pipeline (wall) | ratio (CPU time) |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.pt"
        torch.save(model, path)
        for sampler in ("ddpm", "ddim", "dpmsolver"):
            settings = SampleSettings(seed=0, batch_size=args.batch, sampler=sampler, sampling_steps=args.steps,
                                      ddpm_variance="fixedlarge", edm_steps=18)
            ours = ddpm.load(path, settings, device)
            pipe = DDPMPipeline(unet=ddpm.load_unet(model, device), scheduler=ddpm.make_scheduler(sampler, model))
            pipe.set_progress_bar_config(disable=True)

            # Both are called within this iteration only, so they see this sampler's `ours` and `pipe`.
            def run_ours() -> None:
                ours.sample(0, args.images)  # noqa: B023

            def run_pipeline() -> None:
                for b in range(0, args.images, args.batch):
                    pipe(batch_size=min(args.batch, args.images - b), num_inference_steps=args.steps,  # noqa: B023
                         generator=torch.Generator().manual_seed(b), output_type="np")

            best = {"ours": float("inf"), "pipeline": float("inf")}
            cpu = {"ours": float("inf"), "pipeline": float("inf")}
            run_ours(), run_pipeline()  # warm-up (allocator, oneDNN primitive caches)
            for repeat in range(args.repeats):
                order = [("ours", run_ours), ("pipeline", run_pipeline)]
                for name, fn in order if repeat % 2 == 0 else order[::-1]:
                    start, start_cpu = time.perf_counter(), time.process_time()
                    fn()
                    best[name] = min(best[name], time.perf_counter() - start)
                    cpu[name] = min(cpu[name], time.process_time() - start_cpu)
            rate = {k: args.images / v for k, v in best.items()}
            print(f"| {sampler} | {rate['ours']:.2f} | {rate['pipeline']:.2f} | "
                  f"{rate['ours'] / rate['pipeline']:.2f}x | {cpu['pipeline'] / cpu['ours']:.2f}x |", flush=True)

if __name__ == "__main__":
    main()
