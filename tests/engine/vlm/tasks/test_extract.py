"""Extraction's decoding schema: its longest answer fits the token budget by construction, measured against xgrammar
with the tiny VLM's tokenizer, and every answer of the tiny VLM parses and validates on document-like images."""

from __future__ import annotations

import io
import json
import random

import jsonschema
import numpy as np
import pytest
import torch
import xgrammar as xgr
from PIL import Image, ImageDraw, ImageFilter

from engine.media.images import decode_image
from engine.settings import load_settings
from engine.vlm.constrained import GrammarCompiler
from engine.vlm.model import VLM
from engine.vlm.tasks import make_task
from engine.vlm.tasks.base import RowRequest, TaskError
from engine.vlm.tasks.extract import answer_bytes, answer_grammar, decoding_schema

BUDGET = load_settings("tiny").vlm_max_new_tokens  # the tiny preset's answer budget, 128 tokens
RECEIPT_FIELDS = ("vendor", "date", "total", "tax", "currency", "address", "phone", "cashier")


def strings(names) -> dict:
    """An object of unbounded, required string properties."""
    return {"type": "object", "properties": {n: {"type": "string"} for n in names}, "required": list(names)}


FLAT = {
    8: strings(RECEIPT_FIELDS),
    12: strings([f"k{i}" for i in range(12)]),
    16: strings("abcdefghijklmnop"),  # one-letter keys: 16 fields leave 15 bytes of 128 for values
}
NESTED = {
    "$defs": {"money": {"type": "number"}},
    "type": "object",
    "properties": {
        "vendor": {"type": "object", "properties": {"name": {"type": "string"}, "city": {"type": "string"}},
                   "required": ["name"]},
        "items": {"type": "array", "items": {"type": "object", "properties": {
            "name": {"type": "string"}, "qty": {"type": "integer"}, "price": {"$ref": "#/$defs/money"}}}},
        "total": {"$ref": "#/$defs/money"},
        "paid": {"type": "boolean"},
        "note": {"anyOf": [{"type": "string"}, {"type": "null"}]},
    },
    "required": ["vendor", "total"],
}  # fmt: skip
SCHEMAS = [(FLAT[8], BUDGET), (FLAT[12], BUDGET), (FLAT[16], BUDGET), (NESTED, BUDGET), (NESTED, 512)]
SCHEMA_IDS = ["8-strings", "12-strings", "16-strings", "nested", "nested-512"]


@pytest.fixture(scope="module")
def compiler(info) -> xgr.GrammarCompiler:
    return xgr.GrammarCompiler(info)


@pytest.fixture(scope="module")
def byte_tokens(info) -> dict[int, int]:
    """The token that spells each single byte: the longest way a model can write an answer."""
    return {token[0]: i for i, token in enumerate(info.decoded_vocab) if len(token) == 1}


def receipt(size: tuple[int, int], lines: int, noise: float = 0.0) -> Image.Image:
    """A white receipt of printed lines; with `noise`, blurred and grainy, as a phone photo of one."""
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    step = size[1] // (lines + 2)
    text = ["STORE 17  Main Street", "2024-03-15 12:41", "2 x Coffee      3.50", "1 x Bagel       2.25",
            "TAX 8%          0.46", "TOTAL           9.71", "CASH           10.00", "Thank you!"]  # fmt: skip
    for i in range(lines):
        draw.text((size[0] // 10, step * (i + 1)), text[i % len(text)], fill="black", font_size=max(10, step // 2))
    if noise:  # a soft lens, then sensor grain
        speckle = np.random.default_rng(0).normal(0, noise, (size[1], size[0], 3))
        blurred = np.asarray(image.filter(ImageFilter.GaussianBlur(1)), dtype=np.float64)
        image = Image.fromarray((blurred + speckle).clip(0, 255).astype(np.uint8))
    return image


@pytest.fixture(scope="module")
def documents() -> list[Image.Image]:
    """Receipts of a few sizes, a noisy photo of one, and that photo as a 1-3 MB JPEG decoded as a pass decodes it."""
    photo = receipt((1200, 1600), 12, noise=30.0)
    encoded = io.BytesIO()
    photo.save(encoded, "JPEG", quality=95)
    assert 1_000_000 <= len(encoded.getvalue()) <= 3_000_000
    jpeg = decode_image(encoded.getvalue(), name="photo.jpg")
    return [receipt((240, 400), 6), receipt((600, 900), 8), receipt((900, 300), 3), photo, jpeg]


def longest_answer(node: dict, root: dict) -> str:
    """The longest answer a bounded schema admits, written out: every string at maxLength in 4-byte characters,
    every number at its most digits with a 6-digit fraction, every array full, every optional property present."""
    if "$ref" in node:
        return longest_answer(root["$defs"][node["$ref"].rsplit("/", 1)[1]], root)
    if "anyOf" in node:
        return max((longest_answer(b, root) for b in node["anyOf"]), key=lambda s: len(s.encode()))
    kind = node["type"]
    if kind == "string":
        return json.dumps("\U0001f9fe" * node["maxLength"], ensure_ascii=False)  # a receipt emoji: 4 UTF-8 bytes
    if kind in ("number", "integer"):
        assert node["minimum"] == -node["maximum"] and str(node["maximum"]).strip("9") == ""  # ±(10^k - 1)
        whole = "-" + str(node["maximum"] - 1)  # the lowest value with as many digits as the bound, 10^k - 2
        return whole + ".999999" if kind == "number" else whole
    if kind == "boolean":
        return "false"
    if kind == "null":
        return "null"
    if kind == "array":
        return "[" + ",".join([longest_answer(node["items"], root)] * node["maxItems"]) + "]"
    members = [f"{json.dumps(k)}:{longest_answer(child, root)}" for k, child in node["properties"].items()]
    return "{" + ",".join(members) + "}"


def matcher(compiler, schema: dict) -> xgr.GrammarMatcher:
    return xgr.GrammarMatcher(compiler.compile_grammar(answer_grammar(schema).parsed()))


def requests(images: list[Image.Image]) -> list[RowRequest]:
    return [RowRequest(image.width, image.height) for image in images]


def answer_rows(vlm: VLM, task, images: list[Image.Image]) -> list[dict]:
    """The task's rows for `images`, each row asked and constrained as a pass does it: its instruction, its grammar."""
    rows = requests(images)
    compiler = GrammarCompiler(vlm.processor.tokenizer, vlm.vocab_size)
    grammars = compiler.processor_factory([task.grammar(r) for r in rows])
    outputs = vlm.generate(images, [task.instruction(r) for r in rows], grammars)
    # parse raises ValueError for an answer that is not complete, valid JSON
    return [task.parse(output, row) for output, row in zip(outputs, rows, strict=True)]


@pytest.mark.parametrize("schema, budget", SCHEMAS, ids=SCHEMA_IDS)
def test_the_longest_answer_one_byte_per_token_is_admitted_and_fits_the_budget(info, compiler, byte_tokens, schema,
                                                                              budget):  # fmt: skip
    bounded = decoding_schema(schema, budget)
    answer = longest_answer(bounded, bounded)
    tokens = [byte_tokens[b] for b in answer.encode()]
    m = matcher(compiler, bounded)
    assert all(m.accept_token(t) for t in tokens) and m.accept_token(info.stop_token_ids[0])
    assert m.is_terminated()  # the grammar admits this answer token by token, and then only the stop token
    assert len(tokens) == answer_bytes(bounded, bounded) <= budget  # the count is exact, not only an upper bound
    jsonschema.validate(json.loads(answer), schema)


# Bytes that end a value rank after content: a ',' goes on to another item or property, a '"' opens a key (or ends
# a string when nothing else is allowed), ']' and '}' close.
CONTINUE_FIRST = {ord(","): 1, ord('"'): 2, ord("]"): 3, ord("}"): 3}


def adversarial_walk(info, compiled, byte_tokens: dict[int, int], rng: random.Random, limit: int) -> bytes | None:
    """An answer the grammar admits, made to be long: one-byte tokens in CONTINUE_FIRST's order, often the highest
    costly byte allowed (a 4-byte UTF-8 lead, a '9'), never the stop token while it may go on. None if it is still
    open after `limit` tokens."""
    m, spelled = xgr.GrammarMatcher(compiled), b""
    bitmask = xgr.allocate_token_bitmask(1, info.vocab_size)
    stop = info.stop_token_ids[0]
    for _ in range(limit):
        m.fill_next_token_bitmask(bitmask)
        logits = torch.zeros(1, info.vocab_size)
        xgr.apply_token_bitmask_inplace(logits, bitmask)
        allowed = set(torch.nonzero(logits[0] == 0).flatten().tolist()) - {stop}
        if not allowed:
            assert m.accept_token(stop)
            return spelled
        single = [(byte, t) for byte, t in sorted(byte_tokens.items()) if t in allowed]
        ranked = [(CONTINUE_FIRST.get(byte, 0), t) for byte, t in single]
        preferred = [t for rank, t in ranked if rank == min(ranked)[0]]
        costly = [t for byte, t in single if t in preferred and (byte >= 0x80 or chr(byte).isdigit())]
        pick = rng.random()
        token = costly[-1] if costly and pick < 0.6 else rng.choice(preferred) if preferred and pick < 0.95 \
            else rng.choice(sorted(allowed))  # fmt: skip
        assert m.accept_token(token)
        spelled += info.decoded_vocab[token]
    return None


@pytest.mark.parametrize("schema, budget", SCHEMAS, ids=SCHEMA_IDS)
def test_an_adversary_walking_the_grammar_always_closes_the_json_within_the_budget(info, compiler, byte_tokens,
                                                                                   schema, budget):  # fmt: skip
    bounded = decoding_schema(schema, budget)
    compiled = compiler.compile_grammar(answer_grammar(bounded).parsed())
    rng, longest = random.Random(0), 0
    for _ in range(20):
        answer = adversarial_walk(info, compiled, byte_tokens, rng, budget + 1)
        assert answer is not None and len(answer) <= budget
        jsonschema.validate(json.loads(answer.decode(errors="replace"), strict=False), schema)
        longest = max(longest, len(answer))
    # The walks come close to the bound (flat schemas reach it; nested ones skip optional keys at random), so the
    # bound is what stops them.
    assert longest >= 0.7 * answer_bytes(bounded, bounded)


@pytest.mark.parametrize("fields", [8, 12, 16])
def test_unbounded_string_fields_always_parse_and_validate_on_the_tiny_default(dense, documents, fields, tmp_path):
    schema_file = tmp_path / "schema.json"
    schema_file.write_text(json.dumps(FLAT[fields]))
    task = make_task("extract", load_settings("tiny"), schema_file)
    # the prompt shows the user's schema, not ours
    assert json.dumps(FLAT[fields], indent=1) in task.instruction(requests(documents)[0])
    for row in answer_rows(dense, task, documents):
        jsonschema.validate(json.loads(row["fields"]), FLAT[fields])
        assert all(isinstance(row[name], str) for name in FLAT[fields]["properties"])


def test_nested_objects_arrays_of_objects_and_optional_fields_parse_and_validate(documents, tmp_path):
    budget = 256  # at the tiny preset's 128 tokens no item fits beside the other fields: the list stays empty
    settings = load_settings("tiny", overrides={"vlm_max_new_tokens": budget})
    schema_file = tmp_path / "schema.json"
    schema_file.write_text(json.dumps(NESTED))
    task = make_task("extract", settings, schema_file)
    vlm = VLM("tiny", settings)
    for row in answer_rows(vlm, task, documents):
        jsonschema.validate(json.loads(row["fields"]), NESTED)
        assert isinstance(row["paid"], bool | None) and isinstance(row["vendor"], str)  # an object stays JSON text
    bounded = decoding_schema(NESTED, budget)
    items = bounded["properties"]["items"]
    assert items["maxItems"] >= 1 and items["items"]["additionalProperties"] is False
    assert bounded["$defs"]["money"]["maximum"] >= 9  # referenced numbers are bounded where they are defined


def test_a_schema_whose_keys_alone_outgrow_the_budget_is_refused_with_the_tokens_it_needs(tmp_path):
    schema = strings([f"field_{i:04d}" for i in range(16)])  # 10-letter keys
    schema_file = tmp_path / "schema.json"
    schema_file.write_text(json.dumps(schema))
    needed = 2 + 16 * len('"field_0000":""') + 15  # braces, each key, colon and empty value, the commas
    message = rf"needs up to {needed} tokens.*raise vlm_max_new_tokens \(128\) to at least {needed}"
    with pytest.raises(TaskError, match=message):  # at set-up, before any row runs
        make_task("extract", load_settings("tiny"), schema_file)
    make_task("extract", load_settings("tiny", overrides={"vlm_max_new_tokens": needed}), schema_file)
    with pytest.raises(TaskError, match=f"needs up to {needed} tokens"):
        decoding_schema(schema, needed - 1)


def test_the_users_own_bounds_are_kept_and_counted(info, compiler):
    schema = {
        "type": "object",
        "properties": {
            "code": {"type": "string", "minLength": 2, "maxLength": 3},
            "kind": {"enum": ["receipt", "invoice"]},
            "version": {"const": "v1"},
            "total": {"type": "number", "minimum": 0, "maximum": 500},
            "lines": {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 9}, "maxItems": 2},
            "date": {"type": "string", "format": "date"},
            "sku": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{1,4}$"},
            "free": {"type": "string"},
            "count": {"type": "integer", "minimum": 0},
        },
    }
    bounded = decoding_schema(schema, 256)
    kept = {k: v for k, v in bounded["properties"].items() if k not in ("free", "count")}
    assert kept == {k: v for k, v in schema["properties"].items() if k not in ("free", "count")}
    assert bounded["properties"]["count"]["minimum"] == 0 and bounded["properties"]["count"]["maximum"] > 0
    skeleton = '{"code":"","kind":"invoice","version":"v1","total":500.000000,"lines":[9,9],"date":"","sku":"",' \
               '"free":"","count":}'  # fmt: skip
    code, date, sku = 3 * 4, 10, 6 * 6  # 3 characters of up to 4 bytes; 2024-03-15; 6 pattern characters, escaped
    free, count = bounded["properties"]["free"]["maxLength"], bounded["properties"]["count"]["maximum"]
    assert answer_bytes(bounded, bounded) == len(skeleton) + code + date + sku + 4 * free + len(str(count)) <= 256
    assert free >= 1  # the slack went to the unbounded fields, not a fixed 512
    m = matcher(compiler, bounded)  # date and pattern grammars survive the EBNF the task hands the decoder
    assert m.accept_string('{"code":"AB","kind":"invoice","version":"v1","total":12.5,"lines":[1,2],'
                           '"date":"2024-03-15","sku":"AB12","free":"x","count":7}')
    assert m.accept_token(info.stop_token_ids[0])
    with pytest.raises(TaskError, match="needs up to"):  # a user's bound too wide for the budget is not shrunk
        decoding_schema(strings(["a"]) | {"properties": {"a": {"type": "string", "maxLength": 40}}}, BUDGET)


@pytest.mark.parametrize(
    "prop, message",
    [
        ({"type": "object"}, "admits keys beyond its 'properties'"),
        ({"type": "string", "format": "email"}, "'format': 'email'.*any length"),
        ({"type": "string", "pattern": "^[A-Z]+$"}, "matches strings of any length"),
        ({"type": "array"}, "no 'items' schema"),
        ({"description": "anything"}, "any type"),
        ({"$ref": "#/properties/tree"}, "recursive '\\$ref'"),
    ],
)
def test_parts_with_no_longest_answer_are_refused_where_they_are(prop, message):
    with pytest.raises(TaskError, match=message):
        decoding_schema({"type": "object", "properties": {"tree": prop}}, BUDGET)


def test_xgrammar_writes_answers_as_the_bound_counts_them(info, compiler):
    """What the counting assumes of the installed xgrammar: compact separators; maxLength characters of up to
    4 bytes and no escapes; at most 6 fraction digits and no exponent for a number with both bounds."""
    schema = {"type": "object", "properties": {"s": {"type": "string", "maxLength": 1},
                                               "x": {"type": "number", "minimum": -9, "maximum": 9}},
              "required": ["s", "x"]}  # fmt: skip

    def admits(text: str) -> bool:
        m = matcher(compiler, schema)
        return m.accept_string(text) and m.accept_token(info.stop_token_ids[0])

    assert admits('{"s":"\U0001f9fe","x":-8.999999}') and admits('{"s":"","x":0}')
    assert not admits('{"s": "a", "x": 1}')  # no spaces after the separators
    assert not admits('{"s":"\\u0000","x":1}') and not admits('{"s":"ab","x":1}')
    assert not admits('{"s":"a","x":1.0000000}') and not admits('{"s":"a","x":1e1}')
