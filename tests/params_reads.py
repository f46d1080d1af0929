"""Which params keys a stage reads: run its CLI with a recording params mapping, and compare with the
keys pipeline/dag.py declares for it.

A stage runs in an empty folder holding params.yaml and empty stand-ins for its inputs, so it stops at its
first real read of data; the keys it took out of params until then are recorded. Keys read later in the
stage's main (after the model is loaded, say) are added from the source: constant subscripts of the
loaded params, found with `ast`. A stage reads a key when it takes a value out (a leaf, or every leaf of a
copied or hashed section); listing a section's key names is not a read.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import importlib
import inspect
import os
import shlex
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any
from unittest import mock

from pipeline import params as P

Key = tuple[str, ...]

# The table reads (and hashes) params only after it has read one evaluation and the teacher's accuracy.
STAND_IN_TEXT = {
    "results/teacher/metrics.json": '{"test_acc": 0.5}',
    "results/evaluate/baseline/linf.json": '{"run": "baseline", "threat": "linf"}',
}


class Recording(dict):
    """A params mapping that notes the key path of every value a stage takes out of it (`log`), and of
    every section it copies out whole (`sections`: e.g. `evaluate.eps_255` into the evaluate config)."""

    def __init__(self, values: dict[str, Any], path: Key, log: set[Key], sections: set[Key]) -> None:
        super().__init__({key: Recording(value, (*path, key), log, sections) if isinstance(value, dict)
                          else value for key, value in values.items()})
        self._path, self._log, self._sections = path, log, sections

    def __getitem__(self, key: str) -> Any:
        value = super().__getitem__(key)
        if not isinstance(value, Recording):
            self._log.add((*self._path, key))
        return value

    def __iter__(self) -> Iterator[str]:   # overridden so `{**m}` and dict(m) call keys() and __getitem__
        return super().__iter__()

    def keys(self) -> list[str]:   # type: ignore[override]
        """Called to copy the mapping (`**m`, dict(m), json): its sections are handed on whole."""
        self._sections.update((*self._path, key) for key, value in super().items() if isinstance(value, Recording))
        return list(super().keys())

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self else default

    def items(self) -> list[tuple[str, Any]]:   # type: ignore[override]
        return [(key, self[key]) for key in self.keys()]

    def values(self) -> list[Any]:   # type: ignore[override]
        return [self[key] for key in self.keys()]

    def __deepcopy__(self, memo: dict[int, Any]) -> dict[str, Any]:
        return {key: copy.deepcopy(value, memo) for key, value in self.items()}


@dataclass(frozen=True)
class Reads:
    """Key paths of the values a stage read while it ran, and of those it may read: sections it copied
    out while running, and constant subscripts in its source (maybe read after it stopped)."""
    ran: frozenset[Key]
    source: frozenset[Key]

    def renamed(self, old: Key, new: Key) -> Reads:
        """Reads under `old` counted as reads under `new` (a variant's settings are the run's train_robust)."""
        def move(keys: frozenset[Key]) -> frozenset[Key]:
            return frozenset((*new, *key[len(old):]) if key[:len(old)] == old else key for key in keys)
        return Reads(move(self.ran), move(self.source))


def stage_reads(command: str, inputs: Iterable[str], params_file: Path, folder: Path) -> Reads:
    """Run `python -m pipeline.<stage> ...` in-process in `folder` and record the params it reads."""
    words = shlex.split(command)
    assert words[:2] == ["python", "-m"], command
    module = importlib.import_module(words[2])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.yaml").write_text(params_file.read_text())
    for name in inputs:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix:
            path.touch()
        else:
            path.mkdir(exist_ok=True)
    for name, text in STAND_IN_TEXT.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    log: set[Key] = set()
    sections: set[Key] = set()
    loads: list[Path] = []
    load = P.load

    def recording_load(path: Path | str) -> dict[str, Any]:
        loads.append(Path(path))
        return Recording(load(path), (), log, sections)

    with mock.patch.object(P, "load", recording_load), _cwd(folder):
        try:
            module.main(words[3:])
        except (Exception, SystemExit):   # stand-ins are not data: every stage stops at its first read
            pass
    return Reads(frozenset(log), frozenset(sections) | (source_reads(module) if loads else frozenset()))


@contextlib.contextmanager
def _cwd(path: Path) -> Iterator[None]:
    old = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def source_reads(module: ModuleType) -> frozenset[Key]:
    """Constant subscripts of the params a function loads (`cfg_all["base"]["seed"]`, and through a name
    bound to a section, `cfg = cfg_all["evaluate"]; cfg["n_eval"]`), in every function of the module. A
    parameter named `cfg_all` is the loaded params too (main hands them to a subcommand's function)."""
    tree = ast.parse(inspect.getsource(module))
    found: set[Key] = set()
    for function in (node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)):
        bound: dict[str, Key] = {arg.arg: () for arg in function.args.args if arg.arg == "cfg_all"}
        assignments = [node for node in ast.walk(function) if isinstance(node, ast.Assign)
                       and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)]
        for _ in range(3):   # names bound to sections of names bound earlier
            for node in assignments:
                name = node.targets[0].id   # type: ignore[attr-defined]
                if _is_params_load(node.value):
                    bound[name] = ()
                elif (path := _subscript_path(node.value, bound)) is not None:
                    bound[name] = path
        subscripts = [node for node in ast.walk(function) if isinstance(node, ast.Subscript)]
        inner = {id(node.value) for node in subscripts}
        for subscript in subscripts:
            if id(subscript) not in inner and (path := _subscript_path(subscript, bound)):
                found.add(path)
    return frozenset(found)


def _is_params_load(node: ast.expr) -> bool:
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
        and isinstance(node.func.value, ast.Name) and node.func.value.id in ("params_mod", "P")


def _subscript_path(node: ast.expr, bound: dict[str, Key]) -> Key | None:
    keys: list[str] = []
    while isinstance(node, ast.Subscript):
        if not (isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str)):
            return None
        keys.insert(0, node.slice.value)
        node = node.value
    if isinstance(node, ast.Name) and node.id in bound:
        return (*bound[node.id], *keys)
    return None


def _under(key: Key, prefix: Key) -> bool:
    return key[:len(prefix)] == prefix


def mismatches(reads: Reads, declared: Iterable[str], axes: Iterable[str]) -> list[str]:
    """What differs between the keys a stage read and those it declares, besides the axes it is expanded
    over. Values read while running must lie under a declared key; sections copied and keys found in the
    source only need to meet one (a section may be passed on to code that reads part of it); every
    declared key must have a read under it."""
    keys = [tuple(key.split(".")) for key in declared]
    exempt = [tuple(key.split(".")) for key in axes]
    problems = []
    for key in sorted(reads.ran):
        if not any(_under(key, other) for other in [*keys, *exempt]):
            problems.append(f"reads {'.'.join(key)} but does not declare it")
    for key in sorted(reads.source - reads.ran):
        if not any(_under(key, other) or _under(other, key) for other in [*keys, *exempt]):
            problems.append(f"may read {'.'.join(key)} (a section it copies, or in its source) but does not "
                            "declare it")
    for key in keys:
        if not any(_under(read, key) for read in reads.ran | reads.source):
            problems.append(f"declares {'.'.join(key)} but never reads it")
    return problems
