"""RobustBench in and out, against the real `robustbench` package (the test extra): our models and its
DMWideResNet / DMPreActResNet give the same logits on the same weights, both ways; a zoo file goes through
evaluate, the table and train_robust; export writes what RobustBench's class loads. Random weights in
temporary files, CPU, offline."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pipeline import evaluate as E
from pipeline import export, models
from pipeline import robustbench as rb
from pipeline import table as T
from pipeline.eval_chunks import SWEEP_NAME
from pipeline.inference import predict_labels, to_float
from pipeline.shards import file_sha256, read_imageset
from tests.helpers import robust_cfg

# small variants of the paper's WRN-28-10 and WRN-70-16 (same code path, depth 6n+4, any width), and
# DeepMind's PreActResNet-18 at its real size
SHAPES = [("DMWideResNet", 10, 2), ("DMWideResNet", 16, 1), ("DMPreActResNet", 18, 0)]


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights and batch-norm statistics (PyTorch's defaults make every BN an identity)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
            elif tensor.is_floating_point() and "normalize" not in name and name not in ("mean", "std"):
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * (0.5 if tensor.dim() == 1 else 0.1))
    return model.eval()


def arch_of(name: str, depth: int, width: int) -> rb.ZooArchitecture:
    return rb.ZooArchitecture(name, depth, width, 10, rb.CIFAR10_MEAN, rb.CIFAR10_STD)


def ours(name: str, depth: int, width: int) -> models.Classifier:
    return randomise(rb.build_model(arch_of(name, depth, width)))


def images(n: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """In float64, so that two implementations agree to 1e-9 unless they compute different functions
    (in float32 the random weights' large logits differ by rounding, ~1e-6 relative)."""
    with torch.no_grad():
        return copy.deepcopy(model).double().eval()(x.double())


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "-".join(map(str, s)))
def test_our_model_under_robustbench_class_gives_our_logits(shape):
    model = ours(*shape)
    state_dict, arch = rb.to_zoo(model)
    assert arch == arch_of(*shape)
    theirs = rb.robustbench_class(arch)
    theirs.load_state_dict(state_dict, strict=True)
    x = images()
    # Swish (x * sigmoid(x)) against nn.SiLU and avg_pool2d against the adaptive pool: rounding only
    assert_same(logits(theirs, x), logits(model, x))
    # and back: bit-identical to the model we started from
    back, _ = rb.from_zoo(state_dict, arch.name)
    with torch.no_grad():
        assert torch.equal(back.eval()(x), model.eval()(x))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "-".join(map(str, s)))
def test_released_robustbench_file_loads_into_our_model(shape, tmp_path):
    """A file as released: {"state_dict": ...} saved from nn.DataParallel ('module.' prefixes)."""
    theirs = randomise(rb.robustbench_class(arch_of(*shape)), seed=3)
    path = tmp_path / "zoo.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in theirs.state_dict().items()}}, path)
    model, arch, sha = rb.load_zoo_file(path, shape[0])
    assert arch == arch_of(*shape) and sha == file_sha256(path)
    x = images()
    assert_same(logits(model, x), logits(theirs, x))


def test_symmetric_padding_would_not_reproduce_robustbench():
    """The stride-2 `SAME` padding is what makes the logits agree (a 1-pixel shift of the sampling grid)."""
    model = ours("DMWideResNet", 10, 2)
    state_dict, arch = rb.to_zoo(model)
    for block in model.body:
        if isinstance(block, models._PreActBlock) and block.stride == 2:
            block.same, block.conv1.padding = False, (1, 1)
    theirs = rb.robustbench_class(arch)
    theirs.load_state_dict(state_dict)
    assert (logits(theirs, images()) - logits(model, images())).abs().max() > 1e-3


@pytest.mark.parametrize("name, depth, width", [("DMWideResNet", 28, 10), ("DMWideResNet", 70, 16),
                                                ("DMPreActResNet", 18, 0)])
def test_paper_sizes_map_key_for_key(name, depth, width):
    """WRN-28-10, WRN-70-16 and R18 at full size, built on the meta device (no memory): every one of our
    entries has RobustBench's key and shape, and nothing is left over."""
    arch = arch_of(name, depth, width)
    with torch.device("meta"):
        model, theirs = rb.build_model(arch), rb.robustbench_class(arch)
    assert arch.robustgen_model in models.MODELS
    mapping, ours_sd, expected = rb.key_map(model, arch), model.state_dict(), theirs.state_dict()
    assert list(mapping.values()) == list(expected)
    assert all(ours_sd[key].shape == expected[zoo].shape for key, zoo in mapping.items())


def test_clean_accuracy_equals_robustbench_clean_accuracy(cifar_sets):
    imgs, labels = read_imageset(cifar_sets["test"])
    x, y = to_float(imgs[:200]), torch.from_numpy(labels[:200].astype(np.int64))
    theirs = randomise(rb.robustbench_class(arch_of("DMWideResNet", 10, 2)), seed=5)
    model, _ = rb.from_zoo(theirs.state_dict(), "DMWideResNet")
    utils = rb.import_robustbench().utils
    ours_acc = float((predict_labels(model, x, 50, torch.device("cpu")) == labels[:200]).mean())
    assert ours_acc == utils.clean_accuracy(theirs, x, y, batch_size=50)


def test_zoo_files_that_do_not_fit_get_one_line(tmp_path):
    wrn = randomise(rb.robustbench_class(arch_of("DMWideResNet", 10, 1))).state_dict()
    preact = rb.robustbench_class(arch_of("DMPreActResNet", 18, 0)).state_dict()
    cases = {
        "unknown.pt": (wrn, "XCiT",
                       r"unknown RobustBench architecture 'XCiT'; supported: DMWideResNet, DMPreActResNet"),
        "foreign.pt": (preact, "DMWideResNet", r"not a DMWideResNet state dict"),
        "missing.pt": ({k: v for k, v in wrn.items() if "batchnorm_1" not in k}, "DMWideResNet",
                       r"not a DMWideResNet-10-1 state dict: missing layer\.0\.block\.0\.batchnorm_1\.weight"),
        "classes.pt": ({**wrn, "logits.weight": torch.zeros(7, 64)}, "DMWideResNet", "7 classes"),
    }
    for name, (state_dict, architecture, message) in cases.items():
        torch.save(state_dict, tmp_path / name)
        with pytest.raises(rb.ZooError, match=message) as error:
            rb.load_zoo_file(tmp_path / name, architecture)
        assert "\n" not in str(error.value) and name in str(error.value)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(rb.ZooError, match=r"junk\.pt: unreadable zoo checkpoint"):
        rb.load_zoo_file(tmp_path / "junk.pt", "DMWideResNet")
    with pytest.raises(rb.ZooError, match="dm_preact_resnet18 have a RobustBench counterpart"):
        rb.to_zoo(models.build("preact_resnet18"))


def test_robustbench_benchmark_does_not_run_on_pyautoattack():
    """What docs/robustbench.md says of RobustBench's own evaluation path: its `benchmark` calls
    AutoAttack(..., log_path=...) and run_standard_evaluation(..., bs=...) (robustbench/eval.py L101-L110),
    which pyautoattack 0.2.0 does not take; the alias that lets `import robustbench` work cannot fix that."""
    rb.import_robustbench()
    from autoattack import AutoAttack
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    with pytest.raises(TypeError, match="log_path"):
        AutoAttack(model, norm="Linf", eps=8 / 255, version="standard", device="cpu", log_path=None)
    adversary = AutoAttack(model, norm="Linf", eps=8 / 255, version="standard", device="cpu")
    with pytest.raises(TypeError, match="bs"):
        adversary.run_standard_evaluation(images(2), torch.tensor([0, 1]), bs=2, state_path=None)


# --- through the pipeline: evaluate -> table -> export, and train_robust's initialisation ---


@pytest.fixture
def zoo_file(tmp_path) -> Path:
    theirs = randomise(rb.robustbench_class(arch_of("DMWideResNet", 10, 1)), seed=7)
    path = tmp_path / "zoo" / "Someone2021Zoo_WRN-10-1.pt"
    path.parent.mkdir()
    torch.save({f"module.{k}": v for k, v in theirs.state_dict().items()}, path)
    return path


def test_zoo_file_through_evaluate_table_and_export(zoo_file, cifar_sets, tiny_params, write_params, tmp_path):
    tiny_params["evaluate"]["eps_255"]["linf"] = 32.0   # every point falls to APGD-CE: fast
    tiny_params["evaluate"].update(n_eval=8, chunk_size=8, batch_size=8, n_sweep=8)
    params = write_params(tiny_params)
    out = tmp_path / "results" / "evaluate" / zoo_file.stem
    E.main(["--params", str(params), "--run", zoo_file.stem, "--model", str(zoo_file), "--zoo-architecture",
            "DMWideResNet",
            "--test", str(cifar_sets["test"]), "--threat", "linf", "--workdir", str(tmp_path / "work"),
            "--out", str(out / "linf.json"), "--out-examples", str(out / "linf.h5")])
    report = json.loads((out / "linf.json").read_text())
    assert report["run"] == zoo_file.stem and report["source"] == "robustbench_zoo"
    assert report["zoo_architecture"] == "DMWideResNet-10-1" and report["model"] == "wrn-10-1"
    assert report["model_sha256"] == file_sha256(zoo_file) and report["checkpoint"] == "zoo"
    # the DAG's merge job names the zoo model the same way, from the same chunk files
    merged = tmp_path / "merged"
    E.main(["merge", "--params", str(params), "--run", zoo_file.stem, "--model", str(zoo_file), "--zoo-architecture",
            "DMWideResNet",
            "--test", str(cifar_sets["test"]), "--threat", "linf", "--chunk-dir", str(tmp_path / "work"),
            "--sweep", str(tmp_path / "work" / SWEEP_NAME), "--out", str(merged / "linf.json"),
            "--out-examples", str(merged / "linf.h5")])
    again = json.loads((merged / "linf.json").read_text())
    assert {k: v for k, v in again.items() if k != "examples_path"} == \
        {k: v for k, v in report.items() if k != "examples_path"}

    teacher = tmp_path / "teacher.json"
    teacher.write_text(json.dumps({"test_acc": 0.5}))
    rows = T.build_rows(tiny_params, [out / "linf.json"], [], teacher, [], {}, "abc")
    assert rows[0]["source"] == "robustbench_zoo:DMWideResNet-10-1" and rows[0]["generator"] == "zoo"
    assert rows[0]["model_sha256"] == file_sha256(zoo_file)
    table = tmp_path / "table.csv"
    T.write_csv(table, rows)
    T.markdown(rows, "cifar10")   # renders without a training run

    argv = ["--table", str(table), "--run", zoo_file.stem, "--threat", "linf", "--name", "Exported",
            "--out-dir", str(tmp_path / "export")]
    with pytest.raises(SystemExit, match="evaluated on 8 test images, not the leaderboard's 10000"):
        export.main(argv)
    export.main([*argv, "--allow-subset", "--paper-name", "A paper", "--authors", "A. Author"])
    info = json.loads((tmp_path / "export" / "Exported.json").read_text())
    fields = {"link", "name", "authors", "additional_data", "number_forward_passes", "dataset", "venue",
              "architecture", "eps", "clean_acc", "reported", "autoattack_acc", "footnote"}
    assert fields <= set(info) and set(info) - fields == {"provenance"}
    assert (info["architecture"], info["eps"], info["dataset"]) == ("WideResNet-10-1", "32/255", "cifar10")
    assert info["clean_acc"] == f"{100 * report['clean_acc']:.2f}"
    assert info["autoattack_acc"] == f"{100 * report['autoattack_acc']:.2f}"
    provenance = info["provenance"]
    assert provenance["model_sha256"] == file_sha256(zoo_file)
    assert provenance["checkpoint_sha256"] == file_sha256(tmp_path / "export" / "Exported.pt")
    # RobustBench's class, built as the JSON says, loads the file and gives the zoo model's logits
    constructor = {k: v for k, v in provenance["constructor"].items() if k != "activation_fn"}
    theirs = rb.robustbench_class(rb.ZooArchitecture(provenance["robustbench_class"], **{
        k: tuple(v) if isinstance(v, list) else v for k, v in constructor.items()}))
    theirs.load_state_dict(torch.load(tmp_path / "export" / "Exported.pt", weights_only=True), strict=True)
    original, _, _ = rb.load_zoo_file(zoo_file, "DMWideResNet")
    assert_same(logits(theirs, images()), logits(original, images()))


def test_export_of_a_trained_model_and_of_a_stale_file(tmp_path):
    model = randomise(models.build("wrn-16-4"), seed=11)
    path = tmp_path / "models" / "robust" / "ddpm" / "best.pt"
    models.save_checkpoint(path, model, "wrn-16-4", 10, {"checkpoint": "best", "epoch": 3})
    row = {**dict.fromkeys(T.COLUMNS, ""), "dataset": "cifar10", "run": "ddpm", "source": "robustgen",
           "generator": "ddpm", "n_generated": 1000, "model": "wrn-16-4", "threat": "linf", "eps": "8/255",
           "eps_255": "8", "clean_acc": 0.8874, "autoattack_acc": 0.6611, "pgd_acc": 0.67, "n_eval": 10000,
           "model_sha256": file_sha256(path), "model_path": str(path), "flags": "", "checkpoint": "best"}
    table = tmp_path / "table.csv"
    T.write_csv(table, [row])
    argv = ["--table", str(table), "--run", "ddpm", "--threat", "linf", "--name", "Ours", "--out-dir",
            str(tmp_path / "out")]
    export.main(argv)
    info = json.loads((tmp_path / "out" / "Ours.json").read_text())
    assert (info["clean_acc"], info["autoattack_acc"], info["architecture"]) == ("88.74", "66.11", "WideResNet-16-4")
    assert "1,000 synthetic images (ddpm)" in info["footnote"]
    theirs = rb.robustbench_class(rb.describe(model))
    theirs.load_state_dict(torch.load(tmp_path / "out" / "Ours.pt", weights_only=True), strict=True)
    assert_same(logits(theirs, images()), logits(model, images()))
    models.save_checkpoint(path, randomise(models.build("wrn-16-4"), seed=12), "wrn-16-4", 10)
    with pytest.raises(SystemExit, match=r"best\.pt: sha256 \w+ is not the evaluated model's"):
        export.main(argv)


def test_train_robust_starts_from_a_zoo_file(zoo_file, tiny_params, tmp_path):
    from pipeline import train_robust
    from pipeline.distributed import Dist

    theirs = randomise(rb.robustbench_class(arch_of("DMWideResNet", 16, 4)), seed=9)
    wrn_16_4 = tmp_path / "wrn-16-4.pt"
    torch.save(theirs.state_dict(), wrn_16_4)
    cfg = robust_cfg(tiny_params, model="wrn-16-4", init_checkpoint=str(wrn_16_4))
    state = train_robust.build_state(cfg, 0, 10, Dist(), torch.device("cpu"), torch.contiguous_format)
    zoo, _, _ = rb.load_zoo_file(wrn_16_4, "DMWideResNet")
    for model in (state.model, state.ema.model):
        assert list(model.state_dict()) == list(zoo.state_dict())
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), zoo.state_dict().values()))
    other = robust_cfg(tiny_params, model="wrn-16-4", init_checkpoint=str(zoo_file))
    mismatch = r"holds a DMWideResNet-10-1 \(wrn-10-1\), but train_robust.model is wrn-16-4"
    with pytest.raises(rb.ZooError, match=mismatch):
        train_robust.build_state(other, 0, 10, Dist(), torch.device("cpu"), torch.contiguous_format)
    small = robust_cfg(tiny_params, model="small_cnn", init_checkpoint=str(zoo_file))
    with pytest.raises(rb.ZooError, match="train_robust.model small_cnn has no RobustBench counterpart"):
        train_robust.build_state(small, 0, 10, Dist(), torch.device("cpu"), torch.contiguous_format)


def test_gpu_check_zoo_part_compares_with_the_published_numbers(zoo_file, cifar_sets, monkeypatch):
    """Part zoo of bench/gpu_check.py at CPU scale: a zoo file it has published numbers for is scored and
    judged (not ok here: a random model, and the shipped test subset is not the full 10,000 images)."""
    from tests.test_gpu_check import load

    gpu_check = load("gpu_check")
    with pytest.raises(SystemExit, match="no published numbers recorded for Someone2021Zoo_WRN-10-1"):
        gpu_check.zoo_part(zoo_file, cifar_sets["test"], 4, torch.device("cpu"))
    monkeypatch.setitem(gpu_check.ZOO_PUBLISHED, zoo_file.stem, ("DMWideResNet", 0.1, 0.0))
    record = gpu_check.zoo_part(zoo_file, cifar_sets["test"], 4, torch.device("cpu"))
    imgs, labels = read_imageset(cifar_sets["test"])
    model, _, _ = rb.load_zoo_file(zoo_file, "DMWideResNet")
    expected = float((predict_labels(model, to_float(imgs), 500, torch.device("cpu")) == labels).mean())
    assert record["clean_acc"] == expected and record["ok"] is False and 0 <= record["survived"] <= 1
