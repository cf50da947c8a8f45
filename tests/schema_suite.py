"""The structured-output suite's schemas (shared by tests/test_structured_output.py, tests/test_tool_calls.py
and bench/structured.py): every kind of constraint issue 16 names, each bounded so the random tiny model
(whose unconstrained output is noise, so the grammar does all the work) ends well inside max_tokens.

`invalid(text, schema)` says why an output does not parse or validate (formats checked too), or None."""

from __future__ import annotations

import json
from typing import Any

import jsonschema_rs

OBJ = "object"
INT09 = {"type": "integer", "minimum": 0, "maximum": 9}


def _obj(required: list[str] | None = None, **props: Any) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": OBJ, "properties": props}
    schema["required"] = list(props) if required is None else required
    return schema


SCHEMAS: list[dict[str, Any]] = [
    # 0-25: the first suite
    _obj(intent={"enum": ["refund", "cancel", "track"]}),
    _obj(ok={"type": "boolean"}),
    _obj(n={"type": "integer", "minimum": 1, "maximum": 9}),
    _obj(x={"type": "number", "minimum": -5, "maximum": 5}),
    _obj(id={"type": "string", "pattern": "^[A-Z]{2}-[0-9]{4}$"}),
    _obj(name={"type": "string", "maxLength": 12}),
    _obj(tags={"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 3}),
    _obj(xs={"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "minItems": 2,
             "maxItems": 4}),
    _obj(user=_obj(name={"type": "string", "maxLength": 8}, age={"type": "integer", "minimum": 0, "maximum": 120})),
    _obj(v={"anyOf": [INT09, {"type": "null"}]}),
    _obj(v={"anyOf": [{"enum": ["yes", "no"]}, {"type": "boolean"}]}),
    _obj(["a"], a={"type": "integer", "minimum": 0, "maximum": 3}, b={"type": "string", "maxLength": 4}),
    _obj(date={"type": "string", "pattern": "^2026-[01][0-9]-[0-3][0-9]$"}),
    _obj(level={"enum": [1, 2, 3]}, flag={"const": "on"}),
    _obj(items={"type": "array", "minItems": 1, "maxItems": 2, "items": _obj(
        sku={"type": "string", "pattern": "^[a-z]{3}$"}, qty={"type": "integer", "minimum": 1, "maximum": 5})}),
    _obj(p={"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1}),
    _obj(code={"type": "string", "pattern": "^(ok|err)[0-9]$"}),
    _obj(pair={"type": "array", "prefixItems": [{"type": "boolean"}, {"enum": ["l", "r"]}], "items": False,
               "minItems": 2}),
    _obj(kind={"enum": ["order", "ticket"]}, ref={"anyOf": [
        {"type": "string", "pattern": "^O[0-9]{3}$"}, {"type": "integer", "minimum": 100, "maximum": 999}]}),
    _obj(m=_obj(k=_obj(z={"type": "boolean"}))),
    _obj(score={"type": "integer", "minimum": -10, "maximum": 10}, note={"type": "string", "maxLength": 6}),
    _obj(e={"type": "array", "items": {"type": "boolean"}, "maxItems": 0}),
    _obj(lang={"enum": ["en", "de", "fr", "zh"]}, conf={"type": "number", "minimum": 0, "maximum": 1}),
    _obj([], opt1={"type": "boolean"}, opt2={"type": "integer", "minimum": 0, "maximum": 1}),
    {"type": OBJ, "$defs": {"pt": _obj(x=INT09)},
     "properties": {"a": {"$ref": "#/$defs/pt"}, "b": {"$ref": "#/$defs/pt"}}, "required": ["a", "b"]},
    _obj(s={"type": "string", "pattern": "^[0-9]{2,3}$"}),
    # 26-: enums
    _obj(status={"enum": ["open", "closed", "pending", "escalated"]}, priority={"enum": ["low", "mid", "high"]}),
    _obj(city={"enum": ["München", "Zürich", "北京", "São Paulo"]}),
    _obj(v={"enum": ["x", 1, True, None]}),
    _obj(size={"anyOf": [{"const": "S"}, {"const": "M"}, {"const": "L"}]}),
    _obj(version={"const": 2}, mode={"enum": ["r", "w"]}),
    # nested objects
    _obj(customer=_obj(address=_obj(zip={"type": "string", "pattern": "^[0-9]{5}$"},
                                     country={"enum": ["DE", "FR", "US"]}))),
    _obj(a=_obj(b=_obj(c=_obj(d={"enum": [True]})))),
    _obj(order=_obj(["id"], id={"type": "string", "pattern": "^#[0-9]{4}$"}, gift={"type": "boolean"}),
         total={"type": "number", "minimum": 0, "maximum": 500}),
    # arrays with bounds
    _obj(codes={"type": "array", "items": {"type": "string", "pattern": "^[A-F0-9]{4}$"}, "minItems": 2,
                "maxItems": 3}),
    _obj(grid={"type": "array", "minItems": 2, "maxItems": 2, "items": {
        "type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 1}, "minItems": 2, "maxItems": 2}}),
    _obj(bits={"type": "array", "items": {"type": "boolean"}, "minItems": 3, "maxItems": 3}),
    _obj(lines={"type": "array", "minItems": 1, "maxItems": 3, "items": _obj(
        ["sku"], sku={"enum": ["kettle", "mug", "tea"]}, qty=INT09, note={"type": "string", "maxLength": 5})}),
    {"type": "array", "items": INT09, "minItems": 1, "maxItems": 3},  # a top-level array
    # patterns
    _obj(phone={"type": "string", "pattern": "^\\+49 [0-9]{3} [0-9]{4}$"}),
    _obj(domain={"type": "string", "pattern": "^[a-z]{2,8}\\.(com|de|org)$"}),
    _obj(ticket={"type": "string", "pattern": "^T-[0-9]{3}(-[A-Z])?$"}),
    _obj(word={"type": "string", "pattern": "^[^0-9 ]{1,6}$"}),
    # string lengths and formats
    _obj(s={"type": "string", "minLength": 2, "maxLength": 5}),
    _obj(day={"type": "string", "format": "date"}),
    _obj(at={"type": "string", "format": "time"}),
    _obj(when={"type": "string", "format": "date-time"}),
    _obj(ip={"type": "string", "format": "ipv4"}),
    _obj(mail={"type": "string", "format": "email"}),
    _obj(host={"type": "string", "format": "hostname"}),
    _obj(uid={"type": "string", "format": "uuid"}),
    # numbers with ranges
    _obj(k={"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 10}),
    _obj(t={"type": "integer", "minimum": -100, "maximum": -1}),
    _obj(price={"type": "number", "minimum": 0.5, "maximum": 99.5}),
    _obj(step={"type": "integer", "multipleOf": 5, "minimum": 0, "maximum": 50}),
    _obj(big={"type": "integer", "minimum": 1000, "maximum": 1000000}),
    # anyOf
    _obj(event={"anyOf": [_obj(kind={"const": "click"}, x=INT09),
                          _obj(kind={"const": "key"}, key={"type": "string", "pattern": "^[a-z]$"})]}),
    _obj(v={"type": ["integer", "null"], "minimum": 0, "maximum": 5}),
    _obj(id={"anyOf": [INT09, {"type": "string", "pattern": "^[a-z]{2}$"}, {"type": "boolean"}]}),
    # optional fields
    _obj(["name"], name={"type": "string", "maxLength": 10}, age={"type": "integer", "minimum": 0, "maximum": 120},
         vip={"type": "boolean"}, tier={"enum": ["gold", "silver"]}),
    {"type": OBJ, "properties": {"a": {"type": "boolean"}, "b": INT09}, "required": ["b"],
     "additionalProperties": False},
    # a flat form of everything
    _obj(["name", "subscribed"], name={"type": "string", "maxLength": 10}, subscribed={"type": "boolean"},
         score={"type": "number", "minimum": 0, "maximum": 1}, tier={"enum": ["free", "pro"]},
         tags={"type": "array", "items": {"enum": ["x", "y"]}, "maxItems": 2},
         note={"anyOf": [{"type": "string", "maxLength": 5}, {"type": "null"}]}),
]
PROMPTS = ["Extract the fields as JSON:", "你好, order 42 is late."]


def invalid(text: str, schema: dict[str, Any] | None) -> str | None:
    """None when text parses (and validates against schema, formats included), else why not."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        return f"does not parse ({e}): {text[:80]!r}"
    if schema is None:
        return None if isinstance(value, dict) else f"not an object: {text[:80]!r}"
    errors = [str(e) for e in jsonschema_rs.validator_for(schema, validate_formats=True).iter_errors(value)]
    return f"{errors[0]}: {text[:80]!r}" if errors else None
