"""Layering of pipeline/: a stage module (a `python -m pipeline.<stage>` CLI) imports library modules,
never another stage, so shared code has one home and a stage can change without breaking another."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pipeline
from pipeline import dag

PIPELINE = Path(__file__).resolve().parent.parent / "pipeline"
# A module with a CLI that is still a library: pipeline.params is the one params loader and validator
# every stage reads its section through; its `check` command is the DAG's first stage.
LIBRARIES_WITH_A_CLI = {"params", "dag", "effect", "params_schema"}   # libraries with a CLI that other modules
# import (the workflow tools: params, dag, params_schema; the effect summary, which effect_report reads the
# kept study through)


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _is_main_guard(node: ast.stmt) -> bool:
    """`if __name__ == "__main__":`"""
    if not isinstance(node, ast.If) or not isinstance(node.test, ast.Compare):
        return False
    test = node.test
    return (isinstance(test.left, ast.Name) and test.left.id == "__name__" and len(test.comparators) == 1
            and isinstance(test.comparators[0], ast.Constant) and test.comparators[0].value == "__main__")


def stage_modules() -> set[str]:
    """pipeline/*.py modules that define `main` and run it under `if __name__ == "__main__"`."""
    stages = set()
    for path in PIPELINE.glob("*.py"):
        body = _tree(path).body
        has_main = any(isinstance(node, ast.FunctionDef) and node.name == "main" for node in body)
        if has_main and any(_is_main_guard(node) for node in body):
            stages.add(path.stem)
    return stages - LIBRARIES_WITH_A_CLI


def _module_name(path: Path, root: Path = PIPELINE.parent) -> str:
    return ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")


def imported_modules(path: Path, root: Path = PIPELINE.parent) -> set[str]:
    """Every module a file under `root` imports, as absolute dotted names, wherever the import stands
    (inside functions and `if TYPE_CHECKING:` blocks too); `from pipeline import x` counts as pipeline.x."""
    name = _module_name(path, root)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def test_stage_modules_are_the_dag_commands():
    """The stage list the layering test uses is the one the DAG runs (pipeline/dag.py's commands)."""
    commands = {re.match(r"python -m pipeline\.(\w+)", stage.cmd[0]).group(1)   # type: ignore[union-attr]
                for stage in dag.STAGES.values()}
    assert commands - LIBRARIES_WITH_A_CLI <= stage_modules()
    assert {"teacher", "pseudolabel", "threat_model", "train_robust", "evaluate"} <= stage_modules()


def test_no_module_imports_a_stage():
    stages = {f"pipeline.{name}" for name in stage_modules()}
    offences = []
    for path in sorted(PIPELINE.rglob("*.py")):
        own = _module_name(path)
        for module in sorted((imported_modules(path) & stages) - {own}):
            offences.append(f"{path.relative_to(PIPELINE.parent)} imports the stage {module}")
    assert not offences, ("a stage is imported by another pipeline module; move what is shared into a "
                          "library module:\n" + "\n".join(offences))


def test_the_check_sees_imports_of_every_form(tmp_path):
    """The import parser finds absolute, `from pipeline import`, lazy and relative imports."""
    (tmp_path / "pipeline" / "generators").mkdir(parents=True)
    source = tmp_path / "pipeline" / "generators" / "example.py"
    source.write_text("from typing import TYPE_CHECKING\nimport pipeline.teacher\nfrom pipeline import evaluate as E\n"
                      "if TYPE_CHECKING:\n    from pipeline.threat_model import describe\n"
                      "def f():\n    from ..pseudolabel import main\nfrom . import base\n")
    found = imported_modules(source, root=tmp_path)
    assert {"pipeline.teacher", "pipeline.evaluate", "pipeline.threat_model", "pipeline.pseudolabel",
            "pipeline.generators.base"} <= found


def layers() -> dict[str, list[str]]:
    """The layer map of pipeline/__init__.py's docstring: {layer: modules}."""
    found: dict[str, list[str]] = {}
    layer = None
    for line in (pipeline.__doc__ or "").splitlines()[1:]:
        if match := re.match(r"^(\w+): ", line):
            layer = match.group(1)
            found[layer] = []
        elif line.startswith("    ") and layer:
            found[layer] += line.split()
    return found


def test_the_layer_map_lists_every_module_once_and_the_stages_the_dag_runs():
    mapped = layers()
    assert set(mapped) == {"stages", "tools", "workflow", "libraries"}
    names = [name for modules in mapped.values() for name in modules]
    tree = {path.stem for path in PIPELINE.glob("*.py") if path.stem != "__init__"} | \
        {path.name for path in PIPELINE.iterdir() if (path / "__init__.py").exists()}
    assert sorted(names) == sorted(tree), "pipeline/__init__.py: list each module in one layer"
    commands = {re.match(r"python -m pipeline\.(\w+)", stage.cmd[0]).group(1)   # type: ignore[union-attr]
                for stage in dag.STAGES.values()}
    assert set(mapped["stages"]) == commands - {"params"}   # check_params runs the workflow's own params check
    assert set(mapped["stages"]) | set(mapped["tools"]) == stage_modules()
