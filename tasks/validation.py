"""Forget-set validation: Great Expectations 1.x suites built in code, run on an ephemeral
context (nothing written to disk, progress bars off).

A manifest is checked in four stages; a stage runs only when the one before it passed,
because its rules read what the earlier stage guarantees (columns exist, values parse):

1. ``manifest_columns``  the columns are exactly request_id, instance_id, objective, new_label
                         (or instance_key in place of instance_id);
2. ``manifest_schema``   non-empty, within the batch size limit, ids present, request ids
                         printable and at most 128 characters, integers where
                         integers belong, keys printable and inside the dataset root
                         (no absolute path, no ``..``);
3. ``manifest_rules``    uniqueness, ids (keys) in the training split and not already
                         deleted, objective allowed and supported by the configured
                         method, new_label only for relabel, in range and
                         different from the current label;
4. ``forget_images``     the images of those ids: finite, in [0, 1], the model's input shape.

Every expectation carries ``meta.rule``, the name reported with the rows that broke it.
The validator never raises on bad data: it returns a report and the caller decides.
"""

from __future__ import annotations

import csv
import functools
import io
import itertools
import json
import math
import re
import stat
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

COLUMNS = ("request_id", "instance_id", "objective", "new_label")
# a manifest may name instances by key (a file dataset's image path or id) instead of by id
KEY_COLUMNS = ("request_id", "instance_key", "objective", "new_label")
# printable, bounded (pandas' Arrow strings match with RE2: repetitions up to 1000)
INSTANCE_KEY = r"^[^\x00-\x1f\x7f]{1,1000}$"
# a key is a path inside the dataset root: not absolute, no ``..`` component
KEY_OUTSIDE_ROOT = r"^[/\\]|^[A-Za-z]:|(?:^|[/\\])\.\.(?:[/\\]|$)"
OBJECTIVES = ("misclassify", "relabel", "as-if-unseen")
INTEGER = r"^-?[0-9]{1,18}$"  # fits int64 (SQLite, pandas): longer digit strings are not ids
# request ids: printable (they reach terminals and logs), bounded (request_id_problem)
MAX_REQUEST_ID = 128
# Unicode categories a request id may not hold: controls (C0, C1), format characters (zero-width
# spaces, bidirectional overrides), line and paragraph separators, private use, surrogates,
# unassigned code points: invisible or misleading where the id is shown
REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Co", "Cs", "Cn"})
# a JSON number token longer than this is refused unread (exit 2): no id or label needs it, and
# converting a 5,000-digit integer is what Python refuses (and a bigger one would be slow)
MAX_NUMBER_CHARS = 64
MAX_REPORTED_CHARS = 200  # a value quoted in a validation report is cut to this
MAX_MANIFEST_BYTES = 10 * 2**20  # a manifest file larger than this is refused unread
MAX_MANIFEST_ROWS = 100_000      # and one with more rows than this is refused unvalidated
JSON_SUFFIXES = (".jsonl", ".ndjson", ".json")
CSV_SUFFIXES = (".csv", ".txt")
_RUN_IDS = itertools.count(1)


class ManifestError(ValueError):
    """The manifest file cannot be read at all (missing, unknown format, broken JSON line)."""


class JsonComposite(str):
    """A JSON object or array where a manifest needs a scalar: a placeholder text, marked, so
    the rules refuse it (``request_id_format``, ``instance_id_integer``...) and the ledger
    keeps None instead of its string form."""


class _NumberTooLong(Exception):
    def __init__(self, length: int):
        self.length = length


def _number(token: str) -> str:
    """A JSON number kept as written (nothing converts it here), once its length is bounded."""
    if len(token) > MAX_NUMBER_CHARS:
        raise _NumberTooLong(len(token))
    return token


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def request_id_problem(value: str | None) -> str | None:
    """Why ``value`` cannot be a request id (None if it can; an absent id is another rule):
    a JSON object or array, longer than MAX_REQUEST_ID characters, or holding a character of
    a REFUSED_CATEGORIES category."""
    if value is None:
        return None
    if isinstance(value, JsonComposite):
        return "a JSON object or array, not a string"
    if len(value) > MAX_REQUEST_ID:
        return f"{len(value)} characters, over {MAX_REQUEST_ID}"
    for ch in value:
        category = unicodedata.category(ch)
        if category in REFUSED_CATEGORIES:
            return f"character U+{ord(ch):04X} ({category}) is not printable"
    return None


@dataclass(frozen=True)
class ValidationContext:
    """What the rules check a manifest against: the dataset and the ledger's state."""

    num_train: int
    num_classes: int
    train_labels: list[int]
    image_shape: tuple[int, int, int]  # what the model expects: (C, H, W)
    max_batch_size: int
    supported_objectives: tuple[str, ...] = OBJECTIVES  # those params.yaml's method can do
    claimed_instances: frozenset[int] = field(default_factory=frozenset)
    claimed_request_ids: frozenset[str] = field(default_factory=frozenset)
    # {instance key: instance id} of the training split (file datasets; empty: no keys)
    train_keys: Mapping[str, int] = field(default_factory=dict)


def manifest_bytes(path: str | Path) -> bytes:
    """The bytes of a manifest file, read once: a regular file within the size cap."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ManifestError(f"manifest {path} does not exist") from None
    except OSError as e:
        raise ManifestError(f"cannot read {path}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ManifestError(f"manifest {path} is not a regular file")
    if st.st_size > MAX_MANIFEST_BYTES:
        raise ManifestError(f"manifest {path} is {st.st_size} bytes, over the "
                            f"{MAX_MANIFEST_BYTES // 2**20} MiB limit")
    suffix = path.suffix.lower()
    if suffix not in JSON_SUFFIXES + CSV_SUFFIXES:
        raise ManifestError(f"{path}: unknown manifest format {suffix!r} (use .csv or .jsonl)")
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_MANIFEST_BYTES + 1)
    except OSError as e:
        raise ManifestError(f"cannot read {path}: {e.strerror}") from None
    if len(data) > MAX_MANIFEST_BYTES:  # it grew while we looked
        raise ManifestError(f"manifest {path} is over the {MAX_MANIFEST_BYTES // 2**20} MiB limit")
    if not data.strip():
        raise ManifestError(f"manifest {path} is empty")
    return data


def read_manifest(path: str | Path) -> pd.DataFrame:
    """A manifest (CSV, or JSON lines for .jsonl/.ndjson/.json) as a frame of strings/None."""
    return parse_manifest(manifest_bytes(path), path)


def parse_manifest(data: bytes, path: str | Path) -> pd.DataFrame:
    """The manifest ``data`` (the bytes of ``path``; its suffix names the format) as a frame.

    Raises ManifestError naming the line for anything that is not a table of records: text
    that is not UTF-8, broken JSON, CSV rows with more or fewer fields than the header,
    duplicate columns, more than MAX_MANIFEST_ROWS rows.
    """
    path = Path(path)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ManifestError(f"{path} is not UTF-8 text (byte {e.start})") from None
    if path.suffix.lower() in JSON_SUFFIXES:
        records = []
        # lines end at "\n" only: U+2028, U+0085... may sit inside a JSON string
        for n, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line, parse_int=_number, parse_float=_number,
                                 parse_constant=str)
            except _NumberTooLong as e:
                raise ManifestError(f"{path} line {n}: a number of {e.length} characters (at "
                                    f"most {MAX_NUMBER_CHARS})") from None
            except json.JSONDecodeError as e:
                raise ManifestError(f"{path} line {n}: not valid JSON ({e.msg})") from None
            except RecursionError:
                raise ManifestError(f"{path} line {n}: JSON nested too deeply") from None
            if not isinstance(obj, dict):
                raise ManifestError(f"{path} line {n}: expected a JSON object")
            bad = next((t for t in (*obj, *obj.values()) if isinstance(t, str)
                        and not _encodable(t)), None)
            if bad is not None:  # a "\ud800" escape: not text UTF-8 (or the ledger) can hold
                raise ManifestError(f"{path} line {n}: {ascii(bad)[:60]} is not valid Unicode "
                                    "(a lone surrogate)")
            records.append(obj)
            _check_rows(path, len(records))
        columns = list(dict.fromkeys(k for r in records for k in r))
        if records and "new_label" not in columns:  # optional in a record: absent means null
            columns.append("new_label")
        frame = pd.DataFrame({c: pd.Series([r.get(c) for r in records], dtype=object)
                              for c in columns}, index=range(len(records)))
    else:
        frame = _read_csv(text, path)
    # object columns of text/None (pandas would turn an all-None column into NaN floats)
    return pd.DataFrame({c: pd.Series([_as_text(v) for v in frame[c]], dtype=object)
                         for c in frame.columns}, index=range(len(frame)))


def _check_rows(path: Path, n: int) -> None:
    if n > MAX_MANIFEST_ROWS:
        raise ManifestError(f"{path} has more than {MAX_MANIFEST_ROWS} rows")


def _read_csv(text: str, path: Path) -> pd.DataFrame:
    """Strict CSV: a header of distinct names, then rows of exactly that many fields."""
    reader = csv.reader(io.StringIO(text, newline=""), skipinitialspace=True, strict=True)
    try:
        header = next(reader, None)
        if header is None:
            return pd.DataFrame()
        names = [h.strip() for h in header]
        dup = sorted({h for h in names if names.count(h) > 1})
        if dup:
            raise ManifestError(f"{path} line 1: duplicate column(s) {', '.join(map(repr, dup))}")
        rows = []
        for fields in reader:
            if not fields or fields == [""]:
                continue  # a blank line
            if len(fields) != len(names):
                raise ManifestError(f"{path} line {reader.line_num}: expected {len(names)} "
                                    f"fields as in the header, got {len(fields)}")
            rows.append(fields)
            _check_rows(path, len(rows))
    except csv.Error as e:
        raise ManifestError(f"{path} line {reader.line_num}: not valid CSV ({e})") from None
    return pd.DataFrame({c: pd.Series([r[i] for r in rows], dtype=object)
                         for i, c in enumerate(names)}, index=range(len(rows)))


def _as_text(value: Any) -> str | None:
    """Cell -> stripped text, None for empty; JSON numbers keep their written form; a JSON
    object or array becomes a JsonComposite placeholder (never its string form)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, (dict, list)):
        return JsonComposite(f"<JSON {'object' if isinstance(value, dict) else 'array'}>")
    text = str(value).strip()
    return text or None


def keyed(raw: pd.DataFrame) -> bool:
    """Whether a manifest names its instances by ``instance_key`` (not ``instance_id``)."""
    return "instance_key" in raw.columns and "instance_id" not in raw.columns


def typed_rows(raw: pd.DataFrame, train_keys: Mapping[str, int] | None = None
               ) -> list[dict[str, Any]]:
    """Rows with integer ids (None where absent or unparsable), for the ledger; a keyed
    manifest's ids are its keys' instance ids in ``train_keys`` (None where unknown)."""

    def as_int(v: Any) -> int | None:
        return int(v) if isinstance(v, str) and re.fullmatch(INTEGER, v) else None

    def text(v: Any) -> str | None:  # a JSON object or array is not kept as its string form
        return None if isinstance(v, JsonComposite) else v

    by_key = keyed(raw)
    rows = []
    for row in raw.to_dict("records"):
        key = row.get("instance_key") if by_key else None
        rows.append({
            "request_id": text(row.get("request_id")),
            "instance_id": (train_keys or {}).get(key) if by_key and key is not None
            else None if by_key else as_int(row.get("instance_id")),
            "objective": text(row.get("objective")),
            "new_label": as_int(row.get("new_label")),
        })
        if by_key:
            rows[-1]["instance_key"] = key
    return rows


# -- suites -----------------------------------------------------------------------------------


def _columns_suite(by_key: bool = False) -> list:
    import great_expectations.expectations as gxe

    columns = KEY_COLUMNS if by_key else COLUMNS
    return [gxe.ExpectTableColumnsToMatchSet(column_set=list(columns), exact_match=True,
                                             meta={"rule": "columns"})]  # schema drift


def _schema_suite(ctx: ValidationContext, by_key: bool = False) -> list:
    import great_expectations.expectations as gxe

    suite = [
        gxe.ExpectTableRowCountToBeBetween(min_value=1, meta={"rule": "non_empty"}),
        # a bounded batch: one deletion batch must stay reviewable and cheap to unlearn
        gxe.ExpectTableRowCountToBeBetween(max_value=ctx.max_batch_size,
                                           meta={"rule": "batch_size_limit"}),
        gxe.ExpectColumnValuesToNotBeNull(column="request_id", meta={"rule": "request_id_present"}),
        # printable, bounded, a string (request_id_problem): column made by _schema_frame
        gxe.ExpectColumnValuesToBeNull(column="request_id_refused",
                                       meta={"rule": "request_id_format"}),
        gxe.ExpectColumnValuesToNotBeNull(column="instance_id",
                                          meta={"rule": "instance_id_present"}),
        gxe.ExpectColumnValuesToNotBeNull(column="objective", meta={"rule": "objective_present"}),
        # types: ids and labels are integers (ranges are checked once they parse)
        gxe.ExpectColumnValuesToMatchRegex(column="instance_id", regex=INTEGER,
                                           meta={"rule": "instance_id_integer"}),
        gxe.ExpectColumnValuesToMatchRegex(column="new_label", regex=INTEGER,
                                           meta={"rule": "new_label_integer"}),
    ]
    if not by_key:
        return suite
    by_id = ("instance_id_present", "instance_id_integer")
    return [e for e in suite if e.meta["rule"] not in by_id] + [
        gxe.ExpectColumnValuesToNotBeNull(column="instance_key",
                                          meta={"rule": "instance_key_present"}),
        gxe.ExpectColumnValuesToMatchRegex(column="instance_key", regex=INSTANCE_KEY,
                                           meta={"rule": "instance_key_format"}),
        # a key names a file inside the dataset root: no absolute path, no ``..``
        gxe.ExpectColumnValuesToNotMatchRegex(column="instance_key", regex=KEY_OUTSIDE_ROOT,
                                              meta={"rule": "instance_key_inside_dataset"}),
    ]


def _key_rules(moved: bool) -> list:
    """A keyed manifest's rules on its instances (in place of the id rules): keys unique,
    training instances, not already deleted, and (revalidating an accepted batch) still the
    instance ids they were accepted as."""
    import great_expectations.expectations as gxe

    rules = [
        gxe.ExpectColumnValuesToBeUnique(column="instance_key",
                                         meta={"rule": "unique_instance_key"}),
        gxe.ExpectColumnValuesToBeNull(column="unknown_key",
                                       meta={"rule": "instance_key_in_training_split"}),
        gxe.ExpectColumnValuesToBeNull(column="deleted_key", meta={"rule": "not_already_deleted"}),
    ]
    if moved:
        rules.append(gxe.ExpectColumnValuesToBeNull(column="moved_key",
                                                    meta={"rule": "instance_key_unchanged"}))
    return rules


def _rules_suite(ctx: ValidationContext, by_key: bool = False, moved: bool = False) -> list:
    import great_expectations.expectations as gxe
    from great_expectations.expectations.row_conditions import Column

    relabel = Column("objective") == "relabel"
    suite = [
        # duplicate requests would be applied (and audited) twice
        gxe.ExpectColumnValuesToBeUnique(column="request_id", meta={"rule": "unique_request_id"}),
        gxe.ExpectColumnValuesToNotBeInSet(column="request_id",
                                           value_set=sorted(ctx.claimed_request_ids),
                                           meta={"rule": "request_id_not_reused"}),
        # one instance, one objective per batch
        gxe.ExpectColumnValuesToBeUnique(column="instance_id",
                                         meta={"rule": "unique_instance_id"}),
        # ids must name training instances (ids never change meaning)
        gxe.ExpectColumnValuesToBeBetween(column="instance_id", min_value=0,
                                          max_value=ctx.num_train - 1,
                                          meta={"rule": "instance_in_training_split"}),
        # a deletion is applied once; a pending one is not queued twice
        gxe.ExpectColumnValuesToNotBeInSet(column="instance_id",
                                           value_set=sorted(ctx.claimed_instances),
                                           meta={"rule": "not_already_deleted"}),
        gxe.ExpectColumnValuesToBeInSet(column="objective", value_set=list(OBJECTIVES),
                                        meta={"rule": "objective_allowed"}),
        # a known objective the configured method cannot do would fail at unlearning time
        gxe.ExpectColumnValuesToBeInSet(column="objective",
                                        value_set=list(ctx.supported_objectives),
                                        row_condition=Column("objective").is_in(list(OBJECTIVES)),
                                        meta={"rule": "objective_supported_by_method"}),
        gxe.ExpectColumnValuesToNotBeNull(column="new_label", row_condition=relabel,
                                          meta={"rule": "relabel_needs_new_label"}),
        gxe.ExpectColumnValuesToBeNull(column="new_label",
                                       row_condition=Column("objective") != "relabel",
                                       meta={"rule": "new_label_only_for_relabel"}),
        gxe.ExpectColumnValuesToBeBetween(column="new_label", min_value=0,
                                          max_value=ctx.num_classes - 1,
                                          meta={"rule": "new_label_in_range"}),
        # relabelling to the label it already has deletes nothing
        gxe.ExpectColumnValuesToBeNull(column="unchanged_label", row_condition=relabel,
                                       meta={"rule": "new_label_differs"}),
    ]
    if not by_key:
        return suite
    by_id = ("unique_instance_id", "instance_in_training_split", "not_already_deleted")
    rest = [e for e in suite if e.meta["rule"] not in by_id]
    return rest[:2] + _key_rules(moved) + rest[2:]  # after the request-id rules, as by id


def _images_suite(ctx: ValidationContext) -> list:
    import great_expectations.expectations as gxe

    shape = "x".join(str(s) for s in ctx.image_shape)
    return [
        gxe.ExpectColumnValuesToBeInSet(column="finite", value_set=[True],
                                        meta={"rule": "images_finite"}),  # NaN/inf poison steps
        gxe.ExpectColumnValuesToBeBetween(column="pixel_min", min_value=0.0,
                                          meta={"rule": "images_in_unit_range"}),
        gxe.ExpectColumnValuesToBeBetween(column="pixel_max", max_value=1.0,
                                          meta={"rule": "images_in_unit_range"}),
        gxe.ExpectColumnValuesToBeInSet(column="shape", value_set=[shape],
                                        meta={"rule": "image_shape"}),  # the model's input
    ]


# -- frames -----------------------------------------------------------------------------------


def _typed_frame(raw: pd.DataFrame, ctx: ValidationContext,
                 accepted_ids: list[int] | None = None) -> pd.DataFrame:
    frame = raw.copy()
    if keyed(raw):
        frame = frame.join(_key_columns(list(raw["instance_key"]), ctx, accepted_ids))
    else:
        frame["instance_id"] = pd.array([int(v) for v in raw["instance_id"]], dtype="Int64")
    frame["new_label"] = pd.array([None if pd.isna(v) else int(v) for v in raw["new_label"]],
                                  dtype="Int64")
    current = [None if pd.isna(i) else ctx.train_labels[i] if 0 <= i < ctx.num_train else None
               for i in frame["instance_id"]]
    frame["current_label"] = pd.array(current, dtype="Int64")
    same = (frame["new_label"] == frame["current_label"]).fillna(False).astype(bool)
    frame["unchanged_label"] = frame["new_label"].where(same)  # the label, where it would not move
    return frame


def _key_columns(keys: list[str | None], ctx: ValidationContext,
                 accepted_ids: list[int] | None) -> pd.DataFrame:
    """Per row of a keyed manifest: its instance id, and its key where a rule fails on it
    (unknown, already claimed, or not the id it was accepted as)."""
    ids = [None if k is None else ctx.train_keys.get(k) for k in keys]
    col = lambda values: pd.Series(values, dtype=object, index=range(len(keys)))
    columns = {
        "instance_id": pd.Series(pd.array(ids, dtype="Int64"), index=range(len(keys))),
        "unknown_key": col([k if k is not None and i is None else None
                            for k, i in zip(keys, ids)]),
        "deleted_key": col([k if i is not None and i in ctx.claimed_instances else None
                            for k, i in zip(keys, ids)]),
    }
    if accepted_ids is not None:
        columns["moved_key"] = col([k if i is not None and i != a else None
                                    for k, i, a in zip(keys, ids, accepted_ids)])
    return pd.DataFrame(columns)


def image_frame(ids: list[int], images: Any) -> pd.DataFrame:
    """Per-instance image statistics; ``images``: (N, C, H, W) tensor of those ids."""
    import torch

    flat = images.reshape(len(ids), -1).double()
    return pd.DataFrame({
        "instance_id": ids,
        "finite": torch.isfinite(flat).all(1).tolist(),
        "pixel_min": torch.nan_to_num(flat, nan=-1.0).min(1).values.tolist(),
        "pixel_max": torch.nan_to_num(flat, nan=2.0).max(1).values.tolist(),
        "shape": ["x".join(str(s) for s in images.shape[1:])] * len(ids),
    })


# -- running ----------------------------------------------------------------------------------


@functools.cache
def _context():
    """One ephemeral GX context per process (each new one logs and makes a temp folder)."""
    import logging

    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    for name in ("great_expectations", "great_expectations.data_context.types.base"):
        logging.getLogger(name).setLevel(logging.WARNING)  # the second one sets INFO itself
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    return context


@functools.cache
def _batch_definition(name: str):
    """One pandas datasource per suite, kept for the process: each run passes its own
    dataframe, and adding or deleting a datasource rewrites the context's whole config."""
    return (_context().data_sources.add_pandas(name=name).add_dataframe_asset(name=name)
            .add_batch_definition_whole_dataframe("whole"))


def _run_suite(name: str, frame: pd.DataFrame, expectations: list) -> tuple[dict, list[dict]]:
    import great_expectations as gx

    batch_def = _batch_definition(name)  # first: a suite needs the active context
    suite = gx.ExpectationSuite(name=f"{name}-{next(_RUN_IDS)}")
    for expectation in expectations:
        suite.add_expectation(expectation)
    result = batch_def.get_batch(batch_parameters={"dataframe": frame}).validate(
        suite, result_format="COMPLETE")
    failures = []
    for r in result.results:
        if r.success:
            continue
        rows = [int(i) + 1 for i in r.result.get("unexpected_index_list") or []]
        values = r.result.get("partial_unexpected_list") or []
        failures.append({
            "suite": name,
            "rule": r.expectation_config.meta.get("rule", r.expectation_config.type),
            "expectation": r.expectation_config.type,
            "rows": rows,
            "values": [_jsonable(v) for v in values][:20],
            "observed": _jsonable(r.result.get("observed_value")),
        })
    return result.to_json_dict(), failures


def _jsonable(v: Any) -> Any:
    if isinstance(v, str):  # a refused value may be huge: reports quote its start
        return v if len(v) <= MAX_REPORTED_CHARS else v[: MAX_REPORTED_CHARS - 1] + "…"
    if v is None or isinstance(v, (bool, int, float)):
        return v
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    try:
        if pd.isna(v):
            return None
    except (TypeError, ValueError):
        pass
    return v.item() if hasattr(v, "item") else str(v)


def validate_manifest(raw: pd.DataFrame, ctx: ValidationContext, images_of=None,
                      accepted_ids: list[int] | None = None) -> dict:
    """Run the stages in order; return ``{"success", "failures", "suites", "rows"}``.

    ``images_of(ids) -> (N, C, H, W) tensor`` gives the forget images (stage 4); without it
    that stage is skipped. A manifest with an ``instance_key`` column (and no
    ``instance_id``) names instances by key (``ctx.train_keys``); ``accepted_ids``, the ids
    its keys stood for when the batch was accepted, must still be theirs.
    """
    by_key = keyed(raw)
    moved = by_key and accepted_ids is not None
    stages: list[tuple[str, Any]] = [
        ("manifest_columns", lambda: (raw, _columns_suite(by_key))),
        ("manifest_schema", lambda: (_schema_frame(raw), _schema_suite(ctx, by_key))),
        ("manifest_rules", lambda: (_typed_frame(raw, ctx, accepted_ids if moved else None),
                                    _rules_suite(ctx, by_key, moved))),
    ]
    if images_of is not None:
        stages.append(("forget_images", lambda: _images_stage(raw, images_of, ctx)))
    suites: dict[str, Any] = {}
    failures: list[dict] = []
    for name, build in stages:
        frame, expectations = build()
        suites[name], failures = _run_suite(name, frame, expectations)
        if failures:
            break
    return {"success": not failures, "failures": failures, "suites": suites, "rows": len(raw)}


def _schema_frame(raw: pd.DataFrame) -> pd.DataFrame:
    """The manifest plus ``request_id_refused``: each request id that request_id_problem
    refuses (None where it is fine), so the rule reports the rows and values."""
    frame = raw.copy()
    frame["request_id_refused"] = pd.Series(
        [v if request_id_problem(v) else None for v in raw["request_id"]], dtype=object,
        index=raw.index)
    return frame


def _images_stage(raw: pd.DataFrame, images_of, ctx: ValidationContext):
    ids = ([ctx.train_keys[k] for k in raw["instance_key"]] if keyed(raw)
           else [int(v) for v in raw["instance_id"]])
    return image_frame(ids, images_of(ids)), _images_suite(ctx)


def describe_failures(failures: list[dict], limit: int = 3) -> str:
    """One line: each failed rule with its first rows (1-based data rows) and values."""
    parts = []
    for f in failures[:limit]:
        where = ""
        if f["rows"]:
            rows = ", ".join(str(r) for r in f["rows"][:5])
            more = "…" if len(f["rows"]) > 5 else ""
            where = f" at row{'s' if len(f['rows']) > 1 else ''} {rows}{more}"
            if f["values"]:
                where += f" (values {', '.join(_short(v) for v in f['values'][:5])})"
        elif f["observed"] is not None:
            where = f" (observed {f['observed']})"
        parts.append(f"rule {f['rule']} failed{where}")
    if len(failures) > limit:
        parts.append(f"and {len(failures) - limit} more")
    return "; ".join(parts)


def _short(value: Any, limit: int = 40) -> str:
    """A value for a one-line message: repr (control characters escaped), cut to ``limit``."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"
