"""Reading preference files: JSON lines and Parquet, through the format adapters.

``read_records(path)`` returns ``(records, report)``. Files are read by extension:
``.jsonl`` / ``.json`` are JSON lines (one object per line; blank lines are not records
and are ignored), ``.parquet`` is read with pyarrow. Locations in messages are
``file:line N`` (JSONL, 1-based) and ``file:row N`` (Parquet, 0-based row index).

A UTF-8 byte order mark at the start of a JSON lines file (as some Windows editors write)
is not part of line 1. A file-level problem (missing file, unknown extension, a JSON array
instead of JSON lines, no record of a recognisable format) always raises
:class:`DataError`; record-level problems follow ``on_error`` (see :mod:`lm.data.records`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

from lm.data import adapters
from lm.data.records import DataError, OnError, PreferenceRecord, Report, check_on_error

PathLike = str | os.PathLike

JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
BOM = "\ufeff"

# A row is either a parsed object or the DataError that parsing it raised.
RawRow = tuple[str, "dict[str, Any] | DataError"]


def _jsonl_rows(path: str) -> Iterator[RawRow]:
    first = True  # the first line with text: where a JSON array would open
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            source = f"{path}:line {number}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                first = False
                yield source, DataError(
                    source, None, "invalid_utf8", f"invalid UTF-8 at byte offset {e.start}"
                )
                continue
            if number == 1:
                text = text.removeprefix(BOM)
            if not text.strip():
                continue
            if first and text.lstrip().startswith("["):
                raise DataError(
                    source, None, "not_json_lines",
                    "a JSON array; expected JSON lines (one object per line)",
                )
            first = False
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                yield source, DataError(
                    source, None, "malformed_json", f"malformed JSON ({e.msg})"
                )
                continue
            if not isinstance(row, dict):
                kind = type(row).__name__
                yield source, DataError(
                    source, None, "not_an_object", f"expected a JSON object, got {kind}"
                )
                continue
            yield source, row


def _parquet_rows(path: str) -> Iterator[RawRow]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise DataError(path, None, "bad_file", f"not a readable Parquet file ({e})") from None
    index = 0
    for batch in parquet.iter_batches():
        for row in batch.to_pylist():
            yield f"{path}:row {index}", row
            index += 1


def iter_rows(path: PathLike) -> Iterator[RawRow]:
    """``(source, row or DataError)`` for each record of a JSONL or Parquet file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(path, None, "missing_file", "no such file")
    if path.endswith(JSONL_SUFFIXES):
        return _jsonl_rows(path)
    if path.endswith(PARQUET_SUFFIXES):
        return _parquet_rows(path)
    suffixes = JSONL_SUFFIXES + PARQUET_SUFFIXES
    raise DataError(path, None, "bad_file", f"unknown file type; expected one of {suffixes}")


def read_records(
    paths: PathLike | Sequence[PathLike],
    *,
    format: str = "auto",
    on_error: str = "fail",
    template: str | adapters.ChatTemplate = "plain",
    report: Report | None = None,
) -> tuple[list[PreferenceRecord], Report]:
    """Read preference records from one or more files.

    Args:
      paths: a file or a list of files (each detected separately when ``format="auto"``).
      format: ``"auto"`` (from the fields of each file's first record; under ``"skip"``,
        of its first recognisable one, the records before it dropped as ``unknown_format``)
        or one of :data:`lm.data.adapters.FORMATS`.
      on_error: ``"fail"`` or ``"skip"`` (see :mod:`lm.data.records`).
      template: chat template name or :class:`~lm.data.adapters.ChatTemplate` for the
        message-list formats (ultrafeedback, webgpt).
      report: an existing report to add to (else a new one).

    Returns:
      The records in file order, and the report of what was kept and dropped.

    Raises:
      DataError: a file that yields no record (empty, or every record dropped under
        ``"skip"``: most likely the wrong file), one whose records have no recognisable
        format, or a bad record under ``"fail"``.
    """
    policy: OnError = check_on_error(on_error)
    if format != "auto" and format not in adapters.FORMATS:
        raise ValueError(f"format must be 'auto' or one of {adapters.FORMATS}, got {format!r}")
    chat = adapters.get_template(template)
    report = report if report is not None else Report()
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    records = []
    for path in paths:
        fmt = None if format == "auto" else format
        unrecognised = None  # the first record dropped before the format was known
        before, dropped_before = len(records), report.num_dropped
        for source, row in iter_rows(path):
            try:
                if isinstance(row, DataError):
                    raise row
                fmt = fmt or _detect(row, source)
                records.append(adapters.ADAPTERS[fmt](row, source, chat))
                report.kept += 1
            except DataError as err:
                report.drop(err, policy)
                if err.reason == "unknown_format" and unrecognised is None:
                    unrecognised = err
        if fmt is None and unrecognised is not None:
            raise DataError(
                os.fspath(path), None, "unknown_format",
                f"no record has a recognisable format (first: {unrecognised})",
            )
        if len(records) == before:
            dropped = report.num_dropped - dropped_before
            raise DataError(os.fspath(path), None, "no_records",
                            f"no usable record (all {dropped} dropped; see the report)"
                            if dropped else "no records (an empty file)")
    return records, report


def _detect(row: dict[str, Any], source: str) -> str:
    """:func:`lm.data.adapters.detect_format`, or a ``DataError`` (reason ``unknown_format``)."""
    fmt = adapters.detect_format(row)
    if fmt is None:
        raise DataError(
            source, None, "unknown_format",
            f"cannot recognise the format from fields {sorted(row)}; "
            f"pass format= (one of {adapters.FORMATS})",
        )
    return fmt
