"""Importing a pretrained diffusers DDPM (e.g. Ho et al.'s CIFAR-10 model, google/ddpm-cifar10-32) as the
`ddpm` generator's model.pt, instead of training one.

`train_generator.ddpm.pretrained` names either a local folder, as `save_pretrained` writes it (a pipeline
folder with `unet/` and `scheduler/` subfolders, or a bare UNet folder with its `config.json`), or a
Hugging Face hub id. A hub id is resolved from the local Hugging Face cache only (local_files_only): a run
never downloads, so it neither hangs without internet nor changes weights behind the params; fetch the
weights first (`hf download google/ddpm-cifar10-32 --local-dir DIR`, then set the key to DIR).

model.pt holds what a trained ddpm model.pt holds (kind, UNet config, float32 state dict) plus
`scheduler_config`, the keys of the pretrained scheduler that define the noise process (betas, clip), which
`ddpm.make_scheduler` builds the sampling scheduler from, and `pretrained`: the source as given, the
sha256 of every file in the folder and, under `weights_sha256`, of the weights file loaded, the hub
revision when from the cache, and the scheduler file's full config, so shards trace back to exact
weights. A bare UNet folder without a scheduler config gets diffusers' DDPMScheduler defaults, Ho et al.'s
linear betas 1e-4..0.02 over 1000 steps with clipping (recorded as such).

Rejected, with one line naming the path: a folder without a UNet, a UNet that is not an unconditional
32 x 32 x 3 UNet2DModel (the ddpm sampler draws unconditional CIFAR-sized images), a learned variance
(6 output channels), and prediction types other than epsilon (the sampler's network output is the noise).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Any

from diffusers import DDPMScheduler, UNet2DModel

from pipeline import distributed
from pipeline.checkpoint import save_atomic
from pipeline.shards import file_sha256

log = logging.getLogger("pipeline.generators.ddpm_pretrained")
KIND = "ddpm"  # ddpm.NAME: the ddpm generator's sampler loads the model.pt written here
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
FETCH_HINT = ("fetch the weights first, e.g. `hf download google/ddpm-cifar10-32 --local-dir DIR` "
              "(`huggingface-cli download` before huggingface_hub 1.0), then set "
              "train_generator.ddpm.pretrained: DIR")
# Scheduler keys recorded in model.pt. The betas (schedule, start, end, T or trained_betas) and the x0
# clipping are what the weights were trained for: make_scheduler uses them. prediction_type and
# variance_type are only checked (epsilon; a fixed variance): which fixed variance, the sampler, its steps
# and timestep spacing are sampling choices, taken from `generate:` as for trained models.
# BETA_SCHEDULES: those the ddpm, ddim and dpmsolver schedulers all implement.
SCHEDULE_KEYS = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "trained_betas",
                 "clip_sample", "clip_sample_range", "prediction_type", "variance_type")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
FIXED_VARIANCES = ("fixed_small", "fixed_large", "fixed_small_log", "fixed_large_log")


class PretrainedError(ValueError):
    """A pretrained source that cannot be used; the message names the path or id."""


def resolve(source: str) -> tuple[Path, str | None]:
    """(local folder, hub revision or None): a folder as given, or a hub id's snapshot in the local cache."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise PretrainedError(f"{source}: train_generator.ddpm.pretrained must be a folder (diffusers "
                                  "save_pretrained layout) or a hub id, not a file")
        return path, None
    if not HUB_ID.match(source):
        raise PretrainedError(f"{source}: train_generator.ddpm.pretrained: no such folder")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(repo_id=source, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError) as error:
        raise PretrainedError(f"{source}: no such folder, and not in the local Hugging Face cache "
                              f"({type(error).__name__}); runs never download: {FETCH_HINT}") from None
    return folder, folder.name  # the cache's snapshots/<commit> folder


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise PretrainedError(f"{path}: unreadable config ({error})") from None


def find_parts(folder: Path) -> tuple[Path, Path | None]:
    """(UNet folder, scheduler config file or None) of a pipeline folder or a bare UNet folder."""
    unet_dir = folder / "unet" if (folder / "unet" / "config.json").is_file() else folder
    if not (unet_dir / "config.json").is_file():
        raise PretrainedError(f"{folder}: no UNet (need unet/config.json, as a diffusers pipeline folder has, "
                              "or config.json of a bare UNet2DModel folder)")
    for candidate in (folder / "scheduler" / "scheduler_config.json", folder / "scheduler_config.json"):
        if candidate.is_file():
            return unet_dir, candidate
    return unet_dir, None


def check_unet_config(config: dict[str, Any], where: Path) -> None:
    """An unconditional UNet2DModel on 32 x 32 x 3 images, predicting 3 channels (no learned variance)."""
    if config.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise PretrainedError(f"{where}: a {config['_class_name']}, but the ddpm sampler needs an unconditional "
                              "UNet2DModel")
    size = config.get("sample_size")
    sizes = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    channels = (config.get("in_channels", 3), config.get("out_channels", 3))
    if sizes != (32, 32) or channels != (3, 3):
        raise PretrainedError(f"{where}: a model of {sizes} pixels, {channels[0]} -> {channels[1]} channels; the "
                              "ddpm sampler draws 32 x 32 x 3 images and needs 3 output channels (no learned "
                              "variance)")
    if config.get("num_class_embeds") is not None or config.get("class_embed_type") is not None:
        raise PretrainedError(f"{where}: class-conditional (num_class_embeds {config.get('num_class_embeds')}, "
                              f"class_embed_type {config.get('class_embed_type')}); the ddpm sampler is "
                              "unconditional (the teacher labels its images)")


def schedule_config(raw: dict[str, Any], where: str) -> dict[str, Any]:
    """The noise-process keys of a scheduler config, diffusers' DDPMScheduler defaults filling the gaps."""
    defaults = dict(DDPMScheduler().config)  # type: ignore[attr-defined]  # diffusers' placeholder type
    if "timesteps" in raw:  # the name of num_train_timesteps in the first diffusers configs
        defaults["num_train_timesteps"] = raw["timesteps"]
    cfg = {key: raw.get(key, defaults[key]) for key in SCHEDULE_KEYS}
    if cfg["prediction_type"] != "epsilon":
        raise PretrainedError(f"{where}: prediction_type {cfg['prediction_type']!r}; the ddpm sampler "
                              "handles epsilon-prediction models only")
    if cfg["trained_betas"] is None and cfg["beta_schedule"] not in BETA_SCHEDULES:
        raise PretrainedError(f"{where}: beta_schedule {cfg['beta_schedule']!r}; supported: "
                              f"{', '.join(BETA_SCHEDULES)}")
    if cfg["variance_type"] not in FIXED_VARIANCES:
        raise PretrainedError(f"{where}: variance_type {cfg['variance_type']!r}; the ddpm sampler supports "
                              "fixed variances only (generate.ddpm_variance)")
    for key in ("rescale_betas_zero_snr", "thresholding"):
        if raw.get(key):
            raise PretrainedError(f"{where}: {key} is set; not supported by the ddpm sampler")
    if cfg["trained_betas"] is not None:
        cfg["trained_betas"] = [float(b) for b in cfg["trained_betas"]]
    return cfg


def folder_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` (hidden download metadata skipped), keyed by relative path."""
    files = sorted(f for f in folder.rglob("*") if f.is_file()
                   and not any(part.startswith(".") for part in f.relative_to(folder).parts))
    return {str(f.relative_to(folder)): file_sha256(f) for f in files}


def weights_sha256(unet_dir: Path) -> str:
    """The sha256 of the weights file from_pretrained loads (safetensors before .bin, as diffusers prefers),
    or for sharded weights that of the {file: sha256} list of the shards."""
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"):
        if (unet_dir / name).is_file():
            return file_sha256(unet_dir / name)
    shards = sorted(unet_dir.glob("*.safetensors")) or sorted(unet_dir.glob("*.bin"))
    listing = {f.name: file_sha256(f) for f in shards}
    return hashlib.sha256(json.dumps(listing, sort_keys=True).encode()).hexdigest()


def load_pretrained(source: str) -> dict[str, Any]:
    """The model.pt contents of a pretrained source: checked, in float32, with its provenance."""
    folder, revision = resolve(source)
    unet_dir, scheduler_file = find_parts(folder)
    check_unet_config(read_json(unet_dir / "config.json"), unet_dir / "config.json")
    raw = read_json(scheduler_file) if scheduler_file is not None else {}
    schedule = schedule_config(raw, str(scheduler_file or unet_dir))
    try:
        unet = UNet2DModel.from_pretrained(unet_dir, local_files_only=True, low_cpu_mem_usage=False)
    except (OSError, ValueError, RuntimeError) as error:
        raise PretrainedError(f"{unet_dir}: weights unreadable ({str(error).splitlines()[0]})") from None
    hashes, weights = folder_hashes(folder), weights_sha256(unet_dir)
    unet_config = {k: v for k, v in dict(unet.config).items() if k != "_name_or_path"}  # no local paths
    return {"kind": KIND, "unet_config": unet_config,
            "state_dict": {k: v.float() for k, v in unet.state_dict().items()},
            "num_train_timesteps": schedule["num_train_timesteps"], "beta_start": schedule["beta_start"],
            "beta_end": schedule["beta_end"], "scheduler_config": schedule,
            "pretrained": {"source": source, "revision": revision, "weights_sha256": weights,
                           "files": hashes, "scheduler_class": raw.get("_class_name"),
                           "scheduler_file_config": raw or None}}


def import_pretrained(source: str, out: Path) -> None:
    """Write the pretrained model as the ddpm generator's model.pt (atomically); no training."""
    if distributed.rank() != 0:  # under torchrun (ddpm trains data-parallel) one rank imports
        return
    model = load_pretrained(source)
    save_atomic(model, out)
    log.info("%s: imported (weights sha256 %s, %d train timesteps, %s betas)", source,
             model["pretrained"]["weights_sha256"][:12], model["num_train_timesteps"],
             model["scheduler_config"]["beta_schedule"])


def schedule_kwargs(model: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(beta arguments, clipping arguments) of the diffusers schedulers for a ddpm model.pt.

    Trained models: Ho et al.'s linear betas with clipping, the arguments the sampler always passed.
    Imported models: their recorded scheduler config's betas and clipping."""
    recorded = model.get("scheduler_config")
    if recorded is None:
        return (dict(num_train_timesteps=model["num_train_timesteps"], beta_schedule="linear",
                     beta_start=model["beta_start"], beta_end=model["beta_end"]), {"clip_sample": True})
    betas = {key: recorded[key] for key in ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end")}
    if recorded["trained_betas"] is not None:
        betas["trained_betas"] = recorded["trained_betas"]
    return betas, {"clip_sample": recorded["clip_sample"], "clip_sample_range": recorded["clip_sample_range"]}
