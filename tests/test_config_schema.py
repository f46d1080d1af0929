"""Each params key is declared once, as a field of its section's dataclass: the type (choices as `Literal`),
and the range and description as `params.key(...)`. pipeline/params.schema.yaml is written from them
(`python -m pipeline.params_schema write`); these tests keep the committed file equal to its rendering, so an
edit of the schema or of a field without the other fails here, and hold every field to the rule: declared
with `key`, no default, no check of its own. Each `Literal` also equals the registry it names, so the
schema, the types and argparse's `choices=sorted(REGISTRY)` offer the same names.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, get_args

import jsonschema
import pytest

from pipeline import corruptions, datasets, evaluate, generators, models
from pipeline import params as P
from pipeline import params_schema as S
from pipeline.attacks import Threat
from pipeline.generators import ddpm


def section_classes() -> dict[str, type]:
    classes = {}
    for name, declared in S.sections().items():
        if isinstance(declared, dict):
            classes.update({f"{name}.{key}": cls for key, cls in declared.items()})
        else:
            classes[name] = declared
    return classes


SECTIONS = section_classes()
REGISTRIES = [
    (models.ModelName, models.MODELS),
    (generators.GeneratorName, generators.GENERATORS),
    (ddpm.SamplerName, ddpm.SAMPLERS),
    (ddpm.DdpmVariance, ddpm.VARIANCE_TYPES),
    (corruptions.Corruption, corruptions.FAMILIES),
    (Threat, evaluate.NORMS),
    (evaluate.AutoAttackVersion, evaluate.ATTACKS),
    (P.DatasetName, datasets.DATASETS),
]


def test_the_committed_schema_is_the_one_the_dataclasses_render():
    assert P.SCHEMA_PATH.read_text() == S.render(), "run `python -m pipeline.params_schema write`"
    assert P.load_schema() == S.schema()


def test_check_names_a_stale_schema(tmp_path):
    stale = tmp_path / "params.schema.yaml"
    stale.write_text(S.render().replace("minimum: 1", "minimum: 2", 1))
    with pytest.raises(SystemExit, match="params.schema.yaml is stale; run `python -m pipeline.params_schema write"):
        S.main(["check", str(stale)])
    S.main(["check", str(P.SCHEMA_PATH)])


def test_every_params_section_is_a_dataclass_the_shipped_params_fill():
    default = P.load(P.CONFIGS_DIR / "default.yaml")
    for name, cls in SECTIONS.items():
        values: Any = default
        for part in name.split("."):
            values = values[part]
        P.section(cls, values)   # every key a field, every field a key


@pytest.mark.parametrize("name", sorted(SECTIONS))
def test_every_field_is_declared_with_key_and_no_default(name):
    """No second defaults: a field with a default would let a stage run on a value params.yaml never set."""
    for field in dataclasses.fields(SECTIONS[name]):
        assert P.SCHEMA_KEY in field.metadata, f"{name}.{field.name}: declare it with params.key(...)"
        assert field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING, \
            f"{name}.{field.name} has a default"


@pytest.mark.parametrize("name", sorted(SECTIONS))
def test_dataclasses_repeat_no_check(name):
    """Ranges and enums live in the declarations, rules between keys in params._check_cross_keys."""
    assert not hasattr(SECTIONS[name], "__post_init__")


@pytest.mark.parametrize("literal, registry", REGISTRIES, ids=lambda x: getattr(x, "__name__", None))
def test_literals_equal_their_registries(literal, registry):
    assert sorted(get_args(literal)) == sorted(registry)


def test_types_and_declarations_become_schema_nodes():
    """The rendering itself: Literal choices, ranges, list items, mapping values, a whole node."""
    @dataclasses.dataclass(frozen=True)
    class Example:
        kind: Literal["a", "b"] = P.key("which")
        count: int = P.key(minimum=1)
        sizes: list[float] = P.key(minItems=1, items={"exclusiveMinimum": 0})
        radius: dict[Literal["x", "y"], float] = P.key(values={"exclusiveMinimum": 0})
        free: dict[str, dict[str, Any]] = P.key(values={"minProperties": 1})
        either: str | int = P.key(schema={"oneOf": [{"type": "string"}, {"type": "integer"}]})

    node = S.dataclass_node(Example)
    assert node["required"] == ["kind", "count", "sizes", "radius", "free", "either"]
    assert node["additionalProperties"] is False
    props = node["properties"]
    assert props["kind"] == {"type": "string", "enum": ["a", "b"], "description": "which"}
    assert props["count"] == {"type": "integer", "minimum": 1}
    assert props["sizes"] == {"type": "array", "items": {"type": "number", "exclusiveMinimum": 0}, "minItems": 1}
    assert props["radius"]["properties"]["y"] == {"type": "number", "exclusiveMinimum": 0}
    assert props["radius"]["required"] == ["x", "y"] and props["radius"]["additionalProperties"] is False
    assert props["free"] == {"type": "object", "additionalProperties": {"type": "object", "minProperties": 1}}
    validator = jsonschema.Draft202012Validator({"type": "object", "properties": props})
    assert not list(validator.iter_errors({"kind": "a", "count": 1, "sizes": [0.5], "either": 3}))
    assert len(list(validator.iter_errors({"kind": "c", "count": 0, "sizes": [0.0], "free": {"v": {}}}))) == 4
