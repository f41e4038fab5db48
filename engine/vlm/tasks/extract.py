"""Document field extraction: a JSON Schema names the fields; the answer is constrained to it, always parses and
validates, and each top-level property becomes a typed column."""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path
from re import _parser as regex_parser  # the standard parser's getwidth() bounds a pattern's length; no public API does
from typing import Any

import jsonschema
import pyarrow as pa

from engine.settings import Settings
from engine.vlm.chat import VLMOutput
from engine.vlm.constrained import Grammar
from engine.vlm.tasks.base import RowRequest, TaskError, VLMTask

PROMPT = (
    "Extract the fields described by this JSON Schema from the document in the image. Answer with one JSON object "
    "that matches the schema; copy values exactly as written in the document.\n\nSchema:\n{schema}"
)
MAX_PROPERTIES = 256  # beyond this the prompt alone outgrows a useful context; split the schema instead
RESERVED = {"error", "model", "num_output_tokens", "reasoning", "fields", "id", "image", "image_bytes", "video", "page"}
SCALARS = {"string": pa.string(), "integer": pa.int64(), "number": pa.float64(), "boolean": pa.bool_()}

# JSON Schema keywords the constrained decoder (xgrammar) silently ignores: a schema using them would yield answers
# that fail validation, so it is refused up front with the keyword and where it is.
UNSUPPORTED_KEYWORDS = frozenset({
    "not", "if", "then", "else", "allOf", "dependentRequired", "dependentSchemas", "dependencies", "uniqueItems",
    "multipleOf", "contains", "minContains", "maxContains", "patternProperties", "propertyNames",
    "unevaluatedProperties", "unevaluatedItems", "$dynamicRef", "$recursiveRef",
})  # fmt: skip
SUBSCHEMA_MAPS = ("properties", "$defs", "definitions")  # keyword -> {name: schema}
SUBSCHEMA_LISTS = ("anyOf", "oneOf", "prefixItems")  # keyword -> [schema, ...]
SUBSCHEMA = ("items", "additionalProperties")  # keyword -> schema

# What the constrained decoder emits, measured on xgrammar 0.2.9 (tests/engine/test_extract.py checks the installed
# version), so the longest answer a bounded schema admits can be counted in bytes. A token the decoder lets through
# spells at least one byte (special tokens are allowed only as the stop token), so an answer of N bytes takes at most
# N tokens however the model splits it: one token per byte is the sound worst case of a byte-level tokenizer.
SEPARATORS = (",", ":")  # compact: each byte of punctuation is a token the budget pays for
CHAR_BYTES = 4  # a character of a maxLength string: any code point but '"', '\\', CR and LF, raw UTF-8, no escapes
PATTERN_CHAR_BYTES = 6  # a character a 'pattern' matches may be written as a JSON escape such as \u0000
FRACTION_DIGITS = 6  # a number with both bounds: at most 6 digits after the point, and no exponent
MAX_NUMBER_DIGITS = 15  # digits before the point given to a number without bounds: a float's precision
# The formats whose grammar has a longest answer; the others admit strings of any length and ignore maxLength.
FORMAT_LENGTHS = {"date": 10, "ipv4": 15, "uuid": 36}


def unsupported_keywords(node: Any, where: str = "#") -> list[str]:
    """Where `node` (a schema) uses a keyword the decoder cannot enforce, e.g. "'not' at #/properties/total"."""
    if not isinstance(node, dict):
        return []
    found = [f"{key!r} at {where}" for key in node if key in UNSUPPORTED_KEYWORDS]
    ref = node.get("$ref")
    if isinstance(ref, str) and not ref.startswith("#"):
        found.append(f"the non-local '$ref' {ref!r} at {where} (only '#/...' references; nothing is fetched)")
    for key in SUBSCHEMA_MAPS:
        for name, child in (node.get(key) or {}).items() if isinstance(node.get(key), dict) else ():
            found += unsupported_keywords(child, f"{where}/{key}/{name}")
    for key in SUBSCHEMA_LISTS:
        for i, child in enumerate(node.get(key) or []) if isinstance(node.get(key), list) else ():
            found += unsupported_keywords(child, f"{where}/{key}/{i}")
    for key in SUBSCHEMA:
        found += unsupported_keywords(node.get(key), f"{where}/{key}")
    return found


def bounded_copy(node: Any, level: int) -> Any:
    """A copy of the schema `node` where every string without maxLength gets `level` characters, every array
    without maxItems √`level` items, each missing number bound 10^digits - 1 away (`level` digits, 1 to 15), and
    every object no properties beyond its own."""
    if not isinstance(node, dict):
        return node
    bounded = dict(node)
    for key in SUBSCHEMA_MAPS:
        if isinstance(node.get(key), dict):
            bounded[key] = {name: bounded_copy(child, level) for name, child in node[key].items()}
    for key in SUBSCHEMA_LISTS:
        if isinstance(node.get(key), list):
            bounded[key] = [bounded_copy(child, level) for child in node[key]]
    for key in SUBSCHEMA:
        if key in node:
            bounded[key] = bounded_copy(node[key], level)
    kinds = node.get("type") if isinstance(node.get("type"), list) else [node.get("type")]
    if "string" in kinds and not {"format", "pattern"} & set(node):  # xgrammar ignores maxLength beside those
        bounded.setdefault("maxLength", max(level, node.get("minLength", 0)))
    if "array" in kinds:  # √level items: a list neither crowds out the other fields nor shrinks to one item
        bounded.setdefault("maxItems", max(math.isqrt(level), node.get("minItems", 0)))
    if "number" in kinds or "integer" in kinds:
        # Both ends, or xgrammar admits any number of digits; the missing end lies `limit` beyond zero or the given end.
        limit = 10 ** min(max(level, 1), MAX_NUMBER_DIGITS) - 1
        lows, highs = number_ends(node)
        if not lows:
            bounded["minimum"] = min(highs + [0]) - limit
        if not highs:
            bounded["maximum"] = max(lows + [0]) + limit
    if "object" in kinds and isinstance(node.get("properties"), dict):
        bounded["additionalProperties"] = False  # extra keys are never columns, and a key of any length has no bound
    return bounded


def number_ends(node: dict[str, Any]) -> tuple[list[float], list[float]]:
    """The lower and the upper bounds of a number schema, inclusive or exclusive (draft 4's boolean flags aside)."""
    def ends(*keys: str) -> list[float]:
        return [node[k] for k in keys if isinstance(node.get(k), (int, float)) and not isinstance(node.get(k), bool)]

    return ends("minimum", "exclusiveMinimum"), ends("maximum", "exclusiveMaximum")


def literal_bytes(value: Any) -> int:
    """The longest way the decoder may write the JSON literal `value` (an enum or const member or a key), in bytes."""
    if isinstance(value, dict):
        members = [literal_bytes(key) + 2 + literal_bytes(item) for key, item in value.items()]
        return 2 + sum(members) + 2 * max(len(members) - 1, 0)  # ", " and ": ", the widest separators
    if isinstance(value, list):
        return 2 + sum(map(literal_bytes, value)) + 2 * max(len(value) - 1, 0)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        # xgrammar writes numbers as doubles: 123456789012345678901234567890 becomes 1.2345678901234568e+29
        as_double = len(repr(float(value))) if abs(value) <= sys.float_info.max else 0
        return max(len(json.dumps(value)), as_double)
    return max(len(json.dumps(value, ensure_ascii=ascii).encode()) for ascii in (True, False))  # "\u00e9" or "é"


def resolve(root: dict[str, Any], ref: str, where: str) -> Any:
    """The subschema of `root` at the local reference `ref` ("#/$defs/item")."""
    node: Any = root
    try:
        for part in ref.removeprefix("#").split("/")[1:]:
            part = part.replace("~1", "/").replace("~0", "~")
            node = node[int(part)] if isinstance(node, list) else node[part]
    except (KeyError, IndexError, ValueError, TypeError):
        raise TaskError(f"the '$ref' {ref!r} at {where} points at nothing in the schema") from None
    return node


def upper_bound(node: dict[str, Any], key: str, where: str) -> int:
    """The bound `key` (maxLength, maxItems) of `node`, which a bounded schema always has."""
    if not isinstance(node.get(key), int):
        raise TaskError(f"the schema at {where} has no {key}: its answer has no longest form")
    return node[key]


def answer_bytes(node: Any, root: dict[str, Any], where: str = "#", refs: tuple[str, ...] = ()) -> int:
    """The longest answer the decoder admits for the bounded schema `node` (inside `root`), in bytes; TaskError where
    a part of it can grow without end."""
    if node is False:
        return 0
    if not isinstance(node, dict):
        raise TaskError(f"the schema at {where} admits any value: its answer has no longest form")
    # $ref, anyOf/oneOf and enum/const each replace the node's other keywords in xgrammar's grammar (measured).
    options = []
    if isinstance(node.get("$ref"), str):
        ref = node["$ref"]
        if ref in refs:
            raise TaskError(f"the recursive '$ref' {ref!r} at {where}: its answer has no longest form")
        options.append(answer_bytes(resolve(root, ref, where), root, ref, refs + (ref,)))
    for key in ("anyOf", "oneOf"):
        for i, child in enumerate(node.get(key) or []):
            options.append(answer_bytes(child, root, f"{where}/{key}/{i}", refs))
    if "const" in node:
        options.append(literal_bytes(node["const"]))
    options += [literal_bytes(value) for value in node.get("enum") or []]
    if options:
        return max(options)
    kinds = node.get("type") if isinstance(node.get("type"), list) else [node.get("type")]
    return max(kind_bytes(node, kind, root, where, refs) for kind in kinds)


def kind_bytes(node: dict[str, Any], kind: str | None, root: dict[str, Any], where: str, refs: tuple[str, ...]) -> int:
    """The longest answer of `node` read as one JSON type `kind`, in bytes."""
    if kind == "null":
        return len("null")
    if kind == "boolean":
        return len("false")
    if kind in ("number", "integer"):
        lows, highs = number_ends(node)
        if not lows or not highs:
            raise TaskError(f"the number at {where} lacks a minimum or a maximum: its digits have no bound")
        digits = max(len(str(int(abs(end)))) for end in lows + highs)
        fraction = 1 + FRACTION_DIGITS if kind == "number" else 0
        return int(min(lows) < 0) + digits + fraction
    if kind == "string":
        return 2 + string_length_bytes(node, where)
    if kind == "array":
        return array_bytes(node, root, where, refs)
    if kind == "object":
        return object_bytes(node, root, where, refs)
    raise TaskError(f"the schema at {where} admits a value of any type: its answer has no longest form")


def string_length_bytes(node: dict[str, Any], where: str) -> int:
    """The longest content of the string schema `node` (within its quotes), in bytes."""
    if "format" in node:
        if node["format"] not in FORMAT_LENGTHS:
            raise TaskError(f"'format': {node['format']!r} at {where} admits strings of any length (the decoder "
                            "ignores maxLength beside it); drop it and set maxLength, or use a bounded 'pattern'")
        return FORMAT_LENGTHS[node["format"]]
    if "pattern" in node:
        try:
            _, width = regex_parser.parse(node["pattern"]).getwidth()
        except re.error as err:
            raise TaskError(f"the 'pattern' at {where} is not a regular expression: {err}") from None
        if width >= regex_parser.MAXREPEAT:
            raise TaskError(f"the 'pattern' at {where} matches strings of any length; bound its repetitions, "
                            "e.g. {1,40} instead of +")
        return PATTERN_CHAR_BYTES * width
    return CHAR_BYTES * upper_bound(node, "maxLength", where)


def array_bytes(node: dict[str, Any], root: dict[str, Any], where: str, refs: tuple[str, ...]) -> int:
    """The longest answer of the array schema `node`: its prefix items, then `items` up to maxItems, in bytes."""
    prefix = node.get("prefixItems") or []
    sizes = [answer_bytes(child, root, f"{where}/prefixItems/{i}", refs) for i, child in enumerate(prefix)]
    items = node.get("items")
    if isinstance(items, dict):
        more = upper_bound(node, "maxItems", where) - len(prefix)
        sizes += [answer_bytes(items, root, f"{where}/items", refs)] * max(more, 0)
    elif items is not False and not prefix:  # with prefixItems, xgrammar admits nothing after them (measured)
        raise TaskError(f"the array at {where} has no 'items' schema: its items admit any value")
    return 2 + sum(sizes) + len(SEPARATORS[0]) * max(len(sizes) - 1, 0)


def object_bytes(node: dict[str, Any], root: dict[str, Any], where: str, refs: tuple[str, ...]) -> int:
    """The longest answer of the object schema `node`, optional properties included, in bytes."""
    properties = node.get("properties")
    if not isinstance(properties, dict) or not properties or node.get("additionalProperties", False) is not False:
        raise TaskError(f"the object at {where} admits keys beyond its 'properties': its answer has no longest form")
    members = [
        literal_bytes(name) + len(SEPARATORS[1]) + answer_bytes(child, root, f"{where}/properties/{name}", refs)
        for name, child in properties.items()
    ]
    return 2 + sum(members) + len(SEPARATORS[0]) * (len(members) - 1)


def decoding_schema(schema: dict[str, Any], max_tokens: int) -> dict[str, Any]:
    """The copy of `schema` the decoder enforces: bounded at the highest level whose longest answer fits in
    `max_tokens` tokens, so every answer closes its JSON; TaskError when even the shortest bounds do not fit."""
    shortest = bounded_copy(schema, 0)
    needed = answer_bytes(shortest, shortest)
    if needed > max_tokens:
        raise TaskError(
            f"the schema needs up to {needed} tokens for its keys, punctuation and bounded values alone, with every "
            f"unbounded string and array empty; raise vlm_max_new_tokens ({max_tokens}) to at least {needed}, "
            "more to leave room for the values, or split the schema"
        )
    # The longest answer grows with the level. Above max_tokens² no unbounded string (4 bytes a level) or array
    # (√level items) fits any more, so the highest level that fits lies in 0..max_tokens².
    low, high = 0, max_tokens**2
    while low < high:
        level = (low + high + 1) // 2
        bounded = bounded_copy(schema, level)
        low, high = (level, high) if answer_bytes(bounded, bounded) <= max_tokens else (low, level - 1)
    return bounded_copy(schema, low)


def answer_grammar(schema: dict[str, Any]) -> Grammar:
    """The grammar of answers to the bounded `schema`, as EBNF: xgrammar writes it with SEPARATORS, the punctuation
    answer_bytes counts, where a json_schema Grammar would put a space after each comma and colon."""
    import xgrammar as xgr

    try:
        converted = xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False, separators=SEPARATORS)
    except Exception as err:  # xgrammar raises RuntimeError with the converter's message for what it cannot enforce
        raise TaskError(f"the constrained decoder cannot enforce this schema: {err}") from None
    return Grammar("ebnf", str(converted))


def load_schema(path: str | Path) -> dict[str, Any]:
    """Read and check a schema file: valid JSON, a valid JSON Schema, an object with properties we can enforce."""
    try:
        schema = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError) as err:
        raise TaskError(f"{path}: cannot read the schema ({err})") from None
    except json.JSONDecodeError as err:
        raise TaskError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as err:
        raise TaskError(f"{path}: not a valid JSON Schema: {err.message}") from None
    properties = schema.get("properties") if isinstance(schema, dict) else None
    if schema.get("type") != "object" or not isinstance(properties, dict) or not properties:
        raise TaskError(f"{path}: the schema must be an object with at least one property")
    unsupported = unsupported_keywords(schema)
    if unsupported:
        raise TaskError(f"{path}: the constrained decoder cannot enforce {'; '.join(unsupported)}")
    if len(properties) > MAX_PROPERTIES:
        raise TaskError(f"{path}: {len(properties)} properties; at most {MAX_PROPERTIES} are supported per pass")
    clashes = sorted(set(properties) & RESERVED)
    if clashes:
        raise TaskError(f"{path}: property names {clashes} clash with output columns of every pass")
    return schema


def column_type(prop: dict[str, Any]) -> pa.DataType:
    """The Arrow type of a property's column; anything not a scalar or a list of scalars is kept as JSON text."""
    kind = prop.get("type")
    if kind in SCALARS:
        return SCALARS[kind]
    if kind == "array" and isinstance(prop.get("items"), dict) and prop["items"].get("type") in SCALARS:
        return pa.list_(SCALARS[prop["items"]["type"]])
    return pa.string()


class ExtractTask(VLMTask):
    name = "extract"

    def __init__(self, settings: Settings, schema: dict[str, Any]):
        from engine.vlm.constrained import GrammarError

        self.schema = schema
        self.validator = jsonschema.validators.validator_for(schema)(schema)
        self.answer_grammar = answer_grammar(decoding_schema(schema, settings.vlm_max_new_tokens))
        try:
            self.answer_grammar.parsed()
        except GrammarError as err:
            raise TaskError(str(err)) from None
        self.prompt = (settings.extract_prompt or PROMPT).replace("{schema}", json.dumps(schema, indent=1))
        self.properties = schema["properties"]
        self.columns = pa.schema(
            [("fields", pa.string())] + [(name, column_type(p)) for name, p in self.properties.items()]
        )

    def grammar(self, request: RowRequest) -> Grammar:
        return self.answer_grammar

    def parse(self, output: VLMOutput, request: RowRequest) -> dict:
        try:
            # strict=False: xgrammar admits raw control characters in strings bounded by maxLength; they are
            # content, and json.dumps below writes them escaped, so `fields` is always strict JSON.
            value = json.loads(output.answer, strict=False)
        except json.JSONDecodeError:
            raise ValueError("the answer is not complete JSON; raise vlm_max_new_tokens") from None
        errors = sorted(self.validator.iter_errors(value), key=lambda e: list(e.path))
        if errors:
            raise ValueError(f"the answer does not match the schema: {errors[0].message}")
        row = {"fields": json.dumps(value, ensure_ascii=False)}
        for name, prop in self.properties.items():
            item, kind = value.get(name), column_type(prop)
            if kind == pa.string() and item is not None and not isinstance(item, str):
                item = json.dumps(item, ensure_ascii=False)  # objects and mixed arrays stay JSON text
            row[name] = pa.array([item], kind)[0].as_py()  # e.g. a JSON 49 in a number column becomes 49.0
        return row
