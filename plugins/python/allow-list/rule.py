"""Attribute allow-list, the Python twin of plugins/allow-list (Rust).

Serves `variant` when a context attribute is one of the configured values,
and `otherwise` (or the flag's default) when not. Configuration:
`{"attribute": "country", "values": ["NL", "DE"], "variant": "on", "otherwise": "off"}`.
Values compare by type: `1` does not match `"1"`.
"""

import json

from componentize_py_types import Err
from wit_world.exports import rule as contract
from wit_world.imports import context

from flaghost_rule import errors_as_err

FIELDS = {"attribute", "values", "variant", "otherwise"}

# The context value kinds that can match a configured value.
SCALARS = (context.Value_Text, context.Value_Integer, context.Value_Float, context.Value_Boolean)


def parse(variants, text):
    """The configuration in `text`, checked against the flag's `variants`."""
    config = json.loads(text)
    if not isinstance(config, dict):
        raise Err("invalid configuration: expected an object")
    unknown = sorted(set(config) - FIELDS)
    if unknown:
        raise Err(f"invalid configuration: unknown field {unknown[0]!r}")
    attribute = config.get("attribute")
    if not isinstance(attribute, str) or not attribute:
        raise Err("attribute must not be empty")
    values = config.get("values")
    if not isinstance(values, list):
        raise Err("invalid configuration: values must be a list")
    for value in values:
        if not isinstance(value, (str, int, float, bool)):
            raise Err(f"values may hold strings, numbers and booleans, not {json.dumps(value)}")
    for name in (config.get("variant"), config.get("otherwise")):
        if name is not None and name not in variants:
            raise Err(f"variant {name!r} is not one of the flag's variants {variants}")
    if config.get("variant") is None:
        raise Err("invalid configuration: missing field 'variant'")
    return config


def same(allowed, value):
    """Whether `value` (from the context) is `allowed`: the same type (`1`
    is neither `1.0` nor `"1"` nor `True`) and the same value."""
    return type(allowed) is type(value) and allowed == value


class Targeting(contract.Targeting):
    def __init__(self, config):
        self.attribute = config["attribute"]
        self.values = config["values"]
        self.variant = config["variant"]
        self.otherwise = config.get("otherwise")

    @classmethod
    @errors_as_err
    def create(cls, flag_key, variants, config):
        return cls(parse(variants, config))

    @errors_as_err
    def evaluate(self):
        value = context.get(self.attribute)
        if isinstance(value, SCALARS) and any(same(a, value.value) for a in self.values):
            return self.variant
        return self.otherwise
