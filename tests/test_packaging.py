"""Dependencies have one source: pyproject.toml. The conda environment installs the project from it."""

from __future__ import annotations

import tomllib

import yaml

from tests.helpers import REPO


def test_conda_environment_installs_the_project_and_restates_no_dependency():
    env = yaml.safe_load((REPO / "envs" / "pipeline.yaml").read_text())
    pip = [entry["pip"] for entry in env["dependencies"] if isinstance(entry, dict) and "pip" in entry]
    assert pip == [["-e ../"]]          # the repository root seen from envs/
    assert (REPO / "envs" / ".." / "pyproject.toml").resolve() == REPO / "pyproject.toml"
    python = [entry for entry in env["dependencies"] if isinstance(entry, str) and entry.startswith("python=")]
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    minimum = requires.removeprefix(">=")
    assert python and tuple(map(int, python[0].split("=")[1].split("."))) >= tuple(map(int, minimum.split(".")))
