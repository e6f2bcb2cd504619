"""The config schema (`workflow/schemas/config.schema.yaml`): the one owner of config defaults and of
the values a setting may take.

The workflow validates its config against it (`e2epath.config.resolve.validate`, Snakemake's own
validation, which fills the defaults in). A step that may also be run by hand asks the schema for
its defaults (`default`) and checks its command-line values against it (`arg_type`), so a value the
config may not hold is refused by the step too. Reading it needs PyYAML only (never jsonschema or
Snakemake): every job's environment has it.
"""
from __future__ import annotations

import argparse
import copy
import functools
from pathlib import Path
from typing import Any, Callable

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "schemas" / "config.schema.yaml"


class ConfigError(ValueError):
    """A config the workflow refuses; the message names the key (or file and row) and what to do."""


@functools.cache
def _schema() -> dict[str, Any]:
    import yaml

    return yaml.load(SCHEMA_PATH.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def schema() -> dict[str, Any]:
    """The schema as a dict (a copy: callers may not change the owner's)."""
    return copy.deepcopy(_schema())


def _resolve(node: dict[str, Any]) -> dict[str, Any]:
    ref = node.get("$ref")
    if ref:
        target: Any = _schema()
        for part in ref.removeprefix("#/").split("/"):
            target = target[part]
        return target
    return node


def prop(*keys: str) -> dict[str, Any]:
    """The sub-schema of a config key, e.g. ``prop("preprocess", "patch_size")``; method keys under
    ``prop("method", key)``."""
    node: dict[str, Any] = _schema()
    for i, key in enumerate(keys):
        if i == 0 and key == "method":
            node = _schema()["definitions"]["method_spec"]
            continue
        node = _resolve(node)
        try:
            node = node["properties"][key]
        except KeyError:
            raise KeyError(f"the config schema has no key {'.'.join(keys)}") from None
    return _resolve(node)


def default(*keys: str) -> Any:
    """The schema's default of a config key; KeyError if it has none."""
    node = prop(*keys)
    if "default" not in node:
        raise KeyError(f"config key {'.'.join(keys)} has no default in the schema")
    return copy.deepcopy(node["default"])


def enum(*keys: str) -> tuple:
    """The values a config key may take (its schema enum)."""
    return tuple(prop(*keys)["enum"])


# The keywords `arg_type` checks a value against; a key whose schema uses others cannot be a flag.
CHECKED = {"type", "enum", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "default", "description"}


def problem(value: Any, node: dict[str, Any]) -> str | None:
    """Why ``value`` breaks a scalar property's schema (`CHECKED` keywords), or None. Steps check their
    flags with this rather than jsonschema, whose import alone costs every job a tenth of a second."""
    kinds = node.get("type", "string")
    kinds = [kinds] if isinstance(kinds, str) else list(kinds)
    if value is None:
        return None if "null" in kinds else "may not be null"
    if "enum" in node and value not in node["enum"]:
        return f"is not one of {node['enum']}"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        for key, ok in (("minimum", lambda v, b: v >= b), ("maximum", lambda v, b: v <= b),
                        ("exclusiveMinimum", lambda v, b: v > b), ("exclusiveMaximum", lambda v, b: v < b)):
            if key in node and not ok(value, node[key]):
                words = {"minimum": "at least", "maximum": "at most", "exclusiveMinimum": "above",
                         "exclusiveMaximum": "below"}[key]
                return f"must be {words} {node[key]}"
    return None


def arg_type(*keys: str) -> Callable[[str], Any]:
    """An argparse ``type`` for a command-line flag that carries config key ``keys``: the text is
    converted to the key's type and checked against its schema (range, enum), so a step refuses
    what the config may not hold, with the key's name in the message."""
    node = prop(*keys)
    name = ".".join(keys)
    unchecked = set(node) - CHECKED
    if unchecked:
        raise KeyError(f"config {name}: its schema uses {sorted(unchecked)}, which a flag's check does not cover")
    kinds = node.get("type", "string")
    kinds = [kinds] if isinstance(kinds, str) else list(kinds)

    def convert(text: str) -> Any:
        value: Any = text
        if "integer" in kinds:
            try:
                value = int(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"{text!r} is not a whole number ({name})") from None
        elif "number" in kinds:
            try:
                value = float(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"{text!r} is not a number ({name})") from None
        why = problem(value, node)
        if why:
            raise argparse.ArgumentTypeError(f"{text}: config {name} {why}")
        return value

    convert.__name__ = name  # argparse names the type in its messages
    return convert
