"""Evaluation: real AutoAttack on small trained models (CPU, a few dozen images), resume, sanity checks."""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from pipeline import eval_chunks, models
from pipeline import evaluate as E
from pipeline import params as P
from pipeline.inference import to_float
from pipeline.shards import read_arrays, read_imageset, write_arrays
from tests.helpers import tiny_config

CPU = torch.device("cpu")


def train(model: nn.Module, images: np.ndarray, labels: np.ndarray, epochs: int, lr: float) -> nn.Module:
    """Plain (non-robust) SGD training: the model has real clean accuracy and no robustness."""
    torch.manual_seed(0)
    x, y = to_float(images), torch.from_numpy(labels)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(64):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def data(cifar_sets):
    return {"train": read_imageset(cifar_sets["train"]), "test": read_imageset(cifar_sets["test"])}


@pytest.fixture(scope="module")
def small_cnn(data):
    """The registry's small CNN after 1 epoch on the 1,900 shipped training images (~20% clean).

    Points that survive APGD-CE go through APGD-T, FAB-T and Square (minutes for a CNN on a shared
    CPU), so tests attacking it use a radius no non-robust model survives.
    """
    return train(models.build("small_cnn"), *data["train"], epochs=1, lr=0.05)


@pytest.fixture(scope="module")
def linear(data):
    """A trained linear classifier (~35% clean): cheap enough for the full standard AutoAttack
    (all four attacks) on the points that survive, so it carries the attack-quality tests."""
    model = nn.Sequential(models.Normalize(models.CIFAR10_MEAN, models.CIFAR10_STD), nn.Flatten(),
                          nn.Linear(3 * 32 * 32, 10))
    return train(model, *data["train"], epochs=5, lr=0.01)


class Quantised(nn.Module):
    """Gradient masking by construction: rounding the input to a few grey levels has zero gradient
    almost everywhere, so gradient attacks stall while the classifier's decisions stay breakable."""

    def __init__(self, inner: nn.Module, levels: int = 4) -> None:
        super().__init__()
        self.inner, self.levels = inner, levels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(torch.round(x * self.levels) / self.levels)


def config(tiny_params: dict, **overrides) -> E.EvaluateConfig:
    # these tests reason about the paper's radii; tests/params.yaml widens Linf for the workflow runs
    radii = {"eps_255": {"linf": 8.0, "l2": 128.0}}
    return P.section(E.EvaluateConfig, {**tiny_params["evaluate"], **radii, **overrides})


def test_autoattack_breaks_a_trained_model_below_clean_and_pgd(linear, data, tiny_params, tmp_path):
    cfg = config(tiny_params, n_eval=32, chunk_size=32, batch_size=32, n_sweep=32)
    result = E.evaluate(linear, *data["test"], "linf", cfg, 0, tmp_path, CPU, "m", "t")
    acc = result.accuracies()
    assert acc["clean_acc"] > 0.2  # a real classifier, well above chance
    assert acc["autoattack_acc"] < acc["clean_acc"]
    assert acc["autoattack_acc"] <= acc["pgd_acc"]
    assert not (result.aa_correct & ~result.clean_correct).any()  # AutoAttack never repairs a mistake
    assert result.max_perturbation <= 8 / 255 + 1e-6
    # a non-robust model: accuracy falls along the sweep; nothing looks like masking
    flags = E.sanity_flags(acc, result.sweep, cfg, 8 / 255, result.max_perturbation, result.autoattack_warnings)
    assert not E.MASKING_FLAGS & set(flags), flags


def test_l2_threat_uses_the_l2_ball(linear, data, tiny_params, tmp_path):
    cfg = config(tiny_params, n_eval=16, chunk_size=16, batch_size=16, n_sweep=16)
    result = E.evaluate(linear, *data["test"], "l2", cfg, 0, tmp_path, CPU, "m", "t")
    acc = result.accuracies()
    assert acc["autoattack_acc"] < acc["clean_acc"]
    assert 0 < result.max_perturbation <= 128 / 255 + 1e-5  # L2 radius 0.502, far below Linf's sqrt(d)*eps
    assert result.sweep["eps_255"] == [32.0, 64.0, 128.0, 256.0]


@pytest.mark.slow
def test_masking_checks_fire_on_an_input_quantising_model(linear, data, tiny_params, tmp_path):
    # points surviving the gradient attacks cost Square's 5,000 queries each: keep few images
    cfg = config(tiny_params, n_eval=12, chunk_size=12, batch_size=12, n_sweep=12, pgd_steps=10)
    result = E.evaluate(Quantised(linear), *data["test"], "linf", cfg, 0, tmp_path, CPU, "m", "t")
    acc = result.accuracies()
    flags = E.sanity_flags(acc, result.sweep, cfg, 8 / 255, result.max_perturbation, result.autoattack_warnings)
    assert "sweep_not_decreasing" in flags  # PGD cannot use a larger budget without gradients
    assert "autoattack_warning" in flags and "zero gradient" in flags["autoattack_warning"]
    assert acc["autoattack_acc"] < acc["pgd_acc"]  # the black-box Square attack finds what PGD cannot
    # the same classifier without the rounding raises none of them
    plain = E.evaluate(linear, *data["test"], "linf", cfg, 0, tmp_path / "plain", CPU, "m", "t")
    plain_flags = E.sanity_flags(plain.accuracies(), plain.sweep, cfg, 8 / 255, plain.max_perturbation,
                                 plain.autoattack_warnings)
    assert not E.MASKING_FLAGS & set(plain_flags), plain_flags


@pytest.mark.parametrize("acc, sweep, expected", [
    ({"clean_acc": 0.8, "pgd_acc": 0.5, "autoattack_acc": 0.48}, [0.7, 0.6, 0.48, 0.2], set()),
    ({"clean_acc": 0.8, "pgd_acc": 0.5, "autoattack_acc": 0.55}, [0.7, 0.6, 0.5, 0.2], {"autoattack_above_pgd"}),
    ({"clean_acc": 0.5, "pgd_acc": 0.6, "autoattack_acc": 0.5}, [0.7, 0.6, 0.6, 0.2], {"robust_above_clean"}),
    ({"clean_acc": 0.8, "pgd_acc": 0.6, "autoattack_acc": 0.3}, [0.7, 0.6, 0.6, 0.2], {"pgd_far_above_autoattack"}),
    ({"clean_acc": 0.8, "pgd_acc": 0.5, "autoattack_acc": 0.48}, [0.5, 0.4, 0.5, 0.1], {"sweep_not_decreasing"}),
    ({"clean_acc": 0.8, "pgd_acc": 0.5, "autoattack_acc": 0.48}, [0.5, 0.5, 0.5, 0.45], {"sweep_not_decreasing"}),
    ({"clean_acc": 0.1, "pgd_acc": 0.0, "autoattack_acc": 0.0}, [0.0, 0.0, 0.0, 0.0], set()),  # undefended
])
def test_sanity_flags_known_answers(tiny_params, acc, sweep, expected):
    cfg = config(tiny_params)
    flags = E.sanity_flags(acc, {"eps_255": [2, 4, 8, 16], "pgd_acc": sweep}, cfg, 8 / 255, 8 / 255, [])
    assert set(flags) == expected
    assert all(reason for reason in flags.values())


def test_perturbation_outside_the_ball_is_flagged(tiny_params):
    acc = {"clean_acc": 0.8, "pgd_acc": 0.5, "autoattack_acc": 0.48}
    flags = E.sanity_flags(acc, {}, config(tiny_params), 8 / 255, 9 / 255, [])
    assert set(flags) == {"perturbation_exceeds_eps"}


def cli_args(params, model, test, work, out):
    return ["--params", str(params), "--run", "baseline", "--model", str(model), "--test", str(test),
            "--threat", "linf", "--workdir", str(work), "--out", str(out / "linf.json"),
            "--out-examples", str(out / "linf.h5")]


@pytest.mark.slow
def test_cli_killed_evaluation_resumes_to_the_same_per_example_results(small_cnn, cifar_sets, tiny_params,
                                                                       write_params, tmp_path, monkeypatch):
    tiny_params["evaluate"]["eps_255"]["linf"] = 32.0  # every point falls to APGD-CE: fast (fixture doc)
    tiny_params["evaluate"].update(n_eval=24, chunk_size=12, batch_size=12, n_sweep=12)
    params = write_params(tiny_params)  # two chunks
    model = tmp_path / "models" / "robust" / "baseline" / "model.pt"
    models.save_checkpoint(model, small_cnn, "small_cnn", 10)
    test = cifar_sets["test"]

    E.main(cli_args(params, model, test, tmp_path / "work_a", tmp_path / "a"))
    report = json.loads((tmp_path / "a" / "linf.json").read_text())
    for key in ("run", "threat", "eps_255", "eps", "n_eval", "clean_acc", "autoattack_acc", "pgd_acc",
                "pgd_steps", "flags", "flag_reasons", "gradient_masking_suspected", "model_sha256", "seed",
                "attack", "sweep"):
        assert key in report, key
    assert report["run"] == "baseline" and report["n_eval"] == 24 and report["eps"] == pytest.approx(32 / 255)
    assert report["autoattack_acc"] < report["clean_acc"] and report["autoattack_acc"] <= report["pgd_acc"]
    assert report["attack"]["version"] == "standard" and isinstance(report["attack"]["seed"], int)
    uninterrupted = read_arrays(tmp_path / "a" / "linf.h5")
    assert report["autoattack_acc"] == pytest.approx(uninterrupted["aa_correct"].mean())

    real_chunk = E.autoattack_chunk
    calls = []

    def killed_on_second_chunk(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # what a SLURM time limit or Ctrl-C does mid-evaluation
        return real_chunk(*args, **kwargs)

    monkeypatch.setattr(E, "autoattack_chunk", killed_on_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        E.main(cli_args(params, model, test, tmp_path / "work_b", tmp_path / "b"))
    assert not (tmp_path / "b" / "linf.json").exists() and not (tmp_path / "b" / "linf.h5").exists()
    assert (tmp_path / "work_b" / "chunk-00000.h5").exists()

    calls.clear()
    monkeypatch.setattr(E, "autoattack_chunk", lambda *a, **k: (calls.append(1), real_chunk(*a, **k))[1])
    E.main(cli_args(params, model, test, tmp_path / "work_b", tmp_path / "b"))
    assert len(calls) == 1  # only the unfinished chunk is attacked again
    resumed = read_arrays(tmp_path / "b" / "linf.h5")
    assert set(resumed) == set(uninterrupted)
    for name in uninterrupted:
        np.testing.assert_array_equal(resumed[name], uninterrupted[name], err_msg=name)
    resumed_report = json.loads((tmp_path / "b" / "linf.json").read_text())
    for key in ("clean_acc", "pgd_acc", "autoattack_acc", "flags", "sweep"):
        assert resumed_report[key] == report[key], key


def test_chunk_from_other_settings_is_attacked_again(tmp_path, tiny_params):
    cfg = config(tiny_params)
    path = tmp_path / "chunk-00000.h5"
    stamp = E.fingerprint("model", "test", "linf", cfg, 0, 0, 20)
    write_arrays(path, {"index": np.arange(3)}, {"fingerprint": stamp})
    assert eval_chunks.reusable(path, stamp) is not None
    other = config(tiny_params, eps_255={"linf": 4.0, "l2": 128.0})
    assert eval_chunks.reusable(path, E.fingerprint("model", "test", "linf", other, 0, 0, 20)) is None
    assert eval_chunks.reusable(path, E.fingerprint("other-model", "test", "linf", cfg, 0, 0, 20)) is None
    path.write_bytes(b"truncated")
    assert eval_chunks.reusable(path, stamp) is None


@pytest.mark.slow
def test_cli_names_the_checkpoint_it_attacks_and_refuses_another(small_cnn, cifar_sets, tiny_params,
                                                                   write_params, tmp_path):
    """evaluate.checkpoint best (the default, as the references' eval-aa.py): the JSON names the
    checkpoint and its epoch; the last model given instead is refused before any attack."""
    assert tiny_params["evaluate"]["checkpoint"] == "best"
    tiny_params["evaluate"]["eps_255"]["linf"] = 32.0
    tiny_params["evaluate"].update(n_eval=8, chunk_size=8, batch_size=8, n_sweep=8)
    params = write_params(tiny_params)
    run_dir = tmp_path / "models" / "robust" / "baseline"
    models.save_checkpoint(run_dir / "best.pt", small_cnn, "small_cnn", 10, {"checkpoint": "best", "epoch": 3})
    models.save_checkpoint(run_dir / "last.pt", small_cnn, "small_cnn", 10, {"checkpoint": "last", "epoch": 4})
    with pytest.raises(SystemExit, match="last checkpoint of its run, but evaluate.checkpoint is best"):
        E.main(cli_args(params, run_dir / "last.pt", cifar_sets["test"], tmp_path / "work_last", tmp_path / "last"))
    E.main(cli_args(params, run_dir / "best.pt", cifar_sets["test"], tmp_path / "work", tmp_path / "out"))
    report = json.loads((tmp_path / "out" / "linf.json").read_text())
    assert (report["checkpoint"], report["checkpoint_epoch"]) == ("best", 3)


# --- the DAG's jobs: one per chunk, the sweep, and the merge ---


def job_args(command: str, params, model, test, *extra) -> list[str]:
    return [command, "--params", str(params), "--run", "baseline", "--model", str(model), "--test", str(test),
            "--threat", "linf",
            *map(str, extra)]


@pytest.fixture(scope="module")
def chunked(small_cnn, cifar_sets, tmp_path_factory) -> dict:
    """One evaluation twice, to the same output paths: in one process, then as the DAG's jobs (chunks 0
    and 2 on one node, chunk 1 on another, the sweep, the merge). n_eval 20 in chunks of 8: three
    chunks, the last reaching past n_eval."""
    root = tmp_path_factory.mktemp("chunked")
    cfg = tiny_config()
    cfg["evaluate"]["eps_255"]["linf"] = 32.0   # every point falls to APGD-CE: fast (small_cnn's doc)
    cfg["evaluate"].update(n_eval=20, chunk_size=8, batch_size=8, n_sweep=12)
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump(cfg))
    model = root / "models" / "robust" / "baseline" / "best.pt"
    models.save_checkpoint(model, small_cnn, "small_cnn", 10, {"checkpoint": "best", "epoch": 3})
    test, out = cifar_sets["test"], root / "results" / "evaluate" / "baseline"
    outputs = ["--out", out / "linf.json", "--out-examples", out / "linf.h5"]
    E.main(job_args("", params, model, test, "--workdir", root / "work", *outputs)[1:])   # one process
    whole = {name: (out / name).read_bytes() for name in ("linf.json", "linf.h5")}
    for name in whole:
        (out / name).unlink()
    chunks, sweep = out / "linf" / "chunks", out / "linf" / "sweep.h5"
    for chunk, node in (("0", "node_a"), ("00002", "node_a"), ("1", "node_b")):
        E.main(job_args("chunk", params, model, test, "--chunk", chunk, "--workdir", root / node, "--out-dir", chunks))
    E.main(job_args("sweep", params, model, test, "--out", sweep))
    merge = job_args("merge", params, model, test, "--chunk-dir", chunks, "--sweep", sweep, *outputs)
    E.main(merge)
    return {"root": root, "params": params, "model": model, "test": test, "cfg": cfg, "whole": whole,
            "merged": {name: (out / name).read_bytes() for name in whole}, "chunks": chunks, "merge": merge}


@pytest.mark.slow
def test_chunk_jobs_then_merge_write_the_one_process_files_byte_for_byte(chunked):
    assert chunked["merged"] == chunked["whole"]
    report = json.loads(chunked["whole"]["linf.json"])
    assert report["n_eval"] == 20 and len(report["sweep"]["pgd_acc"]) == 4 and report["sweep"]["n"] == 12
    assert (report["checkpoint"], report["checkpoint_epoch"]) == ("best", 3)
    examples = read_arrays(chunked["root"] / "results" / "evaluate" / "baseline" / "linf.h5")
    np.testing.assert_array_equal(examples["index"], np.arange(20))   # the last chunk's 4 extra images cut
    assert report["autoattack_acc"] == pytest.approx(examples["aa_correct"].mean())
    for name in ("chunk-00000.h5", "chunk-00001.h5", "chunk-00002.h5"):   # the same chunk files, too
        assert (chunked["chunks"] / name).read_bytes() == (chunked["root"] / "work" / name).read_bytes(), name


@pytest.mark.slow
def test_raising_n_eval_attacks_only_the_new_chunks(chunked, tmp_path, monkeypatch):
    """`--chunk all` (DVC's one job per run and threat) keeps a node's finished chunks: n_eval 20 -> 32
    attacks chunks 1 (not on this node) and 3 (new) only, and chunk 2 is unchanged."""
    work = tmp_path / "node_a"
    shutil.copytree(chunked["root"] / "node_a", work)
    cfg = copy.deepcopy(chunked["cfg"])
    cfg["evaluate"]["n_eval"] = 32
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(cfg))
    attacked = []
    real = E.autoattack_chunk
    monkeypatch.setattr(E, "autoattack_chunk", lambda *a, **k: (attacked.append(len(a[1])), real(*a, **k))[1])
    E.main(job_args("chunk", params, chunked["model"], chunked["test"], "--chunk", "all", "--workdir", work,
                    "--out-dir", tmp_path / "chunks"))
    assert attacked == [8, 8]
    assert sorted(p.name for p in (tmp_path / "chunks").iterdir()) == [f"chunk-0000{k}.h5" for k in range(4)]
    assert (tmp_path / "chunks" / "chunk-00002.h5").read_bytes() == (chunked["chunks"] / "chunk-00002.h5").read_bytes()


def merge_error(chunked, tmp_path, change) -> str:
    """The merge's one error line after `change(folder, params dict)` on a copy of the chunk jobs' files."""
    folder = tmp_path / "linf"
    shutil.copytree(chunked["chunks"].parent, folder)
    cfg = copy.deepcopy(chunked["cfg"])
    change(folder, cfg)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(cfg))
    args = job_args("merge", params, chunked["model"], chunked["test"], "--chunk-dir", folder / "chunks",
                    "--sweep", folder / "sweep.h5", "--out", tmp_path / "linf.json", "--out-examples",
                    tmp_path / "linf.h5")
    with pytest.raises(SystemExit) as error:
        E.main(args)
    assert not (tmp_path / "linf.json").exists() and not (tmp_path / "linf.h5").exists()
    return str(error.value)


@pytest.mark.slow
def test_merge_names_a_missing_corrupt_or_stale_chunk(chunked, tmp_path):
    missing = merge_error(chunked, tmp_path / "a", lambda folder, cfg: (folder / "chunks" / "chunk-00001.h5").unlink())
    assert "chunk-00001.h5: missing (chunk 1 of 3, test images 8..15)" in missing
    corrupt = merge_error(chunked, tmp_path / "b", lambda folder, cfg: (folder / "chunks" / "chunk-00002.h5")
                          .write_bytes((folder / "chunks" / "chunk-00002.h5").read_bytes()[:-100]))
    assert "chunk-00002.h5: corrupt" in corrupt
    stale = merge_error(chunked, tmp_path / "c", lambda folder, cfg: cfg["evaluate"]["eps_255"].update(linf=16.0))
    assert "chunk-00000.h5: chunk 0 of 3" in stale and "eps_255 32.0 (expected 16.0)" in stale
    resized = merge_error(chunked, tmp_path / "d", lambda folder, cfg: cfg["evaluate"].update(chunk_size=10))
    assert "chunk-00000.h5" in resized and "stop 8 (expected 10)" in resized
    sweep = merge_error(chunked, tmp_path / "e", lambda folder, cfg: cfg["evaluate"].update(n_sweep=10))
    assert "sweep.h5: eps sweep was made" in sweep and "n 12 (expected 10)" in sweep


@pytest.mark.slow
def test_merge_refuses_chunks_of_another_model(chunked, tmp_path):
    model = tmp_path / "baseline" / "best.pt"
    models.save_checkpoint(model, models.build("small_cnn"), "small_cnn", 10, {"checkpoint": "best", "epoch": 4})
    args = [model if arg == str(chunked["model"]) else arg for arg in chunked["merge"]]
    args[args.index("--out") + 1], args[args.index("--out-examples") + 1] = tmp_path / "x.json", tmp_path / "x.h5"
    with pytest.raises(SystemExit, match="chunk-00000.h5: chunk 0 of 3.*model_sha256"):
        E.main(list(map(str, args)))


def test_chunk_count_follows_n_eval_and_chunks_do_not_depend_on_it():
    assert [P.eval_chunk_count({"n_eval": n, "chunk_size": 8}) for n in (1, 8, 9, 20, 24)] == [1, 1, 2, 3, 3]
    # chunk 2 of 8 images is 16..23 whatever n_eval is; only the test set's end cuts it
    assert eval_chunks.chunk_range(2, 8, 10_000) == (16, 24)
    assert eval_chunks.chunk_range(2, 8, 20) == (16, 20)
    assert eval_chunks.chunk_range(3, 8, 20) == (20, 20)   # past the test set: empty


def test_bad_chunk_argument_is_one_error(tmp_path):
    with pytest.raises(SystemExit):
        E.main(job_args("chunk", tmp_path / "p.yaml", tmp_path / "m.pt", tmp_path / "t.h5", "--chunk", "-1",
                        "--workdir", tmp_path, "--out-dir", tmp_path))


@pytest.mark.slow
def test_apgd_ce_alone_is_an_upper_bound_of_standard_autoattack_per_example(linear, data, tiny_params, tmp_path):
    """The `apgd-ce` version is AutoAttack's first attack with the standard version's settings and seed, so an
    image standard AutoAttack fails to break survives APGD-CE alone too; neither repairs a clean mistake."""
    images, labels = data["test"]
    x, y, eps_255 = to_float(images[:48]), torch.from_numpy(labels[:48]), 1.0   # a radius some images survive
    clean = linear(x).argmax(1) == y
    correct = {}
    for version in ("standard", "apgd-ce"):
        cfg = E.subset(E.ChunkConfig, config(tiny_params, version=version, batch_size=48, chunk_size=48))
        x_adv, _ = E.autoattack_chunk(linear, x, y, "linf", eps_255 / 255, cfg, 0, tmp_path / f"{version}.json", CPU)
        assert (x_adv - x).abs().max() <= eps_255 / 255 + 1e-6
        with torch.no_grad():
            correct[version] = linear(x_adv).argmax(1) == y
    assert not (correct["standard"] & ~correct["apgd-ce"]).any()
    assert not (correct["apgd-ce"] & ~clean).any() and correct["apgd-ce"].sum() < clean.sum()
    assert 0 < correct["apgd-ce"].sum()   # some survive, so the comparison says something


def test_summary_names_the_attacks_that_produced_the_robust_accuracy(tiny_params):
    result = E.Evaluation(index=np.arange(2), label=np.zeros(2, np.int64), clean_pred=np.zeros(2, np.int64),
                          pgd_correct=np.ones(2, bool), aa_pred=np.zeros(2, np.int64), aa_correct=np.ones(2, bool),
                          max_perturbation=0.0)
    for version, attacks in (("standard", ["apgd-ce", "apgd-t", "fab-t", "square"]), ("apgd-ce", ["apgd-ce"])):
        report = E.summary(result, config(tiny_params, version=version), "linf", "baseline", 0, "m.pt", "x",
                           "small_cnn", "t.h5", "y", None)
        assert report["attack"]["version"] == version and report["attack"]["attacks"] == attacks
