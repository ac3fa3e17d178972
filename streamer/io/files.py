"""File readers (JSON Lines, CSV, Parquet) and writers (JSON Lines, Parquet) for backtests.

Readers yield chunks of raw JSON values with their record index: the line number for JSON Lines and CSV
(counting the header as line 0 for CSV), the row number for Parquet. Every format goes through the same
event decoder, so validation is identical whatever the file type.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, TextIO

import orjson

from streamer import errors
from streamer.errors import ConfigError

INPUT_SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".parquet")
OUTPUT_SUFFIXES = (".jsonl", ".ndjson", ".parquet")
_UTF8_BOM = b"\xef\xbb\xbf"


@dataclass
class RecordChunk:
    """Raw values of consecutive records and their record indices."""

    values: list[bytes]
    indices: list[int]
    # Records the reader itself found invalid: position in ``values`` -> (reason code, message).
    invalid: dict[int, tuple[str, str]] = field(default_factory=dict)


def _suffix(path: Path, allowed: tuple[str, ...], role: str) -> str:
    suffix = path.suffix.lower()
    if suffix not in allowed:
        raise ConfigError(f"Unsupported {role} file {path}: expected one of {', '.join(allowed)}")
    return suffix


def check_input_file(path: Path) -> str:
    """Return the suffix of an existing input file of a supported format; raise ConfigError otherwise."""
    if not path.is_file():
        raise ConfigError(f"Input file not found: {path}")
    return _suffix(path, INPUT_SUFFIXES, "input")


def read_records(path: str | Path, chunk_size: int = 4096, feature_names: tuple[str, ...] | None = None,
                 entity_field: str = "entity") -> Iterator[RecordChunk]:
    """Yield the records of a JSON Lines, CSV or Parquet file in file order, ``chunk_size`` at a time.

    CSV cells of ``entity_field`` stay text, so that ids such as ``00123`` and ``123`` remain distinct.
    """
    path = Path(path)
    suffix = check_input_file(path)
    if suffix in (".jsonl", ".ndjson", ".json"):
        yield from _read_json_lines(path, chunk_size)
    elif suffix == ".csv":
        yield from _read_csv(path, chunk_size, feature_names, entity_field)
    else:
        yield from _read_parquet(path, chunk_size, feature_names)


def _read_json_lines(path: Path, chunk_size: int) -> Iterator[RecordChunk]:
    chunk = RecordChunk([], [])
    first = True
    with path.open("rb") as file:
        for line_number, line in enumerate(file):
            line = line.rstrip(b"\r\n")
            if line_number == 0 and line.startswith(_UTF8_BOM):
                line = line[len(_UTF8_BOM):]  # some editors start a UTF-8 file with a byte order mark
            if first and _starts_json_array(line):
                raise ConfigError(f"Invalid input file {path}: it contains a JSON array; streamer reads JSON Lines, "
                                  "one event object per line")
            if not line.strip():
                continue  # blank lines separate nothing and are not records
            first = False
            chunk.values.append(line)
            chunk.indices.append(line_number)
            if len(chunk.values) >= chunk_size:
                yield chunk
                chunk = RecordChunk([], [])
    if chunk.values:
        yield chunk


def _starts_json_array(line: bytes) -> bool:
    """Return whether the first line of a file opens a JSON array of objects, as ``json.dump`` of a list does.

    Such a line is no event in any case; a file of events in JSON Lines never starts with one.
    """
    stripped = line.strip()
    return stripped == b"[" or stripped[:1] == b"[" and stripped[1:].lstrip()[:1] == b"{"


def _numbered_columns(columns: list[str]) -> list[str]:
    """Return the columns named ``f0``, ``f1``, ... in numeric order: the features of a file without a
    ``features`` column."""
    return sorted((c for c in columns if c[:1] == "f" and c[1:].isdigit()), key=lambda c: int(c[1:]))


def _has_non_finite(document: dict) -> bool:
    for value in document.values():
        if type(value) is float:
            if not math.isfinite(value):
                return True
        elif type(value) is list and any(type(v) is float and not math.isfinite(v) for v in value):
            return True
    return False


def _dumps_row(document: dict, default=None) -> bytes:
    """Encode a CSV or Parquet row as a JSON record.

    orjson writes non-finite floats as null. Rows with one are written by the standard library instead, as
    ``NaN``, ``Infinity`` or ``-Infinity``, so that the event decoder names the field that contains the value and
    the dead letter keeps it.
    """
    if _has_non_finite(document):
        return json.dumps(document, default=default, ensure_ascii=False).encode("utf-8", "surrogateescape")
    return orjson.dumps(document, option=orjson.OPT_NON_STR_KEYS, default=default)


def _csv_value(text: str) -> Any:
    """Convert a CSV cell: numbers become numbers, JSON lists become lists, anything else stays text."""
    if text == "":
        return None
    if text[0] == "[":
        try:
            return orjson.loads(text)
        except orjson.JSONDecodeError:
            return text
    try:
        return int(text)  # exact, where a float would round integers beyond 2**53 such as epoch nanoseconds
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        lowered = text.lower()
        return {"true": True, "false": False}.get(lowered, text)


def _open_csv(path: Path) -> TextIO:
    # utf-8-sig skips the byte order mark that spreadsheet programs write at the start of a UTF-8 CSV file.
    return path.open("r", newline="", encoding="utf-8-sig", errors="surrogateescape")


def count_csv_rows(path: str | Path) -> int:
    """Count the rows after the header as the reader yields them: quoted cells may span lines, and blank
    rows are skipped."""
    with _open_csv(Path(path)) as file:
        return max(0, sum(1 for row in csv.reader(file) if row) - 1)


def _read_csv(path: Path, chunk_size: int, feature_names: tuple[str, ...] | None, entity_field: str
              ) -> Iterator[RecordChunk]:
    chunk = RecordChunk([], [])
    with _open_csv(path) as file:
        reader = csv.DictReader(file)
        columns = reader.fieldnames or []
        numbered = _numbered_columns(columns)
        for row in reader:
            # DictReader fills missing cells with None and puts extra cells in a list under the key None.
            if None in row or None in row.values():
                cells = [text for name, text in row.items() if name is not None and text is not None]
                cells += row.get(None) or []
                chunk.invalid[len(chunk.values)] = (
                    errors.INVALID_CSV_ROW, f"Invalid CSV row: {len(cells)} cells, the header has {len(columns)}")
                value = ",".join(cells).encode("utf-8", "surrogateescape")
            else:
                document = {name: (text or None) if name == entity_field else _csv_value(text)
                            for name, text in row.items()}
                if "features" not in document and not feature_names and numbered:
                    document["features"] = [document.pop(column) for column in numbered]
                try:
                    value = _dumps_row(document)
                except TypeError:
                    value = str(document).encode("utf-8", "replace")  # not JSON at all: the decoder rejects it
            chunk.values.append(value)
            chunk.indices.append(reader.line_num - 1)
            if len(chunk.values) >= chunk_size:
                yield chunk
                chunk = RecordChunk([], [])
    if chunk.values:
        yield chunk


def _parquet_cell(value: Any) -> Any:
    """Convert a Parquet cell that JSON lacks: UTF-8 bytes become text, other objects their string form."""
    if isinstance(value, bytes):
        return value.decode("utf-8")  # invalid UTF-8 raises, and the row becomes a dead letter
    return str(value)


def _read_parquet(path: Path, chunk_size: int, feature_names: tuple[str, ...] | None) -> Iterator[RecordChunk]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except pa.ArrowInvalid as error:
        raise ConfigError(f"Cannot read Parquet file {path}: {error}") from None
    columns = parquet.schema_arrow.names
    numbered = _numbered_columns(columns) if "features" not in columns and not feature_names else []
    row = 0
    for record_batch in parquet.iter_batches(batch_size=chunk_size):
        chunk = RecordChunk([], list(range(row, row + record_batch.num_rows)))
        for position, document in enumerate(record_batch.to_pylist()):
            if numbered:
                document["features"] = [document.pop(column) for column in numbered]
            try:
                value = _dumps_row(document, default=_parquet_cell)
            except (TypeError, ValueError) as error:  # orjson's and json's encode errors, and UnicodeDecodeError
                cause = error if isinstance(error, UnicodeDecodeError) else error.__cause__
                if isinstance(cause, UnicodeDecodeError):
                    chunk.invalid[position] = (errors.INVALID_UTF8, "Invalid cell: binary data that is not UTF-8")
                else:
                    chunk.invalid[position] = (errors.INVALID_JSON, f"Invalid cell: {error}")
                value = str(document).encode("utf-8", "replace")
            chunk.values.append(value)
        yield chunk
        row += record_batch.num_rows


def staging_path(path: Path) -> Path:
    """Return the temporary name beside ``path`` under which an output file is written until it is complete."""
    return path.with_name(f".{path.name}.{os.getpid()}.partial")


class StagedFile:
    """A binary file that replaces ``path`` only on ``commit()``; ``discard()`` removes what was written.

    The data goes to a temporary file beside ``path`` until then, so a run that fails part way (a missing
    input, an error, Ctrl-C) leaves an earlier file at ``path`` as it was. Used as a context
    manager, it commits on success and discards on an exception.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise ConfigError(f"Cannot write {self.path}: it is a directory")
        self._staging = staging_path(self.path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # The open temporary file, for writers that take a file object, such as pyarrow's.
            self.file = self._staging.open("wb")
        except OSError as error:
            raise ConfigError(f"Cannot write {self.path}: {error.strerror}") from None

    def write(self, data: bytes) -> None:
        self.file.write(data)

    def commit(self) -> None:
        self.file.close()
        os.replace(self._staging, self.path)

    def discard(self) -> None:
        self.file.close()
        self._staging.unlink(missing_ok=True)

    def __enter__(self) -> StagedFile:
        return self

    def __exit__(self, exc_type, *exc_info) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()


class OutputWriter:
    """Write encoded JSON records to a JSON Lines or Parquet file.

    The records go to a ``StagedFile``: ``close()`` moves it to the path and ``discard()`` removes it, so an
    existing file at the path changes only when a run completes. Used as a context manager, the writer
    closes on success and discards on an exception.
    """

    def __init__(self, path: str | Path, parquet_rows_per_group: int = 65536) -> None:
        self.path = Path(path)
        self._lines = _suffix(self.path, OUTPUT_SUFFIXES, "output") != ".parquet"
        self._staged = StagedFile(self.path)
        self._rows_per_group = parquet_rows_per_group
        self._pending: list[dict] = []
        self._parquet_writer = None
        self.count = 0

    @property
    def writes_lines(self) -> bool:
        """Return whether the file is JSON Lines, which ``write_lines`` accepts directly."""
        return self._lines

    def write_lines(self, count: int, lines: bytes) -> None:
        """Append ``count`` records already encoded as JSON Lines, each ending in a newline."""
        if not self._lines:
            raise ValueError(f"{self.path} is a Parquet file: write encoded records with write()")
        self.count += count
        self._staged.write(lines)

    def write(self, values: list[bytes]) -> None:
        self.count += len(values)
        if self._lines:
            if values:
                self._staged.write(b"\n".join(values) + b"\n")
            return
        self._pending.extend(self._parquet_row(orjson.loads(value)) for value in values)
        if len(self._pending) >= self._rows_per_group:
            self._flush_parquet()

    @staticmethod
    def _parquet_row(document: dict) -> dict:
        # Every row has a target column, null where the event had none, so that the file's schema keeps the
        # targets of later rows.
        target = document.get("target")
        document["target"] = [target] if target is not None and not isinstance(target, list) else target
        return document

    def _flush_parquet(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self._pending:
            return
        if self._parquet_writer is None:
            # The file has one schema. Inferred from the first rows alone, it would take whole-number
            # targets for integers and missing timestamps for nulls, which later rows may not fit.
            fixed = {"ts": pa.int64(), "step": pa.int64(), "prediction": pa.list_(pa.float64()),
                     "target": pa.list_(pa.float64())}
            inferred = pa.Table.from_pylist(self._pending[:1]).schema
            schema = pa.schema([pa.field(field.name, fixed.get(field.name, field.type)) for field in inferred])
            self._parquet_writer = pq.ParquetWriter(self._staged.file, schema)
        self._parquet_writer.write_table(pa.Table.from_pylist(self._pending, schema=self._parquet_writer.schema))
        self._pending = []

    def close(self) -> None:
        """Finish the file and move it to its path; on failure, remove it and raise."""
        try:
            if not self._lines:
                self._flush_parquet()
                if self._parquet_writer is None:
                    import pyarrow as pa
                    import pyarrow.parquet as pq

                    pq.write_table(pa.table({"entity": pa.array([], pa.string())}), self._staged.file)
                else:
                    self._parquet_writer.close()  # writes the footer; the file stays open for commit()
            self._staged.commit()
        except BaseException:
            self._staged.discard()
            raise

    def discard(self) -> None:
        """Remove what was written; the file at the path, if any, stays as it was."""
        try:
            if self._parquet_writer is not None:
                self._parquet_writer.close()
        finally:
            self._staged.discard()

    def __enter__(self) -> OutputWriter:
        return self

    def __exit__(self, exc_type, *exc_info) -> None:
        if exc_type is None:
            self.close()
        else:
            self.discard()


def read_outputs(path: str | Path) -> list[dict]:
    """Read an output file written by ``OutputWriter`` back into dicts."""
    path = Path(path)
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        # A null target is an event without one, which JSON Lines outputs leave out.
        return [{name: value for name, value in row.items() if name != "target" or value is not None}
                for row in pq.read_table(path).to_pylist()]
    with path.open("rb") as file:
        return [orjson.loads(line) for line in io.BufferedReader(file) if line.strip()]
