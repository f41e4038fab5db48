"""The subjects manifest (SPEC "Subjects manifest (Parquet)"): reading it into Subjects with every bad row reported,
and writing one with the SPEC's Arrow types."""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from engine import storage
from engine.diffusion.subject import SUBJECT_ID_PATTERN, Subject
from engine.media.images import ImageError, read_image
from engine.settings import Settings, SettingsError, parse_params

MAX_INSTANCE_IMAGES = 64
# Prompts are tokenised (and truncated) by CLIP; anything this long is a pasted file, not a prompt.
MAX_PROMPT_CHARS = 10_000
# Checking an image is a round trip to storage, not CPU work: many in flight hides the latency of s3:// and gs://.
IMAGE_CHECK_THREADS = 16
MAX_SEED = 2**63 - 1

# The Arrow types write_subjects_manifest gives the SPEC's columns; other columns are left to pyarrow to infer.
ARROW_TYPES: dict[str, pa.DataType] = {
    "subject_id": pa.string(),
    "instance_images": pa.list_(pa.string()),
    "instance_prompt": pa.string(),
    "class_prompt": pa.string(),
    "prompts": pa.list_(pa.string()),
    "num_images_per_prompt": pa.int32(),
    "seed": pa.int64(),
    "params": pa.string(),
}
REQUIRED_COLUMNS = ("subject_id", "instance_images", "instance_prompt")


class ManifestError(ValueError):
    """The manifest as a whole is unusable (unreadable, not Parquet, no rows, a missing or mistyped column)."""


@dataclass(frozen=True)
class RowError:
    """Everything wrong with one row: `reason` joins its problems with "; "."""

    row: int  # 0-based index in the file
    subject_id: str | None
    reason: str

    def __str__(self) -> str:
        where = f"row {self.row} (subject {self.subject_id!r})" if self.subject_id else f"row {self.row}"
        return f"{where}: {self.reason}"


@dataclass
class SubjectsManifest:
    """The good rows as Subjects, the bad ones as RowErrors (both in file order), and the other columns' values."""

    uri: str
    subjects: list[Subject]
    errors: list[RowError]
    fingerprint: str  # sha256 hex of the file's bytes
    passthrough: dict[str, dict[str, Any]]  # subject_id -> {column not in the SPEC: value}, good rows only


def read_subjects_manifest(uri: str, settings: Settings, check_images: bool = True) -> SubjectsManifest:
    """Read the manifest at any fsspec URI; raises ManifestError for the file, reports each bad row in `errors`.

    With `check_images`, every instance image is opened and decoded (concurrently), so a missing or corrupt one is
    reported now rather than when its subject's training starts.
    """
    data = _read_file(uri)
    table = _read_table(uri, data)
    table, bad_text = _drop_invalid_text(table)
    rows = table.to_pylist()
    image_problems = _check_images(rows, settings) if check_images else {}
    first_seen: dict[str, int] = {}
    subjects, errors, passthrough = [], [], {}
    for index, row in enumerate(rows):
        if index in bad_text:
            errors.append(RowError(index, row["subject_id"] or None, "; ".join(bad_text[index])))
            continue
        subject, reasons = _check_row(index, row, settings, first_seen, image_problems)
        if reasons:
            errors.append(RowError(index, row["subject_id"] or None, "; ".join(reasons)))
        else:
            subjects.append(subject)
            passthrough[subject.subject_id] = {k: v for k, v in row.items() if k not in ARROW_TYPES}
    return SubjectsManifest(uri, subjects, errors, hashlib.sha256(data).hexdigest(), passthrough)


def subjects_of_run(record: dict[str, Any]) -> tuple[dict[str, Subject], list[str]]:
    """The subjects a run was started with (every invocation's manifest; a later one wins for a subject it also
    lists), as far as those manifests are still readable, and a note for each that is not, or that changed since."""
    fingerprints: dict[str, set[str]] = {}
    for invocation in record.get("invocations") or [record]:
        fingerprints.setdefault(invocation["manifest"], set()).add(invocation["manifest_fingerprint"])
    try:
        settings = Settings(**record["settings"])
    except ValueError as err:
        return {}, [f"run.json's settings are not this version's ({err}); its manifests cannot be read"]
    found: dict[str, Subject] = {}
    notes: list[str] = []
    for uri, expected in fingerprints.items():
        try:
            manifest = read_subjects_manifest(uri, settings, check_images=False)
        except ManifestError as err:
            notes.append(f"manifest unreadable, its subjects are left out: {err}")
            continue
        if manifest.fingerprint not in expected:
            notes.append(f"manifest {uri} changed since the run; its subjects are taken as it lists them now")
        found.update({s.subject_id: s for s in manifest.subjects})
    return found, notes


def write_subjects_manifest(uri: str, rows: list[dict]) -> None:
    """Write `rows` as a manifest with the SPEC's Arrow types; a key missing from a row is written as null."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    table = pa.table({col: pa.array([row.get(col) for row in rows], type=ARROW_TYPES.get(col)) for col in columns})
    storage.write_parquet(uri, table)


# --- the file as a whole ---


def _read_file(uri: str) -> bytes:
    # The whole file is read once: its hash is the fingerprint of exactly the bytes that were parsed. A manifest
    # holds a row per subject, so even a large fleet's fits in memory.
    try:
        return storage.read_bytes(uri)
    except FileNotFoundError:
        raise ManifestError(f"{uri}: no such file") from None
    except Exception as err:  # each fsspec backend raises its own types (credentials, permissions, protocol)
        raise ManifestError(f"{uri}: cannot read ({type(err).__name__}: {err})") from None


def _read_table(uri: str, data: bytes) -> pa.Table:
    try:
        table = pq.read_table(pa.BufferReader(data))
    except pa.ArrowException as err:
        raise ManifestError(f"{uri}: not a Parquet file ({err})") from None
    if table.num_rows == 0:
        raise ManifestError(f"{uri}: no rows")
    missing = [col for col in REQUIRED_COLUMNS if col not in table.column_names]
    if missing:
        raise ManifestError(f"{uri}: missing required column(s) {', '.join(repr(c) for c in missing)}")
    mistyped = [
        f"column '{col}' must be {_type_name(ARROW_TYPES[col])}, got {_type_name(table.schema.field(col).type)}"
        for col in ARROW_TYPES
        if col in table.column_names and not _type_fits(col, table.schema.field(col).type)
    ]
    if mistyped:
        raise ManifestError(f"{uri}: {'; '.join(mistyped)}")
    return table


def _drop_invalid_text(table: pa.Table) -> tuple[pa.Table, dict[int, list[str]]]:
    """Parquet lets a writer put bytes that are not UTF-8 in a string column, and decoding them would stop the whole
    read. Each such value is nulled and becomes its row's problem; the other rows read normally."""
    problems: dict[int, list[str]] = {}
    for name in table.column_names:
        column = table.column(name)
        if not (_is_string(column.type) or _is_string_list(column.type)):
            continue
        try:
            column.validate(full=True)  # checks UTF-8 in C++; the per-value loop below runs only when it fails
            continue
        except pa.ArrowInvalid:
            pass
        bad = set()
        for index in range(len(column)):
            try:
                column[index].as_py()
            except UnicodeDecodeError:
                bad.add(index)
                problems.setdefault(index, []).append(f"{name} is not valid UTF-8 text")
        mask = pa.array([i in bad for i in range(len(column))])
        nulled = pc.if_else(mask, pa.scalar(None, column.type), column)
        table = table.set_column(table.column_names.index(name), name, nulled)
    return table, problems


def _type_name(t: pa.DataType) -> str:
    # Arrow prints "list<item: string>"; users write and read "list<string>".
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_list_view(t):
        return f"{str(t).split('<', 1)[0]}<{_type_name(t.value_type)}>"
    return str(t)


def _is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _is_string_list(t: pa.DataType) -> bool:
    is_list = pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_list_view(t)
    return is_list and _is_string(t.value_type)


def _type_fits(column: str, t: pa.DataType) -> bool:
    # pandas writes an optional column that is None in every row as Arrow's null type: the column is just empty.
    if pa.types.is_null(t) and column not in REQUIRED_COLUMNS:
        return True
    expected = ARROW_TYPES[column]
    if pa.types.is_integer(expected):
        return pa.types.is_integer(t)
    return _is_string_list(t) if pa.types.is_list(expected) else _is_string(t)


# --- one row ---


def _check_row(
    index: int, row: dict[str, Any], settings: Settings, first_seen: dict[str, int], image_problems: dict[str, str]
) -> tuple[Subject | None, list[str]]:
    """The row's Subject, or None and every problem found in it, column by column."""
    params, effective, params_reasons = _check_params(row.get("params"), settings)
    reasons = [
        *_check_subject_id(index, row["subject_id"], first_seen),
        *_check_instance_images(row["instance_images"], image_problems),
        *_check_prompt("instance_prompt", row["instance_prompt"]),
        *_check_class_prompt(row.get("class_prompt"), effective),
        *_check_prompts(row.get("prompts")),
        *_check_num_images_per_prompt(row.get("num_images_per_prompt"), settings),
        *_check_seed(row.get("seed")),
        *params_reasons,
    ]
    if reasons:
        return None, reasons
    subject = Subject(
        subject_id=row["subject_id"],
        instance_images=tuple(row["instance_images"]),
        instance_prompt=row["instance_prompt"],
        class_prompt=None if _is_blank(row.get("class_prompt")) else row["class_prompt"],
        prompts=tuple(row.get("prompts") or ()),
        num_images_per_prompt=row.get("num_images_per_prompt"),
        seed=row.get("seed"),
        params=params,
    )
    return subject, []


def _check_subject_id(index: int, value: str | None, first_seen: dict[str, int]) -> list[str]:
    if value is None:
        return ["subject_id is missing"]
    if value == "":
        return ["subject_id is empty"]
    if value in first_seen:
        return [f"duplicate subject_id, first seen at row {first_seen[value]}"]
    first_seen[value] = index
    # fullmatch: the pattern's "$" would also accept a trailing newline, and ids become directory names.
    if not SUBJECT_ID_PATTERN.fullmatch(value):
        return [
            "subject_id may only contain letters, digits, '.', '_' and '-', up to 128 characters, "
            "not starting with '.', '_' or '-'"
        ]
    return []


def _check_instance_images(images: list[str | None] | None, image_problems: dict[str, str]) -> list[str]:
    if images is None:
        return ["instance_images is missing"]
    if not images:
        return [f"instance_images is empty: give 1 to {MAX_INSTANCE_IMAGES} image URIs"]
    reasons = []
    if len(images) > MAX_INSTANCE_IMAGES:
        reasons.append(f"instance_images has {len(images)} images, more than {MAX_INSTANCE_IMAGES}")
    for position, uri in enumerate(images):
        if not uri:
            reasons.append(f"instance_images[{position}] is empty")
        elif problem := _protocol_problem(uri) or image_problems.get(uri):
            reasons.append(problem)
    return reasons


def _protocol_problem(uri: str) -> str | None:
    # A chained URI ("simplecache::s3://bucket/x.png") names one filesystem per link.
    for link in uri.split("::"):
        protocol, _ = fsspec.core.split_protocol(link)
        if protocol is None:
            continue
        try:
            fsspec.get_filesystem_class(protocol)
        except ValueError:
            return f"image {uri!r} has an unknown protocol '{protocol}'"
        except ImportError as err:
            return f"image {uri!r} needs a package that is not installed ({err})"
    return None


def _check_prompt(column: str, value: str | None) -> list[str]:
    if value is None:
        return [f"{column} is missing"]
    if _is_blank(value):
        return [f"{column} is empty"]
    if len(value) > MAX_PROMPT_CHARS:
        return [f"{column} is {len(value)} characters long, more than {MAX_PROMPT_CHARS}"]
    return []


def _check_class_prompt(value: str | None, effective: Settings | None) -> list[str]:
    if _is_blank(value):
        # With invalid params the row's prior preservation is unknown; the params error already fails the row.
        if effective is not None and effective.with_prior_preservation:
            return ["class_prompt is required when with_prior_preservation is on"]
        return []
    return _check_prompt("class_prompt", value)


def _is_blank(value: str | None) -> bool:
    return value is None or not value.strip()


def _check_prompts(prompts: list[str | None] | None) -> list[str]:
    reasons = []
    for position, prompt in enumerate(prompts or ()):
        if prompt is None:
            reasons.append(f"prompts[{position}] is missing")
        else:
            reasons.extend(_check_prompt(f"prompts[{position}]", prompt))
    return reasons


def _check_num_images_per_prompt(value: int | None, settings: Settings) -> list[str]:
    # The column overrides the setting of the same name, so the setting's range applies to it.
    if value is None:
        return []
    try:
        settings.with_overrides({"num_images_per_prompt": value}, source="column")
    except SettingsError as err:
        return [str(err)]
    return []


def _check_seed(value: int | None) -> list[str]:
    # Seeds reach numpy and torch generators, which agree only on non-negative 64-bit values.
    if value is not None and not 0 <= value <= MAX_SEED:
        return [f"seed must be between 0 and 2**63 - 1, got {value}"]
    return []


def _check_params(text: str | None, settings: Settings) -> tuple[dict[str, Any], Settings | None, list[str]]:
    """The row's overrides, its effective settings (None when the overrides are invalid) and what is wrong."""
    try:
        params = parse_params(text)
        return params, settings.with_overrides(params, source="params") if params else settings, []
    except SettingsError as err:
        return {}, None, [str(err)]


# --- the images, all rows at once ---


def _check_images(rows: list[dict[str, Any]], settings: Settings) -> dict[str, str]:
    """A problem for each instance image URI that cannot be read and decoded; each distinct URI is checked once."""
    uris = list(dict.fromkeys(uri for row in rows for uri in _openable_uris(row["instance_images"])))
    with ThreadPoolExecutor(IMAGE_CHECK_THREADS) as pool:
        problems = pool.map(lambda uri: _image_problem(uri, settings), uris)
        return {uri: problem for uri, problem in zip(uris, problems) if problem}


def _openable_uris(images: list[str | None] | None) -> list[str]:
    # A row over the image limit is already bad: decoding its images would be work for nothing.
    if images is None or len(images) > MAX_INSTANCE_IMAGES:
        return []
    return [uri for uri in images if uri and _protocol_problem(uri) is None]


def _image_problem(uri: str, settings: Settings) -> str | None:
    try:
        if not storage.exists(uri):
            return f"image {uri!r}: no such file"
        read_image(uri, max_pixels=settings.max_image_pixels, min_side=settings.min_image_side)
    except ImageError as err:
        return f"image {uri!r} is not a readable image: {str(err).removeprefix(f'{uri}: ')}"
    except Exception as err:  # each fsspec backend raises its own types; one bad URI must not stop the others
        return f"image {uri!r} cannot be checked ({type(err).__name__}: {err})"
    return None
