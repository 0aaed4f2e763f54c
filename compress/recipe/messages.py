"""How a schema violation reads: the JSON path, the bad value (shortened when long) and what is
allowed, with a close match for a misspelt key."""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping
from typing import Any

import jsonschema


def json_path(base: str, parts: Any) -> str:
    out = base
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(recipe)"


def message(error: jsonschema.ValidationError, base: str) -> str:
    where = json_path(base, error.absolute_path)
    value = json.dumps(error.instance)
    if len(value) > 80:  # a 10 MB string is not repeated in the message
        value = value[:60] + f"... ({len(value)} characters)"
    if error.validator == "maxLength":
        return f"{where}: {value} is longer than {error.validator_value} characters"
    if error.validator == "maxItems":
        n = len(error.instance) if isinstance(error.instance, list) else "too many"
        return f"{where}: {n} items, more than {error.validator_value}"
    if error.validator == "additionalProperties":
        # The object that has the unknown key, and the schema that lists its keys.
        assert isinstance(error.instance, Mapping) and isinstance(error.schema, Mapping)
        allowed = sorted(error.schema.get("properties", {}))
        extra = sorted(set(error.instance) - set(allowed))
        key = extra[0]
        return f"{where}: unknown key {key!r}{hint(key, allowed)}; allowed keys: {choices(allowed)}"
    if error.validator == "enum":
        return f"{where}: {value} is not allowed; one of {choices(error.validator_value)}"
    if error.validator == "const":
        return f"{where}: {value} must be {json.dumps(error.validator_value)}"
    if error.validator == "type":
        return f"{where}: {value} is not of type {error.validator_value}"
    if error.validator in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        bound = {"minimum": ">=", "maximum": "<=", "exclusiveMinimum": ">", "exclusiveMaximum": "<"}
        return f"{where}: {value} must be {bound[error.validator]} {error.validator_value}"
    if error.validator == "required":
        return f"{where}: {error.message}"
    negated = error.validator_value
    if error.validator == "not" and isinstance(negated, Mapping) and "required" in negated:
        return f"{where}: {' and '.join(negated['required'])} are both set; give only one"
    if error.validator == "oneOf" and error.context:
        # the alternative of the right type that failed on a bound says most
        bounds = [c for c in error.context if c.validator in ("maxLength", "maxItems")]
        if bounds:
            return message(bounds[0], base)
        deepest = max(error.context, key=lambda e: len(e.absolute_path))
        if len(deepest.absolute_path) > len(error.absolute_path):
            return message(deepest, base)
    if error.validator == "oneOf":
        assert isinstance(error.validator_value, list)  # the schema's alternatives
        return f"{where}: {value} is neither {describe(error.validator_value)}"
    return f"{where}: {value}: {error.message}"


def describe(options: list[Mapping[str, Any]]) -> str:
    kinds = [
        "a list" if o.get("type") == "array" else "an object" if "$ref" in o else str(o.get("type"))
        for o in options
    ]
    return " nor ".join(kinds)


def choices(values: Any) -> str:
    return ", ".join(json.dumps(v) for v in values)


def hint(key: str, allowed: Any) -> str:
    close = difflib.get_close_matches(str(key), [str(a) for a in allowed], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
