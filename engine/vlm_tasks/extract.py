"""Document field extraction: a JSON Schema names the fields; the answer is constrained to it, always parses and
validates, and each top-level property becomes a typed column."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pyarrow as pa

from engine.constrained import Grammar
from engine.settings import Settings
from engine.vlm import VLMOutput
from engine.vlm_tasks import TaskError, VLMTask

PROMPT = (
    "Extract the fields described by this JSON Schema from the document in the image. Answer with one JSON object "
    "that matches the schema; copy values exactly as written in the document.\n\nSchema:\n{schema}"
)
MAX_PROPERTIES = 256  # beyond this the prompt alone outgrows a useful context; split the schema instead
RESERVED = {"error", "model", "num_output_tokens", "reasoning", "fields", "id", "image", "image_bytes"}
SCALARS = {"string": pa.string(), "integer": pa.int64(), "number": pa.float64(), "boolean": pa.bool_()}
# Bounds the decoder adds where the user's schema has none: without them a weak model can emit digits or
# characters until the token budget ends and the JSON never closes. Answers are validated against the original.
DECODING_BOUNDS = {"number": 1e15, "string_length": 512, "array_items": 64}


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


def decoding_schema(node: Any) -> Any:
    """A copy of `node` with every unbounded number, string and array given the DECODING_BOUNDS."""
    if isinstance(node, list):
        return [decoding_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    bounded = {key: decoding_schema(value) for key, value in node.items()}
    kind = node.get("type")
    if kind in ("number", "integer"):
        limit = DECODING_BOUNDS["number"] if kind == "number" else int(DECODING_BOUNDS["number"])
        bounded.setdefault("minimum", -limit)
        bounded.setdefault("maximum", limit)
    elif kind == "string" and not {"enum", "const", "format", "pattern"} & set(node):
        bounded.setdefault("maxLength", DECODING_BOUNDS["string_length"])
    elif kind == "array":
        bounded.setdefault("maxItems", DECODING_BOUNDS["array_items"])
    return bounded


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
        from engine.constrained import GrammarError

        self.schema = schema
        self.validator = jsonschema.validators.validator_for(schema)(schema)
        self.grammar = Grammar("json_schema", json.dumps(decoding_schema(schema)))
        try:
            self.grammar.parsed()
        except GrammarError as err:
            raise TaskError(str(err)) from None
        self.instruction = (settings.extract_prompt or PROMPT).replace("{schema}", json.dumps(schema, indent=1))
        self.properties = schema["properties"]
        self.columns = pa.schema(
            [("fields", pa.string())] + [(name, column_type(p)) for name, p in self.properties.items()]
        )

    def parse(self, output: VLMOutput) -> dict:
        try:
            # strict=False: xgrammar 0.2.8 admits raw control characters in strings bounded by maxLength; they are
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
