"""Command-line config values typed by the schema before validation.

Snakemake reads a nested ``--config`` value (``tiling='{"tile_size": 256}'``) with YAML's base
loader, which leaves every scalar inside it a string, so the schema then rejects ``'256'`` as not
an integer although the user wrote a number. Top-level values are typed by Snakemake itself. Each
string the schema wants as a number, a boolean or null is read as YAML and kept only when it then
has one of the types the schema allows, so a string the schema wants stays a string and a typo
still fails validation, by key.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping, MutableSequence
from typing import Any

import yaml

_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "null": (type(None),),
    "string": (str,),
}


def _branches(schema: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The alternatives a value may match: each of oneOf/anyOf, or the schema itself."""
    return [*schema.get("oneOf", []), *schema.get("anyOf", [])] or [schema]


def _wants_string(branch: Mapping[str, Any], value: str) -> bool:
    if "const" in branch or "enum" in branch:
        return value in [branch.get("const"), *branch.get("enum", [])]
    types = branch.get("type", [])
    return "string" in ({types} if isinstance(types, str) else set(types))


def _types(branch: Mapping[str, Any]) -> set[str]:
    types = branch.get("type", [])
    allowed = {types} if isinstance(types, str) else set(types)
    for value in [*branch.get("enum", []), *([branch["const"]] if "const" in branch else [])]:
        allowed |= {name for name, kinds in _JSON_TYPES.items() if type(value) in kinds}
    return allowed


def _coerce(value: Any, schema: Mapping[str, Any]) -> Any:
    if isinstance(value, MutableMapping):
        properties = schema.get("properties", {})
        for key in list(value):
            if key in properties:
                value[key] = _coerce(value[key], properties[key])
        return value
    if isinstance(value, MutableSequence) and isinstance(schema.get("items"), Mapping):
        return [_coerce(v, schema["items"]) for v in value]
    if not isinstance(value, str):
        return value
    branches = _branches(schema)
    if any(_wants_string(b, value) for b in branches):
        return value
    allowed = set().union(*(_types(b) for b in branches)) - {"string"}
    if not allowed:
        return value
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        return value
    if isinstance(parsed, bool) and "boolean" not in allowed:
        return value
    if any(isinstance(parsed, _JSON_TYPES[t]) for t in allowed if t in _JSON_TYPES):
        return parsed
    return value


def coerce_to_schema(config: MutableMapping[str, Any], schema_path: str | os.PathLike[str]) -> None:
    """Type, in place, the string leaves of ``config`` that its schema wants as non-strings."""
    with open(schema_path) as handle:
        schema = yaml.safe_load(handle)
    _coerce(config, schema)
