"""generate: shard bytes depend only on (checkpoint, seed, index); atomic, verified shards; import
streaming; every ddpm sampler, and the ancestral sampler's fixedlarge/fixedsmall variance; the sample grid."""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import signal
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
import torch

from pipeline import generate, shards
from pipeline import params as params_mod
from pipeline.generators import ddpm, gaussian, imported
from tests.helpers import REPO, sample_settings


@pytest.fixture(scope="module")
def ddpm_model(tmp_path_factory, cifar_sets):
    """A 4-step tiny UNet: enough for sampling and determinism, not for pretty pictures."""
    out = tmp_path_factory.mktemp("ddpm") / "model.pt"
    cfg = ddpm.Config(block_out_channels=[16, 32], layers_per_block=1, attention=True, dropout=0.0,
                      num_train_timesteps=1000, lr=2e-4, warmup_steps=2, batch_size=8, train_steps=4,
                      ema_decay=0.999, checkpoint_every=4, pretrained="")
    ddpm.train(cfg, cifar_sets["train"], out.parent / "work", out, 0, torch.device("cpu"))
    return out


@pytest.fixture(scope="module")
def gaussian_model(tmp_path_factory, cifar_sets):
    """A two-class Gaussian (the sampler handles any class count; ten would only be slower)."""
    out = tmp_path_factory.mktemp("gaussian") / "model.pt"
    images, labels = shards.read_imageset(cifar_sets["train"])
    means, chols = gaussian.fit(images[:300], labels[:300] % 2, 1e-3, num_classes=2)
    rows, cols = torch.tril_indices(3072, 3072)
    torch.save({"kind": "gaussian", "image_shape": [32, 32, 3], "mean": means.float(),
                "chol_packed": chols[:, rows, cols].float()}, out)
    return out


def with_generate(cfg: dict, **values) -> dict:
    cfg = copy.deepcopy(cfg)
    cfg["generate"].update(values)
    return params_mod.validate(cfg)


def shard_bytes(paths) -> list[bytes]:
    return [p.read_bytes() for p in paths]


@pytest.mark.parametrize("name", ["gaussian", "ddpm"])
def test_shards_identical_in_any_order_and_either_cli_form(name, request, tiny_params, tmp_path):
    model = request.getfixturevalue(f"{name}_model")
    cfg = with_generate(tiny_params, n_images=30, shard_size=10, batch_size=4, sampling_steps=3)
    all_at_once = generate.run(cfg, name, model, "all", None, tmp_path / "all")
    singles = [generate.run(cfg, name, model, str(i), tmp_path / "one" / f"shard-{i:05d}.h5", None)[0]
               for i in (2, 0, 1)]  # reverse-ish order, one process-call per shard
    assert [p.name for p in all_at_once] == ["shard-00000.h5", "shard-00001.h5", "shard-00002.h5"]
    assert shard_bytes(all_at_once) == shard_bytes(sorted(singles))  # byte-identical files
    images, labels = shards.read_imageset(all_at_once[1])
    assert images.shape == (10, 32, 32, 3) and len(np.unique(images.reshape(10, -1), axis=0)) == 10
    attrs = shards.read_attrs(all_at_once[1])
    assert (attrs["index_start"], attrs["index_stop"], attrs["generator"]) == (10, 20, name)
    assert attrs["checkpoint_sha256"] == shards.file_sha256(model) and attrs["seed"] == 0
    if name == "gaussian":
        assert np.array_equal(labels, np.arange(10, 20) % 2)
    else:
        assert (labels == -1).all() and attrs["sampler"] == "ddim" and attrs["steps"] == 3


def test_gaussian_bytes_do_not_depend_on_batch_size(gaussian_model, tiny_params, tmp_path):
    files = []
    for batch_size in (1, 7, 64, 100):
        cfg = with_generate(tiny_params, n_images=100, shard_size=100, batch_size=batch_size)
        files += generate.run(cfg, "gaussian", gaussian_model, "0", tmp_path / f"b{batch_size}.h5", None)
    contents = [shards.read_imageset(f) for f in files]
    for images, labels in contents[1:]:
        assert np.array_equal(images, contents[0][0]) and np.array_equal(labels, contents[0][1])


def test_ddpm_batch_size_changes_only_float_rounding(ddpm_model, tiny_params):
    """ddpm tiles have batch_size images; other tile shapes round differently by at most a level or so."""
    results = []
    for batch_size in (5, 16):
        settings = sample_settings(batch_size=batch_size, sampler="ddim", sampling_steps=3)
        results.append(ddpm.load(ddpm_model, settings, torch.device("cpu")).sample(3, 19)[0].astype(int))
    diff = np.abs(results[0] - results[1])
    assert diff.max() <= 3 and (diff == 0).mean() > 0.99


@pytest.mark.parametrize("sampler", sorted(ddpm.SAMPLERS))
def test_every_ddpm_sampler_is_deterministic_and_seeded(sampler, ddpm_model):
    settings = sample_settings(batch_size=4, sampler=sampler, sampling_steps=4)
    model = ddpm.load(ddpm_model, settings, torch.device("cpu"))
    images, labels = model.sample(0, 6)
    assert images.dtype == np.uint8 and images.shape == (6, 32, 32, 3) and (labels == -1).all()
    assert images.std() > 5  # not a constant picture
    again, _ = ddpm.load(ddpm_model, settings, torch.device("cpu")).sample(2, 5)  # other range, same tile
    assert np.array_equal(again, images[2:5])
    other_seed = ddpm.load(ddpm_model, dataclasses.replace(settings, seed=1), torch.device("cpu")).sample(0, 6)[0]
    assert not np.array_equal(other_seed, images)


@pytest.mark.parametrize("variance", sorted(ddpm.VARIANCE_TYPES))
def test_ancestral_sampler_matches_diffusers_pipeline(variance, ddpm_model):
    """Our loop is DDPMPipeline's loop: same UNet, scheduler and noise give the same images."""
    from diffusers import DDPMPipeline

    settings = sample_settings(batch_size=1, sampler="ddpm", sampling_steps=5, ddpm_variance=variance)
    ours = ddpm.load(ddpm_model, settings, torch.device("cpu"))
    state = torch.load(ddpm_model, weights_only=False)
    pipe = DDPMPipeline(unet=ddpm.load_unet(state, torch.device("cpu")),
                        scheduler=ddpm.make_scheduler("ddpm", state, variance))
    pipe.set_progress_bar_config(disable=True)
    from pipeline import seeding
    theirs = pipe(batch_size=1, generator=seeding.torch_generator(0, "ddpm", 7), num_inference_steps=5,
                  output_type="np").images
    expected = np.round(theirs * 255).astype(np.uint8)
    got = ours.sample(7, 8)[0]
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1


def ancestral_variances(variance: str, timesteps: list[int], sampling_steps: int = 1000) -> list[float]:
    """sigma_t^2 the ancestral sampler draws with at each t, read off one scheduler step: with x_t = 0 and a
    zero noise prediction the posterior mean is exactly 0, so x_{t-1} = sigma_t * (the step's noise)."""
    model = {"num_train_timesteps": 1000, "beta_start": ddpm.BETA_START, "beta_end": ddpm.BETA_END}
    scheduler = ddpm.make_scheduler("ddpm", model, variance)
    scheduler.set_timesteps(sampling_steps)
    zeros = torch.zeros(1, 3, 32, 32)
    found = []
    for t in timesteps:
        x_prev = scheduler.step(zeros, t, zeros, generator=torch.Generator().manual_seed(t)).prev_sample
        noise = torch.randn(zeros.shape, generator=torch.Generator().manual_seed(t))
        found.append(float(((x_prev / noise) ** 2).median()) if t > 0 else float(x_prev.abs().max()))
    return found


def test_ancestral_variance_fixedlarge_is_ho_et_al_and_fixedsmall_the_posterior():
    """Known answer from the betas by hand. hojonathanho/diffusion (diffusion_tf/diffusion_utils_2.py):
    fixedlarge is beta_t for t >= 1 (line 142, np.append(posterior_variance[1], betas[1:]): the t = 1
    entry is beta_1, only the t = 0 entry is the posterior's), fixedsmall the posterior variance
    beta_t (1 - abar_{t-1}) / (1 - abar_t) (line 77); no noise at t = 0 (lines 194-196)."""
    def beta(t: int) -> float:  # linear schedule 1e-4..0.02 over 1000 timesteps
        return 1e-4 + (0.02 - 1e-4) * t / 999

    def abar(t: int) -> float:
        return math.prod(1 - beta(s) for s in range(t + 1))

    def posterior(t: int) -> float:
        return beta(t) * (1 - abar(t - 1)) / (1 - abar(t))

    assert beta(1) == pytest.approx(1.1992e-4, rel=1e-4)
    assert posterior(1) == pytest.approx(beta(1) * 1e-4 / (1e-4 + beta(1) - 1e-4 * beta(1)))  # ~ beta_1 / 2.2
    timesteps = [0, 1, 2, 3, 4, 10, 500, 999]
    # diffusers works in float32 (1 - abar_t / abar_{t-1}): within 5e-4 of the float64 value
    large, small = ancestral_variances("fixedlarge", timesteps), ancestral_variances("fixedsmall", timesteps)
    assert large[0] == small[0] == 0.0  # the last step adds no noise, whatever the table's t = 0 entry
    assert large[1:] == pytest.approx([beta(t) for t in timesteps[1:]], rel=1e-3)
    assert small[1:] == pytest.approx([posterior(t) for t in timesteps[1:]], rel=1e-3)
    assert large[1] > 2 * small[1]  # the two differ most at the start of the chain

    # 20 ancestral steps (timesteps 950, 900, ..., 0): beta of the respaced chain, 1 - abar_950 / abar_900
    (strided,) = ancestral_variances("fixedlarge", [950], sampling_steps=20)
    assert strided == pytest.approx(1 - abar(950) / abar(900), rel=1e-3)


def ddpm_shards(model, tiny_params, tmp_path, **generate_values):
    cfg = with_generate(tiny_params, n_images=12, shard_size=6, batch_size=4, sampling_steps=3, **generate_values)
    files = generate.run(cfg, "ddpm", model, "all", None, tmp_path)
    return [shards.read_imageset(f)[0] for f in files], [shards.read_attrs(f) for f in files]


def test_fixedsmall_reproduces_the_diffusers_default_sampler(ddpm_model, tiny_params, tmp_path):
    """fixedsmall is DDPMScheduler's default variance, i.e. the ancestral sampler before the variance
    was a setting: same bytes. fixedlarge samples differ, and a shard records which variance made it."""
    from diffusers import DDPMScheduler

    settings = sample_settings(batch_size=4, sampler="ddpm", sampling_steps=3, ddpm_variance="fixedsmall")
    ours = ddpm.load(ddpm_model, settings, torch.device("cpu"))
    before = ddpm.load(ddpm_model, settings, torch.device("cpu"))
    state = torch.load(ddpm_model, weights_only=False)
    before.scheduler = DDPMScheduler(num_train_timesteps=state["num_train_timesteps"], beta_schedule="linear",
                                     beta_start=state["beta_start"], beta_end=state["beta_end"], clip_sample=True)
    before.scheduler.set_timesteps(3)
    assert np.array_equal(ours.sample(0, 12)[0], before.sample(0, 12)[0])

    small, small_attrs = ddpm_shards(ddpm_model, tiny_params, tmp_path, sampler="ddpm", ddpm_variance="fixedsmall")
    assert np.array_equal(np.concatenate(small), before.sample(0, 12)[0])
    assert [a["variance"] for a in small_attrs] == ["fixedsmall", "fixedsmall"]
    large, large_attrs = ddpm_shards(ddpm_model, tiny_params, tmp_path, sampler="ddpm", ddpm_variance="fixedlarge")
    assert [a["variance"] for a in large_attrs] == ["fixedlarge", "fixedlarge"]  # --shard all resampled them
    assert not np.array_equal(np.concatenate(large), np.concatenate(small))


def test_deterministic_samplers_ignore_the_variance(ddpm_model, tiny_params, tmp_path):
    """ddim (eta 0) and dpmsolver draw no per-step noise: the variance setting changes nothing."""
    for sampler in ("ddim", "dpmsolver"):
        small, small_attrs = ddpm_shards(ddpm_model, tiny_params, tmp_path / sampler / "small", sampler=sampler,
                                         ddpm_variance="fixedsmall")
        large, large_attrs = ddpm_shards(ddpm_model, tiny_params, tmp_path / sampler / "large", sampler=sampler,
                                         ddpm_variance="fixedlarge")
        assert all(np.array_equal(a, b) for a, b in zip(small, large))
        assert small_attrs == [{**a, "versions": s["versions"]} for a, s in zip(large_attrs, small_attrs)]
        assert "variance" not in small_attrs[0]  # so changing it keeps these shards (--shard all)


def make_source(tmp_path, kind: str, n: int = 50):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, n).astype(np.int32)
    if kind == "npy":
        path = tmp_path / "set.npy"
        np.save(path, images)
        np.save(tmp_path / "set_label.npy", labels)
    else:
        path = tmp_path / f"set-{kind}.npz"
        (np.savez_compressed if kind == "npz-compressed" else np.savez)(path, image=images, label=labels)
    return path, images, labels


@pytest.mark.parametrize("kind", ["npy", "npz", "npz-compressed"])
def test_import_streams_rows_exactly(kind, tmp_path, tiny_params):
    path, images, labels = make_source(tmp_path, kind)
    model = tmp_path / "model.pt"
    imported.train(imported.Config(str(path)), None, tmp_path / "work", model, 0, "cpu")
    sampler = imported.load(model, sample_settings(batch_size=8, sampler="ddim", sampling_steps=1), "cpu")
    for start, stop in [(0, 50), (17, 33), (40, 41), (3, 9), (0, 0)]:  # backwards seeks too
        got_images, got_labels = sampler.sample(start, stop)
        assert np.array_equal(got_images, images[start:stop]) and np.array_equal(got_labels, labels[start:stop])
        assert got_labels.dtype == np.int64
    cfg = with_generate(tiny_params, n_images=50, shard_size=20, batch_size=8)
    files = generate.run(cfg, "import", model, "all", None, tmp_path / "shards")
    read = [shards.read_imageset(f) for f in files]
    assert np.array_equal(np.concatenate([r[0] for r in read]), images)
    assert np.array_equal(np.concatenate([r[1] for r in read]), labels)
    with pytest.raises(imported.SourceError, match="has 50 images"):
        sampler.sample(45, 55)
    with pytest.raises(params_mod.ParamsError, match="n_images: 60 asked.*only 50"):
        generate.run(with_generate(tiny_params, n_images=60, shard_size=20), "import", model, "0",
                     tmp_path / "x.h5", None)


def test_uncompressed_npz_member_is_memory_mapped_not_streamed(tmp_path):
    path, images, _ = make_source(tmp_path, "npz")
    with zipfile.ZipFile(path) as archive:
        assert archive.getinfo("image.npy").compress_type == zipfile.ZIP_STORED
    reader = imported.ArrayReader(path, "image.npy")
    assert not reader.compressed
    assert np.array_equal(reader.read(10, 12), images[10:12])


def test_changed_import_source_is_refused(tmp_path):
    path, images, labels = make_source(tmp_path, "npz")
    model = tmp_path / "model.pt"
    imported.train(imported.Config(str(path)), None, tmp_path / "work", model, 0, "cpu")
    np.savez(path, image=images[:40], label=labels[:40])
    with pytest.raises(imported.SourceError, match="set-npz.npz.*changed"):
        imported.load(model, sample_settings(batch_size=8, sampler="ddim", sampling_steps=1), "cpu")


def test_failed_sampling_leaves_no_shard(gaussian_model, tiny_params, tmp_path, monkeypatch):
    cfg = with_generate(tiny_params, n_images=100, shard_size=100, batch_size=10)
    calls = []
    real = gaussian.GaussianSampler.sample

    def fail_on_third(self, start, stop):
        calls.append(start)
        if len(calls) == 3:
            raise RuntimeError("node lost")
        return real(self, start, stop)

    monkeypatch.setattr(gaussian.GaussianSampler, "sample", fail_on_third)
    out = tmp_path / "gen" / "shard-00000.h5"
    with pytest.raises(RuntimeError, match="node lost"):
        generate.run(cfg, "gaussian", gaussian_model, "0", out, None)
    assert not out.exists() and not out.parent.exists()  # sampling comes before any file is opened


@pytest.mark.slow
def test_killed_cli_leaves_no_final_file(ddpm_model, tiny_params, write_params, tmp_path):
    cfg = with_generate(tiny_params, n_images=400, shard_size=400, batch_size=4, sampling_steps=20)
    out = tmp_path / "gen" / "shard-00000.h5"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.generate", "--params", str(write_params(cfg)),
                             "--generator", "ddpm", "--model", str(ddpm_model), "--shard", "0",
                             "--out", str(out)], cwd=REPO, env=env, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    seen = b""
    while b"img" not in seen and time.time() < deadline:  # the progress bar is up: sampling started
        seen += proc.stderr.read1(4096)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and b"img" in seen
    assert not out.exists()
    assert not out.parent.exists() or shards.expand([out.parent]) == []


def test_corrupt_or_truncated_shards_are_named_and_regenerated(gaussian_model, tiny_params, tmp_path):
    cfg = with_generate(tiny_params, n_images=40, shard_size=20, batch_size=20)
    first, second = generate.run(cfg, "gaussian", gaussian_model, "all", None, tmp_path)
    good = [first.read_bytes(), second.read_bytes()]
    with __import__("h5py").File(first, "r+") as h5:
        h5["images"][3, 4, 5, 1] ^= 0x01  # one bit
    with pytest.raises(shards.ShardError, match="shard-00000.h5.*checksum"):
        shards.read_imageset(first)
    second.write_bytes(good[1][: len(good[1]) - 5000])
    with pytest.raises(shards.ShardError, match="shard-00001.h5"):
        shards.read_imageset(second)
    generate.run(cfg, "gaussian", gaussian_model, "all", None, tmp_path)  # --shard all repairs both
    assert [first.read_bytes(), second.read_bytes()] == good


def test_shard_all_removes_shards_of_a_larger_set(gaussian_model, tiny_params, tmp_path):
    generate.run(with_generate(tiny_params, n_images=40, shard_size=20), "gaussian", gaussian_model, "all",
                 None, tmp_path)
    kept = generate.run(with_generate(tiny_params, n_images=20, shard_size=20), "gaussian", gaussian_model,
                        "all", None, tmp_path)
    assert shards.expand([tmp_path]) == kept == [tmp_path / "shard-00000.h5"]


def test_up_to_date_shards_are_kept(gaussian_model, tiny_params, tmp_path):
    cfg = with_generate(tiny_params, n_images=20, shard_size=20, batch_size=20)
    (path,) = generate.run(cfg, "gaussian", gaussian_model, "all", None, tmp_path)
    before = path.stat().st_mtime_ns
    generate.run(cfg, "gaussian", gaussian_model, "all", None, tmp_path)
    assert path.stat().st_mtime_ns == before
    generate.run(params_mod.validate({**cfg, "base": {**cfg["base"], "seed": 1}}),
                 "gaussian", gaussian_model, "all", None, tmp_path)  # other seed: rewritten
    assert shards.read_attrs(path)["seed"] == 1


def test_shards_record_their_device_and_keep_a_verified_shard_made_on_another(gaussian_model, tiny_params,
                                                                              tmp_path):
    """The same seeds give other bytes on CUDA (and between GPU types): each shard names its device. That is
    provenance, not identity: `--shard all` keeps a shard that verifies though another device made it."""
    import h5py

    cfg = with_generate(tiny_params, n_images=20, shard_size=20, batch_size=20)
    (path,) = generate.run(cfg, "gaussian", gaussian_model, "all", None, tmp_path)
    assert shards.read_attrs(path)["device"] == "cpu"
    with h5py.File(path, "r+") as h5:
        h5.attrs["device"] = "cuda NVIDIA H200 (sm_90)"
    before = path.stat().st_mtime_ns
    generate.run(cfg, "gaussian", gaussian_model, "all", None, tmp_path)
    assert path.stat().st_mtime_ns == before and shards.read_attrs(path)["device"].startswith("cuda")


@pytest.mark.parametrize("name", ["gaussian", "ddpm"])
def test_sample_grid_png(name, request, tiny_params, tmp_path):
    model = request.getfixturevalue(f"{name}_model")
    cfg = with_generate(tiny_params, n_images=20, shard_size=20, batch_size=10, sampling_steps=2)
    (shard,) = generate.run(cfg, name, model, "all", None, tmp_path / "gen")
    out = tmp_path / "fig" / f"samples_{name}.png"
    generate.main(["grid", "--shard", str(shard), "--out", str(out), "--n", "16"])
    from PIL import Image
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size[0] > 100 and image.size[1] > 100


def test_cli_errors_are_one_line(tiny_params, write_params, tmp_path, ddpm_model):
    params = write_params(tiny_params)
    with pytest.raises(SystemExit, match="shard index 9 outside 0..1"):
        generate.main(["--params", str(params), "--generator", "ddpm", "--model", str(ddpm_model),
                       "--shard", "9", "--out", str(tmp_path / "x.h5")])
    with pytest.raises(SystemExit, match="--out-dir"):
        generate.main(["--params", str(params), "--generator", "ddpm", "--model", str(ddpm_model),
                       "--shard", "all"])
