"""Which JSON Schema keywords the grammar enforces, and the schema as the grammar is given it.

xgrammar compiles a schema into the grammar the answer is sampled under, but it skips some
keywords without a word (`uniqueItems`, `not`, `if`/`then`, `dependentRequired`, `multipleOf`
on numbers, unknown formats, lookaheads in a pattern...): an answer then parses and still breaks
the schema the client asked for. And its rule for a string with `minLength`/`maxLength` lets
raw control characters in, which no JSON parser accepts (a random GPT-OSS wrote `"\x04"`).
`for_grammar(schema)` refuses what would be ignored, naming the keyword and where it sits, and
spells string lengths as a pattern (xgrammar's patterns keep to JSON's characters). The sets
below were measured against xgrammar 0.2.9: for each keyword, a schema with it and an instance
that breaks only it; the grammar refused the instance (tests/test_structured_output.py keeps
that true).

    for_grammar({"type": "array", "uniqueItems": True})
    -> SchemaError: `uniqueItems` at /: not enforced by the grammar ...
"""

from __future__ import annotations

import re
from typing import Any

# Keywords the grammar enforces. `pattern` is matched against the whole string (as if it began
# with ^ and ended with $): stricter than JSON Schema's search, never looser.
ENFORCED = frozenset(
    {
        "type",
        "enum",
        "const",
        # strings
        "minLength",
        "maxLength",
        "pattern",
        "format",
        # numbers (multipleOf: integers only, checked below)
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum",
        "multipleOf",
        # arrays
        "items",
        "prefixItems",
        "minItems",
        "maxItems",
        # objects
        "properties",
        "required",
        "additionalProperties",
        "minProperties",
        "maxProperties",
        "propertyNames",
        # composition (oneOf: disjoint branches only, allOf: one branch; checked below)
        "anyOf",
        "oneOf",
        "allOf",
        "$ref",
        "$defs",
        "definitions",
    }
)

# Keywords that constrain nothing: documentation and identifiers. `discriminator` is
# OpenAPI's note beside a oneOf (pydantic writes it); the branches' consts do the work.
ANNOTATIONS = frozenset(
    {
        "title",
        "description",
        "default",
        "examples",
        "$schema",
        "$id",
        "$comment",
        "$anchor",
        "deprecated",
        "readOnly",
        "writeOnly",
        "discriminator",
    }
)

# String formats the grammar spells out; any other format would pass as a plain string.
FORMATS = frozenset(
    {
        "date",
        "time",
        "date-time",
        "duration",
        "email",
        "hostname",
        "ipv4",
        "ipv6",
        "uuid",
        "uri",
        "uri-reference",
        "uri-template",
        "json-pointer",
        "relative-json-pointer",
    }
)

# Formats spelled here as patterns: xgrammar's own rules let "2024-02-30" and "1.2.3.004" through.
_YEAR = "([0-9]{3}[1-9]|[0-9]{2}[1-9][0-9]|[0-9][1-9][0-9]{2}|[1-9][0-9]{3})"  # 0001-9999
_LEAP_YEAR = "([0-9]{2}(0[48]|[2468][048]|[13579][26])|([2468][048]|[13579][26]|0[48])00)"
_DATE = (
    f"({_YEAR}-((0[13578]|1[02])-(0[1-9]|[12][0-9]|3[01])|(0[469]|11)-(0[1-9]|[12][0-9]|30)"
    f"|02-(0[1-9]|1[0-9]|2[0-8]))|{_LEAP_YEAR}-02-29)"
)
_HOUR_MINUTE = "([01][0-9]|2[0-3]):[0-5][0-9]"
_TIME = f"{_HOUR_MINUTE}:([0-5][0-9]|60)(\\.[0-9]{{1,9}})?(Z|[+-]{_HOUR_MINUTE})"
_OCTET = "(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
FORMAT_PATTERNS = {
    "date": f"^{_DATE}$",
    "time": f"^{_TIME}$",
    "date-time": f"^{_DATE}T{_TIME}$",
    "ipv4": f"^{_OCTET}(\\.{_OCTET}){{3}}$",
}

# One character of a JSON string as UTF-8 text, written out as ranges: xgrammar's "." and
# negated classes take overlong encodings (E0 80 80) and its string rule takes encoded
# surrogates (ED A0 80). Neither is UTF-8: each decodes to several U+FFFD, so "x" under
# maxLength 1 became three characters. Quote, backslash and control characters are left out
# (a pattern in xgrammar never writes an escape).
TEXT_CHAR = "[ -!#-\\[\\]-\ud7ff\ue000-\U0010ffff]"

TYPES = frozenset({"string", "number", "integer", "boolean", "null", "array", "object"})

_SUBSCHEMA = ("items", "additionalProperties", "propertyNames")
_SUBSCHEMA_LISTS = ("prefixItems", "anyOf", "oneOf", "allOf")
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions")


class SchemaError(ValueError):
    """A schema the grammar cannot enforce; the message names the keyword and its place."""


def for_grammar(schema: Any) -> Any:
    """`schema` as the grammar is given it (a new object; string lengths spelled as patterns),
    or SchemaError for the first keyword the grammar would not enforce."""
    _check_shapes(schema, "")  # whole, first: the checks below look across branches and $refs
    return _prepare(schema, "", schema)


def _pointer(path: str) -> str:
    return path or "/"


def _refuse(keyword: str, path: str, why: str) -> SchemaError:
    return SchemaError(f"`{keyword}` at {_pointer(path)}: {why}")


_NOT_ENFORCED = (
    "not enforced by the grammar (see the README's structured output section); remove it and "
    "check it on the answer"
)
_LENGTHS = ("minLength", "maxLength")
# What may stand beside enum or const: the values are fixed, so other constraints would be
# ignored, not checked.
_BESIDE_ENUM = frozenset({"type", "enum", "const"}) | ANNOTATIONS


def _prepare(schema: Any, path: str, root: Any) -> Any:
    if isinstance(schema, bool):
        return schema
    if not isinstance(schema, dict):
        raise SchemaError(f"{_pointer(path)}: a schema must be an object or a boolean")
    for keyword in schema:
        if not keyword.startswith("x-") and keyword not in ENFORCED | ANNOTATIONS:
            raise _refuse(keyword, path, _NOT_ENFORCED)
    types = _types(schema)
    if "type" in schema and not types <= TYPES:
        raise _refuse("type", path, f"unknown type {sorted(types - TYPES)}")
    if "enum" in schema or "const" in schema:
        for keyword in schema:
            if not keyword.startswith("x-") and keyword not in _BESIDE_ENUM:
                raise _refuse(keyword, path, "beside enum or const it would not be checked")
    if "format" in schema and schema["format"] not in FORMATS:
        raise _refuse(
            "format",
            path,
            f"{schema['format']!r} is not one of the formats the grammar spells out "
            f"({', '.join(sorted(FORMATS))})",
        )
    if "pattern" in schema:
        _check_pattern(schema["pattern"], path)
    lengths = [k for k in _LENGTHS if k in schema]
    if lengths and types != {"string"}:
        raise _refuse(lengths[0], path, 'enforced on "type": "string" only')
    if lengths and ("pattern" in schema or "format" in schema):
        other = "pattern" if "pattern" in schema else "format"
        raise _refuse(lengths[0], path, f"not enforced beside {other}: put the length in a pattern")
    if "multipleOf" in schema:
        if types != {"integer"}:
            raise _refuse("multipleOf", path, 'enforced on "type": "integer" only')
        lower = "minimum" in schema or "exclusiveMinimum" in schema
        upper = "maximum" in schema or "exclusiveMaximum" in schema
        if lower != upper:
            raise _refuse("multipleOf", path, "enforced with both bounds or none, not one")
    if isinstance(schema.get("items"), list):
        raise _refuse("items", path, "a list of schemas is draft 7's tuple: use prefixItems")
    if len(schema.get("allOf", [])) > 1:
        raise _refuse("allOf", path, "enforced with one schema only")
    if "oneOf" in schema and not _disjoint(schema["oneOf"], root):
        raise _refuse(
            "oneOf",
            path,
            "enforced only when no answer can match two branches (different types, or a "
            "required property with a different const in each): use anyOf",
        )
    ref = schema.get("$ref")
    if ref is not None and not (isinstance(ref, str) and ref.startswith("#")):
        raise _refuse("$ref", path, "only references inside the schema (#/...) resolve")

    out = dict(schema)
    if schema.get("format") in FORMAT_PATTERNS:
        out["pattern"] = FORMAT_PATTERNS[out.pop("format")]
    if lengths:
        low, high = schema.get("minLength", 0), schema.get("maxLength")
        for keyword in _LENGTHS:
            out.pop(keyword, None)
        out["pattern"] = f"^{TEXT_CHAR}{{{low},{'' if high is None else high}}}$"
    if "pattern" in schema:
        out["pattern"] = _text_dots(schema["pattern"])
    for keyword in _SUBSCHEMA:
        if keyword in schema:
            out[keyword] = _prepare(schema[keyword], f"{path}/{keyword}", root)
    for keyword in _SUBSCHEMA_LISTS:
        if keyword in schema:
            out[keyword] = [
                _prepare(sub, f"{path}/{keyword}/{i}", root)
                for i, sub in enumerate(schema[keyword] or [])
            ]
    for keyword in _SUBSCHEMA_MAPS:
        if keyword in schema:
            out[keyword] = {
                name: _prepare(sub, f"{path}/{keyword}/{name}", root)
                for name, sub in (schema[keyword] or {}).items()
            }
    return out


def _check_shapes(schema: Any, path: str) -> None:
    """The containers the checks below walk are what JSON Schema says they are, all the way
    down (a list where a dict was looked up was a 500, not a 400)."""
    if not isinstance(schema, dict):
        return  # a boolean schema, or not a schema: _prepare names the latter
    for keyword in _SUBSCHEMA_MAPS:
        if keyword in schema and not isinstance(schema[keyword], dict):
            raise _refuse(keyword, path, "must be an object of schemas")
    for keyword in (*_SUBSCHEMA_LISTS, "enum"):
        if keyword in schema and not isinstance(schema[keyword], list):
            raise _refuse(keyword, path, "must be a list")
    required = schema.get("required", [])
    if not isinstance(required, list) or not all(isinstance(n, str) for n in required):
        raise _refuse("required", path, "must be a list of property names")
    kind = schema.get("type", "string")
    if not isinstance(kind, str) and not (
        isinstance(kind, list) and all(isinstance(k, str) for k in kind)
    ):
        raise _refuse("type", path, "must be a type name or a list of them")
    for keyword in _SUBSCHEMA:
        if keyword in schema:
            _check_shapes(schema[keyword], f"{path}/{keyword}")
    for keyword in _SUBSCHEMA_LISTS:
        for i, sub in enumerate(schema.get(keyword, [])):
            _check_shapes(sub, f"{path}/{keyword}/{i}")
    for keyword in _SUBSCHEMA_MAPS:
        for name, sub in schema.get(keyword, {}).items():
            _check_shapes(sub, f"{path}/{keyword}/{name}")


# Regex constructs xgrammar ignores or refuses: lookaround, backreferences, word boundaries,
# Unicode properties, group flags.
_UNSUPPORTED_REGEX = re.compile(r"\\[bBpPk1-9]|\(\?(?!:)")
# Escapes that name a control character: the grammar would write it raw, which JSON forbids.
_CONTROL_ESCAPE = re.compile(r"\\([tnrfv0c]|x[01][0-9a-fA-F]|u00[01][0-9a-fA-F])")


def _text_dots(pattern: str) -> str:
    """`pattern` with each "." outside a character class spelled as TEXT_CHAR."""
    return re.sub(
        r"\\.|\[(?:\\.|[^\]])*\]|\.",
        lambda m: TEXT_CHAR if m.group() == "." else m.group(),
        pattern,
    )


def _check_pattern(pattern: Any, path: str) -> None:
    if not isinstance(pattern, str):
        raise _refuse("pattern", path, "must be a string")
    if _UNSUPPORTED_REGEX.search(pattern):
        raise _refuse(
            "pattern",
            path,
            "lookaround, backreferences, \\b and \\p are not enforced by the grammar",
        )
    if _CONTROL_ESCAPE.search(pattern) or any(c < " " for c in pattern):
        raise _refuse("pattern", path, "names a control character, which JSON strings cannot hold")
    # Anchors anywhere but the two ends (e.g. "^a$|^b$") are ignored by the grammar.
    body = re.sub(r"\\.|\[(?:\\.|[^\]])*\]", "x", pattern)
    if "^" in body[1:] or "$" in body[:-1]:
        raise _refuse("pattern", path, "^ and $ are enforced only at the pattern's two ends")


def _types(schema: dict[str, Any]) -> set[str]:
    kind = schema.get("type")
    if kind is None:
        return set()
    return set(kind) if isinstance(kind, list) else {kind}


def _resolve(schema: Any, root: Any) -> Any:
    """A local $ref followed (one level; a chain is followed by the caller's recursion)."""
    for _ in range(16):
        if not isinstance(schema, dict) or not isinstance(schema.get("$ref"), str):
            return schema
        node = root
        for part in schema["$ref"].lstrip("#").strip("/").split("/"):
            if not part:
                continue
            if not isinstance(node, dict):
                return {}  # points into something that is not a schema: xgrammar names it
            node = node.get(part.replace("~1", "/").replace("~0", "~"), {})
        schema = node
    return schema


def _value_types(schema: dict[str, Any]) -> set[str] | None:
    """The JSON types an instance of `schema` can have (None: any)."""
    if "const" in schema:
        return {_json_type(schema["const"])}
    if "enum" in schema:
        return {_json_type(v) for v in schema["enum"]}
    types = _types(schema)
    if "integer" in types:
        types.add("number")  # 1 is an integer and a number
    return types or None


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _tags(schema: dict[str, Any], root: Any) -> dict[str, set[str]]:
    """Required properties whose value is fixed (const or enum of strings) -> the values."""
    out: dict[str, set[str]] = {}
    for name in schema.get("required", []):
        prop = _resolve((schema.get("properties") or {}).get(name), root)
        if isinstance(prop, dict) and "const" in prop:
            out[name] = {repr(prop["const"])}
        elif isinstance(prop, dict) and "enum" in prop:
            out[name] = {repr(v) for v in prop["enum"]}
    return out


def _disjoint(branches: list[Any], root: Any) -> bool:
    """Whether no instance can match two of `branches` (what oneOf needs, as the grammar
    enforces it as anyOf)."""
    resolved = [_resolve(b, root) for b in branches]
    if not all(isinstance(b, dict) for b in resolved):
        return False
    for i, a in enumerate(resolved):
        for b in resolved[i + 1 :]:
            types_a, types_b = _value_types(a), _value_types(b)
            if types_a is not None and types_b is not None and not types_a & types_b:
                continue
            tags_a, tags_b = _tags(a, root), _tags(b, root)
            if any(not tags_a[k] & tags_b[k] for k in tags_a.keys() & tags_b.keys()):
                continue
            return False
    return True
