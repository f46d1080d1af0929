"""The workflow files stay lint-clean and formatted: `snakemake --lint` in a test-scale copy (less the
lints tools/lint_workflow.py accepts, each with its reason) and `snakefmt --check` on the Snakefile and
rules/ (settings: [tool.snakefmt] in pyproject.toml). `make lint` runs the same, plus ruff and mypy."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from tests.helpers import BIN, REPO, env, make_workdir

spec = importlib.util.spec_from_file_location("lint_workflow", REPO / "tools" / "lint_workflow.py")
lint_workflow = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lint_workflow)


@pytest.mark.slow
def test_snakemake_lint_finds_nothing_new(tmp_path):
    workdir = make_workdir(tmp_path)
    done = subprocess.run([sys.executable, str(REPO / "tools" / "lint_workflow.py"), str(workdir)], env=env(),
                          capture_output=True, text=True)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "0 lint(s)" in done.stdout


def test_snakefmt_would_change_nothing():
    done = subprocess.run([str(BIN / "snakefmt"), "--check", "Snakefile", "rules"], cwd=REPO, env=env(),
                          capture_output=True, text=True)
    if done.returncode != 0:
        diff = subprocess.run([str(BIN / "snakefmt"), "--compact-diff", "Snakefile", "rules"], cwd=REPO,
                              env=env(), capture_output=True, text=True)
        raise AssertionError(f"run `snakefmt Snakefile rules`:\n{(diff.stdout + diff.stderr)[-4000:]}")


def test_only_the_listed_lints_are_accepted(tmp_path):
    rules = tmp_path / "x.smk"
    rules.write_text('rule a:\n    shell:\n        THREADS + "python -m pipeline.data"\n'
                     'rule b:\n    input:\n        "data/" + name,\n')
    output = (f"Lints for snakefile {rules}:\n"
              "    * Path composition with '+' in line 3:\n      This becomes quickly unreadable.\n"
              "    * Path composition with '+' in line 6:\n      This becomes quickly unreadable.\n"
              f"Lints for rule data (line 1, {rules}):\n"
              "    * Param out_dir is a prefix of input or output file but hardcoded:\n      If this is...\n"
              f"Lints for rule teacher (line 1, {rules}):\n"
              "    * Param out_model is a prefix of input or output file but hardcoded:\n      If this is...\n")
    found = lint_workflow.lints(output)
    assert [(subject, title) for subject, title, _ in found] == [
        (str(rules), "Path composition with '+' in line 3"), (str(rules), "Path composition with '+' in line 6"),
        ("rule data", "Param out_dir is a prefix of input or output file but hardcoded"),
        ("rule teacher", "Param out_model is a prefix of input or output file but hardcoded")]
    assert [lint_workflow.accepted(subject, title) for subject, title, _ in found] == [True, False, True, False]
