"""Each params key is described once: the schema (pipeline/params.schema.yaml) holds its type, range and
choices, and the stage config dataclass that mirrors its section only names it, with a type. These tests
keep the two in step, so a key added, renamed or given another choice on one side fails here rather than
in `params.section` at the start of a stage: the schema's keys equal the dataclass fields, a `Literal`
field's values equal the schema's `enum` (and every schema enum is a `Literal` field), and bool, int,
float, str, list and mapping types agree. Each `Literal` also equals the registry it names, so the
schema, the types and argparse's `choices=sorted(REGISTRY)` offer the same names.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, get_args, get_origin, get_type_hints

import pytest

from pipeline import corruptions, evaluate, generators, models
from pipeline import params as P
from pipeline.analysis import AnalysisConfig
from pipeline.attacks import Threat
from pipeline.data import DataConfig
from pipeline.evaluate import EvaluateConfig
from pipeline.generate import GenerateConfig
from pipeline.generators import ddpm
from pipeline.pseudolabel import PseudolabelConfig
from pipeline.select import SelectConfig
from pipeline.teacher import TeacherConfig
from pipeline.train_robust import TrainRobustConfig

SCHEMA = P.load_schema()
# Schema path of each section -> the dataclass its stage builds with params.section.
SECTIONS: dict[tuple[str, ...], type] = {
    ("data",): DataConfig,
    **{("train_generator", name): module.Config for name, module in generators.GENERATORS.items()},
    ("generate",): GenerateConfig,
    ("teacher",): TeacherConfig,
    ("pseudolabel",): PseudolabelConfig,
    ("select",): SelectConfig,
    ("analysis",): AnalysisConfig,
    ("train_robust",): TrainRobustConfig,
    ("evaluate",): EvaluateConfig,
}
# Read as plain mappings: base by every stage, variants by pipeline/params.py itself; train_generator
# holds one section per generator (above).
WITHOUT_DATACLASS = {"base", "variants", "train_generator"}
PYTHON_TYPES = {bool: "boolean", int: "integer", float: "number", str: "string"}
# Each Literal and the registry whose keys are its values.
REGISTRIES = [
    (models.ModelName, models.MODELS),
    (generators.GeneratorName, generators.GENERATORS),
    (ddpm.SamplerName, ddpm.SAMPLERS),
    (ddpm.DdpmVariance, ddpm.VARIANCE_TYPES),
    (corruptions.Corruption, corruptions.FAMILIES),
    (Threat, evaluate.NORMS),
    (evaluate.AutoAttackVersion, evaluate.ATTACKS),
]


def resolve(node: dict[str, Any]) -> dict[str, Any]:
    """A schema node with its `$ref` (into $defs) laid under its own keys."""
    if "$ref" not in node:
        return node
    name = node["$ref"].removeprefix("#/$defs/")
    return {**SCHEMA["$defs"][name], **{k: v for k, v in node.items() if k != "$ref"}}


def section_schema(path: tuple[str, ...]) -> dict[str, Any]:
    node = SCHEMA
    for key in path:
        node = resolve(node["properties"][key])
    return node


def _union_members(hint: Any) -> tuple[Any, ...] | None:
    return get_args(hint) if get_origin(hint) in (typing.Union, types.UnionType) else None


def literal_values(hint: Any) -> tuple[Any, ...] | None:
    """The values of a Literal, or of a union of Literals (e.g. Threat | LearnedThreat); None otherwise."""
    if get_origin(hint) is Literal:
        return get_args(hint)
    members = _union_members(hint)
    if members and all(get_origin(member) is Literal for member in members):
        return tuple(value for member in members for value in get_args(member))
    return None


def mismatches(hint: Any, node: dict[str, Any], where: str) -> list[str]:
    """How the Python type `hint` and the schema node disagree (empty when they agree)."""
    node = resolve(node)
    alternatives = node.get("oneOf") or node.get("anyOf")
    if alternatives is not None:
        members = _union_members(hint) or (hint,)
        if len(members) != len(alternatives):
            return [f"{where}: {hint} has {len(members)} alternatives, the schema {len(alternatives)}"]
        return [f"{where}: no schema alternative fits {member}" for member in members
                if all(mismatches(member, alternative, where) for alternative in alternatives)]
    values = literal_values(hint)
    if values is not None:
        if "enum" not in node:
            return [f"{where}: Literal{list(values)} field, but the schema has no enum"]
        if sorted(values) != sorted(node["enum"]) or len(set(values)) != len(values):
            return [f"{where}: Literal {sorted(values)} != schema enum {sorted(node['enum'])}"]
        kinds = {type(value) for value in values}
        expected = PYTHON_TYPES.get(kinds.pop()) if len(kinds) == 1 else None
        return [] if node.get("type") == expected else [f"{where}: schema type {node.get('type')} for {hint}"]
    if "enum" in node:
        return [f"{where}: schema enum {node['enum']} on a {hint} field (type it Literal[...])"]
    if hint in PYTHON_TYPES:
        found = node.get("type")
        return [] if found == PYTHON_TYPES[hint] else [f"{where}: {hint.__name__} field, schema type {found}"]
    origin, args = get_origin(hint), get_args(hint)
    if origin is list:
        if node.get("type") != "array":
            return [f"{where}: list field, schema type {node.get('type')}"]
        return mismatches(args[0], node["items"], f"{where}[]")
    if origin is dict:
        if node.get("type") != "object":
            return [f"{where}: mapping field, schema type {node.get('type')}"]
        keys = literal_values(args[0])
        if keys is None:  # free keys: every value follows additionalProperties
            return mismatches(args[0], {"type": "string"}, f"{where} key") + \
                mismatches(args[1], node["additionalProperties"], f"{where}.*")
        if set(keys) != set(node.get("properties", {})) or set(keys) != set(node.get("required", [])):
            return [f"{where}: keys {sorted(keys)} != schema properties {sorted(node.get('properties', {}))}"]
        return [error for key in keys for error in mismatches(args[1], node["properties"][key], f"{where}.{key}")]
    return [f"{where}: no rule compares {hint} with the schema"]


def test_every_section_has_its_dataclass():
    """A new params section gets a dataclass here, or is named as read without one."""
    listed = {path[0] for path in SECTIONS} | WITHOUT_DATACLASS
    assert set(SCHEMA["properties"]) == listed
    assert {path[1] for path in SECTIONS if path[0] == "train_generator"} == \
        set(SCHEMA["properties"]["train_generator"]["properties"])


@pytest.mark.parametrize("path", sorted(SECTIONS), ids=".".join)
def test_schema_keys_equal_dataclass_fields(path):
    node = section_schema(path)
    fields = [field.name for field in dataclasses.fields(SECTIONS[path])]
    assert set(node["required"]) == set(node["properties"]), "every schema key is required (no defaults)"
    assert set(node["required"]) == set(fields), (
        f"{'.'.join(path)}: only in the schema {sorted(set(node['required']) - set(fields))}, "
        f"only in {SECTIONS[path].__name__} {sorted(set(fields) - set(node['required']))}")
    assert node.get("additionalProperties") is False


@pytest.mark.parametrize("path", sorted(SECTIONS), ids=".".join)
def test_field_types_and_choices_equal_the_schema(path):
    """Literal fields carry the schema's enum, other fields its type; no schema enum on a plain str."""
    node = section_schema(path)
    hints = get_type_hints(SECTIONS[path])
    errors = [error for name, hint in hints.items()
              for error in mismatches(hint, node["properties"][name], ".".join((*path, name)))]
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("path", sorted(SECTIONS), ids=".".join)
def test_dataclasses_repeat_no_check(path):
    """Ranges and enums live in the schema, rules between keys in params._check_cross_keys: one place each."""
    assert not hasattr(SECTIONS[path], "__post_init__")


@pytest.mark.parametrize("literal, registry", REGISTRIES, ids=lambda x: getattr(x, "__name__", None))
def test_literals_equal_their_registries(literal, registry):
    assert sorted(get_args(literal)) == sorted(registry)


def test_mismatches_are_found():
    """The comparison itself: an enum value, a type and a key set that differ are each reported."""
    assert mismatches(Literal["a", "b"], {"type": "string", "enum": ["a", "c"]}, "k")
    assert mismatches(str, {"type": "string", "enum": ["a"]}, "k")
    assert mismatches(int, {"type": "number"}, "k")
    assert mismatches(list[int], {"type": "array", "items": {"type": "string"}}, "k")
    assert mismatches(dict[Literal["x"], float], {"type": "object", "required": ["x", "y"],
                                                 "properties": {"x": {"type": "number"}, "y": {"type": "number"}}},
                      "k")
    assert not mismatches(str | dict[str, str], {"oneOf": [{"type": "string"}, {
        "type": "object", "additionalProperties": {"type": "string"}}]}, "k")
