"""Fuzz every key of params.yaml: wrong types, missing keys, unknown keys, out-of-range values.

Each mutation must be rejected by `pipeline.params.validate` with a message naming the key, i.e. before
any job starts (the Snakefile and DVC's first stage both call it).
"""

from __future__ import annotations

import copy

import pytest
import yaml

from pipeline import params as P
from tests.helpers import REPO

DEFAULT = yaml.safe_load((REPO / "configs" / "default.yaml").read_text())


def leaves(cfg: dict, prefix: tuple = ()) -> list[tuple[tuple, object]]:
    found = []
    for key, value in cfg.items():
        if isinstance(value, dict):
            found += leaves(value, prefix + (key,))
        else:
            found.append((prefix + (key,), value))
    return found


def mutated(path: tuple, value: object) -> dict:
    cfg = copy.deepcopy(DEFAULT)
    node = cfg
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return cfg


def wrong_type(value: object) -> object:
    """A value of another JSON type than `value`."""
    if isinstance(value, bool):
        return "yes"
    if isinstance(value, (int, float)):
        return "12"
    if isinstance(value, str):
        return 12
    if isinstance(value, list):
        return "not-a-list"
    raise TypeError(value)


LEAVES = leaves(DEFAULT)
IDS = [".".join(path) for path, _ in LEAVES]
# A variant's settings are overrides of train_robust: each key is optional there by design.
REQUIRED = [(path, value) for path, value in LEAVES if path[:2] != ("variants", "settings")]


@pytest.mark.parametrize("path,value", LEAVES, ids=IDS)
def test_wrong_type_is_named(path, value):
    with pytest.raises(P.ParamsError, match=r"\.".join(path)):
        P.validate(mutated(path, wrong_type(value)))


@pytest.mark.parametrize("path,value", REQUIRED, ids=[".".join(path) for path, _ in REQUIRED])
def test_missing_key_is_named(path, value):
    cfg = copy.deepcopy(DEFAULT)
    node = cfg
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]
    with pytest.raises(P.ParamsError, match=r"\.".join(path)):
        P.validate(cfg)


SECTIONS = [path for path, _ in leaves({k: {"x": 1} for k in DEFAULT})]


@pytest.mark.parametrize("section", sorted(DEFAULT))
def test_unknown_key_in_every_section_is_named(section):
    cfg = copy.deepcopy(DEFAULT)
    cfg[section]["not_a_key"] = 1
    with pytest.raises(P.ParamsError, match=rf"{section}\.not_a_key: unknown key"):
        P.validate(cfg)


NUMERIC = [(path, value) for path, value in LEAVES
           if isinstance(value, (int, float)) and not isinstance(value, bool)
           and path not in {("analysis", "n_samples")}]


@pytest.mark.parametrize("path,value", NUMERIC, ids=[".".join(p) for p, _ in NUMERIC])
def test_negative_numbers_are_rejected(path, value):
    with pytest.raises(P.ParamsError, match=r"\.".join(path)):
        P.validate(mutated(path, -1))


@pytest.mark.parametrize("path", [("train_robust", "generated_fraction"), ("train_robust", "ema_decay"),
                                  ("train_robust", "label_smoothing"), ("train_robust", "momentum"),
                                  ("train_generator", "ddpm", "ema_decay")])
def test_ratios_outside_unit_interval_are_rejected(path):
    with pytest.raises(P.ParamsError, match=r"\.".join(path)):
        P.validate(mutated(path, 1.5))


def test_unknown_section_is_named():
    cfg = copy.deepcopy(DEFAULT)
    cfg["trian_robust"] = {}
    with pytest.raises(P.ParamsError, match="trian_robust: unknown key"):
        P.validate(cfg)


def test_real_fraction_one_with_generated_data_is_contradictory():
    with pytest.raises(P.ParamsError, match="generated_fraction"):
        P.validate(mutated(("train_robust", "generated_fraction"), 0.0))
