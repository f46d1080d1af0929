"""params.yaml validation: every bad value fails before any job starts, naming the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline import params as P

REPO = Path(__file__).resolve().parent.parent


def default() -> dict:
    return yaml.safe_load((REPO / "configs" / "default.yaml").read_text())


def test_shipped_params_equal_the_default_preset():
    assert (REPO / "params.yaml").read_text() == (REPO / "configs" / "default.yaml").read_text()
    P.load(REPO / "params.yaml")


@pytest.mark.parametrize("name", ["default", "paper", "study", "effect"])
def test_presets_are_valid(name):
    cfg = P.preset(name)
    assert cfg["base"]["dataset"] == "cifar10"


def test_effect_preset_plans_the_studys_thirty_runs():
    """Baseline, oracle and Gaussian at four amounts, EDM at all its images, each over seeds 0, 1, 2, with
    equal training budgets and the same 1,000 test images (docs/effect.md)."""
    cfg = P.preset("effect")
    table = P.run_table(cfg)
    assert len(table) == 30 and {run.seed for run in table} == {0, 1, 2}
    amounts = {g: sorted({run.amount or 0 for run in table if run.generator == g})
               for g in ("oracle", "gaussian", "edm")}
    assert amounts == {"oracle": [0, 1250, 2500, 5000], "gaussian": [0, 1250, 2500, 5000], "edm": [0]}
    assert cfg["data"]["n_labelled"] == 1000 and cfg["evaluate"]["n_eval"] == 1000
    assert cfg["evaluate"]["version"] == "apgd-ce" and cfg["generate"]["n_images"] == 10000
    from pipeline import dag

    stages = yaml.safe_load(dag.render(cfg))["stages"]   # DVC plans every run of the table too
    assert set(stages["train_robust"]["foreach"]) == {run.name for run in table}


def test_paper_preset_has_the_papers_settings():
    cfg = P.preset("paper")
    robust = cfg["train_robust"]
    assert robust["model"] == "wrn-28-10" and robust["loss"] == "trades" and robust["beta"] == 6.0
    assert robust["attack_steps"] == 10 and robust["eps_255"] == 8.0 and robust["batch_size"] == 1024
    assert robust["generated_fraction"] == 0.7 and robust["epochs"] == 400
    assert robust["epoch_size"] == 50000 and robust["lr"] == 0.4 and robust["warmup_epochs"] == 10
    assert robust["ema_decay"] == 0.995 and robust["label_smoothing"] == 0.1
    assert cfg["generate"]["n_images"] == 1_000_000


BAD = [
    (("train_robust", "beta"), -1.0, "train_robust.beta"),
    (("train_robust", "generated_fraction"), 1.5, "train_robust.generated_fraction"),
    (("generate", "n_images"), -5, "generate.n_images"),
    (("generate", "n_images"), "many", "generate.n_images"),
    (("generate", "generators"), ["gaussian", "gan"], "generate.generators.1"),
    (("teacher", "model"), "resnet1000", "teacher.model"),
    (("data", "md5"), "xyz", "data.md5"),
    (("evaluate", "threats"), ["linf", "l3"], "evaluate.threats.1"),
    (("base", "seed"), 1.5, "base.seed"),
]


@pytest.mark.parametrize("path,value,key", BAD)
def test_bad_values_name_the_key(path, value, key):
    cfg = default()
    cfg[path[0]][path[1]] = value
    with pytest.raises(P.ParamsError, match=key.replace(".", r"\.")):
        P.validate(cfg)


def test_unknown_and_missing_keys_are_named():
    cfg = default()
    cfg["train_robust"]["betta"] = 6.0
    with pytest.raises(P.ParamsError, match=r"train_robust\.betta: unknown key"):
        P.validate(cfg)
    cfg = default()
    del cfg["teacher"]["epochs"]
    with pytest.raises(P.ParamsError, match=r"teacher\.epochs"):
        P.validate(cfg)


def test_contradictory_values_are_rejected():
    cfg = default()
    cfg["train_robust"]["generated_fraction"] = 0.0
    with pytest.raises(P.ParamsError, match="generated_fraction"):
        P.validate(cfg)
    cfg = default()
    cfg["generate"]["generators"] = ["import"]
    with pytest.raises(P.ParamsError, match=r"train_generator\.import\.path"):
        P.validate(cfg)


def test_shards_cover_every_image_once():
    cfg = default()
    cfg["generate"].update(n_images=2500, shard_size=1000)
    assert P.shard_count(cfg) == 3
    ranges = [P.shard_range(cfg, i) for i in range(3)]
    assert ranges == [(0, 1000), (1000, 2000), (2000, 2500)]


def test_one_train_robust_setting_equals_the_runs_section():
    """train_robust_setting reads one key (the threat_model stage declares only the threat) and agrees
    with the whole section of every run, variants included; an unlisted variant is refused alike."""
    cfg = default()
    cfg["generate"]["generators"] = ["gaussian", "cvae"]
    cfg["variants"]["names"] = ["cutmix", "latent_at"]
    cfg = P.validate(cfg)
    for run in P.runs(cfg):
        section = P.train_robust_for(cfg, run)
        assert {key: P.train_robust_setting(cfg, run, key) for key in section} == section, run
    with pytest.raises(P.ParamsError, match="variants.names"):
        P.train_robust_setting(cfg, "gaussian-advprop", "threat")


def test_use_writes_a_valid_params_file(tmp_path):
    out = tmp_path / "params.yaml"
    subprocess.run([sys.executable, "-m", "pipeline.params", "use", "paper", "--out", str(out)],
                   check=True, cwd=REPO)
    assert P.load(out)["train_robust"]["model"] == "wrn-28-10"
    subprocess.run([sys.executable, "-m", "pipeline.params", "use", "default", "--out", str(out)],
                   check=True, cwd=REPO)
    assert out.read_text() == (REPO / "configs" / "default.yaml").read_text()


@pytest.mark.slow
def test_snakemake_dry_run_fails_on_bad_params_before_any_job(tmp_path):
    for name in ["Snakefile", "rules", "profiles", "pipeline"]:
        (tmp_path / name).symlink_to(REPO / name)
    cfg = default()
    cfg["train_robust"]["beta"] = -2.0
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(cfg))
    result = subprocess.run([Path(sys.executable).with_name("snakemake"), "-n"], cwd=tmp_path,
                            capture_output=True, text=True)
    assert result.returncode != 0
    assert "train_robust.beta" in result.stdout + result.stderr
    assert not (tmp_path / "data").exists()


# --- the run table: seeds and data amounts ---


def test_run_table_repeats_runs_over_amounts_and_seeds():
    """Every run once per training seed; each generator run again per data amount; names built from the
    fields (seed 0 and the whole selection add no suffix, so a one-seed table keeps its names)."""
    cfg = default()
    cfg["generate"]["generators"] = ["gaussian"]
    cfg["variants"].update(names=["cutmix"], amounts=[500], seeds=[0, 2])
    cfg = P.validate(cfg)
    assert P.runs(cfg) == ["baseline", "baseline-s2", "gaussian", "gaussian-s2", "gaussian-n500", "gaussian-n500-s2",
                           "baseline-cutmix", "baseline-cutmix-s2", "gaussian-cutmix", "gaussian-cutmix-s2",
                           "gaussian-cutmix-n500", "gaussian-cutmix-n500-s2"]
    assert P.get_run(cfg, "gaussian-cutmix-n500-s2") == P.Run("gaussian-cutmix-n500-s2", "gaussian", "cutmix", 500, 2)
    assert P.train_robust_for(cfg, "gaussian-cutmix-n500-s2") == P.train_robust_for(cfg, "gaussian-cutmix")
    with pytest.raises(P.ParamsError, match="'gaussian-n1000' is not defined by params"):
        P.get_run(cfg, "gaussian-n1000")


def test_amounts_for_sweeps_only_the_generators_it_names():
    cfg = default()
    cfg["generate"]["generators"] = ["oracle", "gaussian"]
    cfg["variants"].update(amounts=[500], amounts_for=["oracle"])
    assert P.runs(P.validate(cfg)) == ["baseline", "oracle", "oracle-n500", "gaussian"]
    cfg["variants"]["amounts_for"] = ["edm"]
    with pytest.raises(P.ParamsError, match=r"variants.amounts_for: \['edm'\] not in generate.generators"):
        P.validate(cfg)


def test_training_seeds_vary_training_alone():
    base = 7
    seeds = [P.training_seed(base, P.Run("r", None, None, None, index)) for index in range(4)]
    assert seeds[0] == base and len(set(seeds)) == 4


def test_a_variant_named_like_a_suffix_is_refused():
    cfg = default()
    cfg["variants"]["names"] = ["s1"]
    cfg["variants"]["settings"]["s1"] = {"beta": 3.0}
    cfg["variants"]["seeds"] = [0, 1]
    with pytest.raises(P.ParamsError, match=r"runs \['baseline-s1', 'gaussian-s1'\] would be defined twice"):
        P.validate(cfg)


@pytest.mark.parametrize("key, value", [("seeds", [0, 1]), ("amounts", [100]), ("names", ["cutmix"])])
def test_dvc_check_stops_a_stale_dvc_yaml(tmp_path, key, value):
    """dvc.yaml lists the runs of the params it was written for: after a change of the run table, DVC's
    first stage stops (naming the command that rewrites it) instead of running a stale plan."""
    from pipeline import dag

    cfg = default()
    path, dvc_yaml = tmp_path / "params.yaml", tmp_path / "dvc.yaml"
    path.write_text(yaml.safe_dump(cfg))
    dag.write(dvc_yaml, P.validate(cfg))
    P.main(["check", str(path), "--dvc-yaml", str(dvc_yaml)])
    cfg["variants"][key] = value
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit, match="plans other runs than these params .*`python -m pipeline.dag write"):
        P.main(["check", str(path), "--dvc-yaml", str(dvc_yaml), "--stamp", str(tmp_path / "ok")])
    assert not (tmp_path / "ok").exists()
    dag.main(["write", str(dvc_yaml), "--params", str(path)])
    P.main(["check", str(path), "--dvc-yaml", str(dvc_yaml)])
    planned = yaml.safe_load(dvc_yaml.read_text())["stages"]["train_robust"]["foreach"]
    assert list(planned) == P.runs(P.validate(cfg))


def test_use_rewrites_dvc_yaml_for_the_presets_runs(tmp_path):
    (tmp_path / "dvc.yaml").write_text("stale\n")
    P.main(["use", "study", "--out", str(tmp_path / "params.yaml")])
    P.main(["check", str(tmp_path / "params.yaml"), "--dvc-yaml", str(tmp_path / "dvc.yaml")])
