"""Pretrained diffusers DDPM import: a small UNet saved with save_pretrained is imported through the CLI,
its provenance recorded, sampled with its own scheduler's betas into shards that are deterministic per
index; bad folders, models and uncached hub ids fail with one line naming them. Nothing is downloaded."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel

from pipeline import generate, shards, train_generator
from pipeline.generators import SampleSettings, ddpm, ddpm_pretrained
from pipeline.generators.ddpm_pretrained import PretrainedError
from tests.helpers import sample_settings, save_pipeline, small_unet

# not Ho et al.'s schedule, and no clipping: sampling must follow it
COSINE = dict(num_train_timesteps=500, beta_schedule="squaredcos_cap_v2", clip_sample=False,
              variance_type="fixed_large")


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory):
    return save_pipeline(tmp_path_factory.mktemp("pretrained") / "ddpm-small", small_unet(), DDPMScheduler(**COSINE))


def settings(sampler: str = "ddpm", steps: int = 3, batch: int = 4) -> SampleSettings:
    return sample_settings(batch_size=batch, sampler=sampler, sampling_steps=steps)


def test_cli_import_records_provenance_and_shards_are_deterministic(pipeline_folder, tiny_params, write_params,
                                                                    tmp_path):
    tiny_params["train_generator"]["ddpm"]["pretrained"] = str(pipeline_folder)
    tiny_params["generate"].update(generators=["ddpm"], n_images=12, shard_size=6, batch_size=4,
                                   sampler="ddpm", sampling_steps=3)
    params = str(write_params(tiny_params))
    model_pt = tmp_path / "model.pt"
    # --train is required by the CLI; an import never reads it
    train_generator.main(["--params", params, "--generator", "ddpm", "--train", str(tmp_path / "unread.h5"),
                          "--workdir", str(tmp_path / "work"), "--out", str(model_pt)])
    model = torch.load(model_pt, map_location="cpu", weights_only=False)
    weights = pipeline_folder / "unet" / "diffusion_pytorch_model.safetensors"
    assert model["kind"] == "ddpm" and model["pretrained"]["source"] == str(pipeline_folder)
    assert model["pretrained"]["weights_sha256"] == shards.file_sha256(weights)
    assert model["pretrained"]["files"]["unet/diffusion_pytorch_model.safetensors"] == shards.file_sha256(weights)
    assert model["scheduler_config"]["beta_schedule"] == "squaredcos_cap_v2"
    assert model["scheduler_config"]["num_train_timesteps"] == 500
    assert model["scheduler_config"]["clip_sample"] is False
    assert "_name_or_path" not in model["unet_config"]  # model.pt does not depend on where the folder lies
    reference = UNet2DModel.from_pretrained(pipeline_folder / "unet").state_dict()
    assert all(torch.equal(model["state_dict"][k], reference[k]) for k in reference)

    generate.main(["--params", params, "--generator", "ddpm", "--model", str(model_pt), "--shard", "all",
                   "--out-dir", str(tmp_path / "all")])
    for i in (1, 0):  # one shard per call, in another order
        generate.main(["--params", params, "--generator", "ddpm", "--model", str(model_pt), "--shard", str(i),
                       "--out", str(tmp_path / "one" / f"shard-{i:05d}.h5")])
    for i in (0, 1):
        name = f"shard-{i:05d}.h5"
        assert (tmp_path / "all" / name).read_bytes() == (tmp_path / "one" / name).read_bytes()
    images, labels = shards.read_imageset(tmp_path / "all" / "shard-00001.h5")
    assert images.shape == (6, 32, 32, 3) and (labels == -1).all()
    assert len(np.unique(images.reshape(6, -1), axis=0)) == 6
    assert shards.read_attrs(tmp_path / "all" / "shard-00001.h5")["checkpoint_sha256"] == shards.file_sha256(model_pt)


def test_sampling_uses_the_recorded_schedule(pipeline_folder):
    model = ddpm_pretrained.load_pretrained(str(pipeline_folder))
    own = DDPMScheduler.from_pretrained(pipeline_folder / "scheduler")
    for sampler in ("ddpm", "ddim", "dpmsolver"):
        scheduler = ddpm.make_scheduler(sampler, model)
        assert torch.equal(scheduler.betas, own.betas), sampler
        assert scheduler.config.num_train_timesteps == 500
    assert ddpm.make_scheduler("ddpm", model).config.clip_sample is False
    # The same weights under Ho et al.'s linear schedule (what a trained model.pt implies) sample other images.
    as_trained = {k: v for k, v in model.items() if k not in ("scheduler_config", "pretrained")}
    as_trained.update(num_train_timesteps=1000, beta_start=ddpm.BETA_START, beta_end=ddpm.BETA_END)
    cosine = ddpm.DDPMSampler(model, settings(), torch.device("cpu")).sample(0, 4)[0]
    linear = ddpm.DDPMSampler(as_trained, settings(), torch.device("cpu")).sample(0, 4)[0]
    assert not np.array_equal(cosine, linear)


def test_bare_unet_folder_gets_ho_schedule_and_samples_like_a_trained_model(tmp_path):
    """Without a scheduler config the defaults are Ho et al.'s: the same bytes as a trained model.pt of the
    same weights (whose scheduler arguments are unchanged by the import feature)."""
    small_unet().save_pretrained(tmp_path / "bare")
    model = ddpm_pretrained.load_pretrained(str(tmp_path / "bare"))
    assert model["scheduler_config"] == {**model["scheduler_config"], "num_train_timesteps": 1000,
                                         "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02,
                                         "clip_sample": True, "prediction_type": "epsilon"}
    assert model["pretrained"]["scheduler_class"] is None
    trained = {"kind": "ddpm", "unet_config": model["unet_config"], "state_dict": model["state_dict"],
               "num_train_timesteps": 1000, "beta_start": ddpm.BETA_START, "beta_end": ddpm.BETA_END}
    for sampler in ("ddpm", "ddim"):
        a = ddpm.DDPMSampler(model, settings(sampler), torch.device("cpu")).sample(2, 6)
        b = ddpm.DDPMSampler(trained, settings(sampler), torch.device("cpu")).sample(2, 6)
        assert np.array_equal(a[0], b[0]), sampler


def test_first_diffusers_scheduler_configs_are_read(tmp_path):
    """google/ddpm-cifar10-32 keeps its first-release files at the top (a scheduler config naming the
    number of steps `timesteps`) beside unet/ and scheduler/: the subfolders win; alone, the old names count."""
    legacy = {"_class_name": "GaussianDDPMScheduler", "beta_end": 0.02, "beta_schedule": "linear",
              "beta_start": 0.0001, "timesteps": 700, "variance_type": "fixed_large"}
    folder = save_pipeline(tmp_path / "both", small_unet(), DDPMScheduler(**COSINE))
    (folder / "scheduler_config.json").write_text(json.dumps(legacy))
    assert ddpm_pretrained.load_pretrained(str(folder))["scheduler_config"]["num_train_timesteps"] == 500
    small_unet().save_pretrained(tmp_path / "old")
    (tmp_path / "old" / "scheduler_config.json").write_text(json.dumps(legacy))
    model = ddpm_pretrained.load_pretrained(str(tmp_path / "old"))
    assert model["scheduler_config"]["num_train_timesteps"] == 700
    assert model["pretrained"]["scheduler_class"] == "GaussianDDPMScheduler"


def test_hub_id_resolves_from_the_local_cache_only(tmp_path, monkeypatch):
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    with pytest.raises(PretrainedError) as info:
        ddpm_pretrained.load_pretrained("google/ddpm-cifar10-32")
    message = str(info.value)
    assert "google/ddpm-cifar10-32" in message and "hf download google/ddpm-cifar10-32 --local-dir" in message
    assert "\n" not in message
    # The cache layout `hf download` leaves: refs/main names the snapshot folder of that commit.
    commit = "a" * 40
    repo = cache / "models--someone--tiny-ddpm"
    save_pipeline(repo / "snapshots" / commit, small_unet(), DDPMScheduler())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    model = ddpm_pretrained.load_pretrained("someone/tiny-ddpm")
    assert model["pretrained"]["revision"] == commit and model["pretrained"]["source"] == "someone/tiny-ddpm"


@pytest.mark.parametrize("case, match", [
    ("empty", "no UNet"),
    ("missing", "no such folder"),
    ("size", r"\(64, 64\) pixels"),
    ("learned_variance", "3 -> 6 channels"),
    ("conditional", "class-conditional"),
    ("v_prediction", "prediction_type 'v_prediction'"),
])
def test_bad_sources_fail_in_one_line_naming_the_path(case, match, tmp_path, tiny_params, write_params):
    folder = tmp_path / f"source-{case}"
    if case == "empty":
        folder.mkdir()
    elif case == "size":
        small_unet(sample_size=64).save_pretrained(folder)
    elif case == "learned_variance":
        small_unet(out_channels=6).save_pretrained(folder)
    elif case == "conditional":
        small_unet(num_class_embeds=10).save_pretrained(folder)
    elif case == "v_prediction":
        save_pipeline(folder, small_unet(), DDPMScheduler(prediction_type="v_prediction"))
    tiny_params["train_generator"]["ddpm"]["pretrained"] = str(folder)
    params = str(write_params(tiny_params))
    with pytest.raises(SystemExit) as info:
        train_generator.main(["--params", params, "--generator", "ddpm", "--train", str(tmp_path / "unread.h5"),
                              "--workdir", str(tmp_path / "work"), "--out", str(tmp_path / "model.pt")])
    message = str(info.value)
    assert message.startswith("error: ") and "\n" not in message
    assert str(folder) in message
    assert re.search(match, message), message
    assert not (tmp_path / "model.pt").exists()
