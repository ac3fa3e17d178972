"""Decoding and validating input records into event batches.

Every record either becomes an event or a dead letter with a reason code; a bad record never reaches the
engine, so it cannot change any entity's state.
"""

from __future__ import annotations

import json
import math
from itertools import chain
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Sequence

import numpy as np
import orjson

from streamer import errors
from streamer.engine.batch import EventBatch
from streamer.engine.gc_pause import paused_gc
from streamer.errors import InvalidEventError
from streamer.state.arena import NO_TIME

DEFAULT_MAX_RECORD_BYTES = 1_048_576  # Kafka's default max.message.bytes is about 1 MB as well
_FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclass(frozen=True)
class EventFormat:
    """Field names of input events and the limits they are checked against."""

    input_size: int
    feature_names: tuple[str, ...] | None = None
    entity_field: str = "entity"
    ts_field: str = "ts"
    features_field: str = "features"
    reset_field: str = "reset"
    target_field: str = "target"
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES
    # Number of model outputs a target must match; None accepts targets of any length.
    output_size: int | None = None


@dataclass(frozen=True)
class DeadLetter:
    """A record that could not become an event. ``index`` is its position in the decoded input."""

    index: int
    key: bytes | None
    value: bytes | None
    reason: str
    message: str


def parse_json(value: bytes) -> Any:
    """Parse with orjson; on failure, find the precise reason with the standard library parser.

    orjson rejects NaN, Infinity and numbers that overflow a double, which Python's ``json.dumps`` writes
    for non-finite floats. The standard parser reads them as floats, so that the check of the field that
    holds one names the reason (a non-finite feature, target or timestamp), and a field the event does not
    use may hold one.
    """
    try:
        return orjson.loads(value)
    except orjson.JSONDecodeError as error:
        try:
            text = value.decode("utf-8")
        except UnicodeDecodeError as decode_error:
            raise InvalidEventError(f"Invalid UTF-8 at byte {decode_error.start}",
                                    reason=errors.INVALID_UTF8) from None
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            raise InvalidEventError(f"Invalid JSON: {error}", reason=errors.INVALID_JSON) from None


# Larger epoch times are rejected, so that every accepted one and sums of two of them fit in an int64.
MAX_ABS_TIMESTAMP_MS = 2**62


def parse_timestamp_ms(value: Any) -> int:
    """Convert epoch milliseconds (a number) or an ISO-8601 string to epoch milliseconds."""
    if isinstance(value, bool):
        raise InvalidEventError(f"Invalid timestamp {value!r}: expected epoch milliseconds or ISO-8601",
                                reason=errors.INVALID_TIMESTAMP)
    if isinstance(value, int) and abs(value) < MAX_ABS_TIMESTAMP_MS:
        return value
    if isinstance(value, float) and math.isfinite(value) and abs(value) < MAX_ABS_TIMESTAMP_MS:
        return int(value)
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            raise InvalidEventError(f"Invalid timestamp {value[:64]!r}: expected epoch milliseconds or ISO-8601",
                                    reason=errors.INVALID_TIMESTAMP) from None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=timezone.utc)
        return int(parsed.timestamp() * 1000)
    raise InvalidEventError(f"Invalid timestamp {str(value)[:64]}: expected epoch milliseconds or ISO-8601",
                            reason=errors.INVALID_TIMESTAMP)


def _is_number(value: Any) -> bool:
    kind = type(value)
    return kind is float or kind is int


class EventDecoder:
    """Turn raw records (key, value, record timestamp) into an ``EventBatch`` plus dead letters."""

    def __init__(self, event_format: EventFormat) -> None:
        self.format = event_format

    def decode_record(self, key: bytes | None, value: bytes | None, timestamp_ms: int | None
                      ) -> tuple[str, list, int, bool, Any]:
        """Validate one record and return (entity, features, ts_ms, reset, target); raise InvalidEventError."""
        fmt = self.format
        if value is None:
            raise InvalidEventError("Missing value: the record is a tombstone", reason=errors.NOT_AN_OBJECT)
        if len(value) > fmt.max_record_bytes:
            raise InvalidEventError(f"Record of {len(value)} bytes exceeds the limit of {fmt.max_record_bytes} bytes",
                                    reason=errors.RECORD_TOO_LARGE)
        document = parse_json(value)
        if type(document) is not dict:
            raise InvalidEventError(f"Invalid event: expected a JSON object, got {type(document).__name__}",
                                    reason=errors.NOT_AN_OBJECT)
        entity = self._entity(key, document)
        features = self._features(document)
        ts_ms = self._timestamp(document, timestamp_ms)
        reset = document.get(fmt.reset_field)
        if reset is None:
            reset = False
        elif type(reset) is not bool:
            raise InvalidEventError(f"Invalid reset {str(reset)[:32]!r}: expected true or false",
                                    reason=errors.INVALID_RESET)
        target = document.get(fmt.target_field)
        if target is not None:
            self._check_target(target)
        return entity, features, ts_ms, reset, target

    def _entity(self, key: bytes | None, document: dict) -> str:
        if key:
            try:
                return key.decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidEventError("Invalid entity: the record key is not valid UTF-8",
                                        reason=errors.INVALID_ENTITY) from None
        entity = document.get(self.format.entity_field)
        if entity is None:
            raise InvalidEventError(f"Missing entity: no record key and no {self.format.entity_field!r} field",
                                    reason=errors.MISSING_ENTITY)
        if type(entity) is int:
            return str(entity)
        if type(entity) is float:
            # orjson decodes integers beyond 64 bits as floats, so the text of the record is not recoverable here.
            raise InvalidEventError(f"Invalid entity {entity!r}: expected a non-empty string or an integer of at "
                                    "most 64 bits; write larger ids as strings", reason=errors.INVALID_ENTITY)
        if type(entity) is not str or not entity:
            raise InvalidEventError(f"Invalid entity {str(entity)[:64]!r}: expected a non-empty string",
                                    reason=errors.INVALID_ENTITY)
        if not entity.isascii():
            # The standard parser, the fallback when orjson rejects a record, accepts escaped lone surrogates
            # ("\ud800"), which no output can encode as UTF-8.
            try:
                entity.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidEventError(f"Invalid entity {entity[:64]!r}: contains an unpaired UTF-16 surrogate",
                                        reason=errors.INVALID_ENTITY) from None
        return entity

    def _features(self, document: dict) -> list:
        fmt = self.format
        if fmt.feature_names is not None and fmt.features_field not in document:
            missing = [name for name in fmt.feature_names if name not in document]
            if missing:
                raise InvalidEventError(f"Missing feature fields {missing}", reason=errors.MISSING_FEATURES)
            features = [document[name] for name in fmt.feature_names]
        else:
            features = document.get(fmt.features_field)
            if features is None:
                raise InvalidEventError(f"Missing {fmt.features_field!r}: expected a list of {fmt.input_size} numbers",
                                        reason=errors.MISSING_FEATURES)
            if type(features) is not list:
                raise InvalidEventError(
                    f"Invalid {fmt.features_field!r}: expected a list of {fmt.input_size} numbers, "
                    f"got {type(features).__name__}", reason=errors.INVALID_FEATURES)
            if len(features) != fmt.input_size:
                raise InvalidEventError(f"Wrong feature count: expected {fmt.input_size}, got {len(features)}",
                                        reason=errors.FEATURE_COUNT)
        if not all(map(_is_number, features)):
            bad = next(value for value in features if not _is_number(value))
            raise InvalidEventError(f"Invalid feature value {json.dumps(bad)[:32]}: expected a number",
                                    reason=errors.INVALID_FEATURES)
        return features

    def _timestamp(self, document: dict, timestamp_ms: int | None) -> int:
        ts = document.get(self.format.ts_field)
        if ts is not None:
            return parse_timestamp_ms(ts)
        return NO_TIME if timestamp_ms is None else timestamp_ms

    def _check_target(self, target: Any) -> None:
        values = target if type(target) is list else [target]
        if not values or not all(_is_number(v) and math.isfinite(v) for v in values):
            raise InvalidEventError(f"Invalid target {str(target)[:64]}: expected a finite number or a list of them",
                                    reason=errors.INVALID_TARGET)
        size = self.format.output_size
        if size is not None and len(values) != size:
            raise InvalidEventError(f"Invalid target of {len(values)} values: the model has {size} outputs",
                                    reason=errors.INVALID_TARGET)

    def decode(self, keys: Sequence[bytes | None], values: Sequence[bytes | None],
               timestamps_ms: Sequence[int | None] | None, offsets: Sequence[int] | np.ndarray,
               partitions: Sequence[int] | np.ndarray | int = 0) -> tuple[EventBatch, list[DeadLetter]]:
        """Decode parallel columns of records; return the valid events and the dead letters.

        A batch whose records are all valid takes a vectorised path. Any batch in which that path finds
        something unexpected is decoded again record by record, which names each bad record's reason.
        """
        with paused_gc():
            columns = self._decode_valid_batch(keys, values, timestamps_ms)
            if columns is not None:
                entities, features, ts, resets, targets = columns
                kept = list(range(len(values)))
                return self._assemble(entities, features, ts, resets, targets, kept, keys, values, offsets,
                                      partitions, [])
            return self._decode_each(keys, values, timestamps_ms, offsets, partitions)

    def _decode_each(self, keys, values, timestamps_ms, offsets, partitions) -> tuple[EventBatch, list[DeadLetter]]:
        entities: list[str] = []
        rows: list[list] = []
        ts: list[int] = []
        resets: list[bool] = []
        targets: list[Any] = []
        kept: list[int] = []
        dead: list[DeadLetter] = []
        for index, value in enumerate(values):
            key = keys[index]
            try:
                entity, features, ts_ms, reset, target = self.decode_record(
                    key, value, None if timestamps_ms is None else timestamps_ms[index])
            except InvalidEventError as error:
                dead.append(DeadLetter(index, key, value, error.reason, str(error)))
                continue
            entities.append(entity)
            rows.append(features)
            ts.append(ts_ms)
            resets.append(reset)
            targets.append(target)
            kept.append(index)
        return self._assemble(entities, rows, ts, resets, targets, kept, keys, values, offsets, partitions, dead)

    def _decode_valid_batch(self, keys, values, timestamps_ms) -> tuple | None:
        """Decode a batch column by column, or return None at the first sign of an invalid record.

        Every check of ``decode_record`` is repeated here on whole columns, so this path accepts exactly the
        batches in which ``decode_record`` would accept every record, and gives the same events.
        """
        fmt = self.format
        try:
            if not values or max(map(len, values)) > fmt.max_record_bytes:
                return None
            documents = [orjson.loads(value) for value in values]
        except (orjson.JSONDecodeError, TypeError):
            return None
        if set(map(type, documents)) != {dict}:
            return None
        entities = self._entity_column(keys, documents)
        if entities is None:
            return None
        features = self._feature_column(documents)
        if features is None:
            return None
        ts = self._timestamp_column(documents, timestamps_ms)
        if ts is None:
            return None
        resets = [document.get(fmt.reset_field) for document in documents]
        if not set(map(type, resets)) <= {bool, type(None)}:
            return None
        targets = [document.get(fmt.target_field) for document in documents]
        try:
            for target in targets:
                if target is not None:
                    self._check_target(target)
        except InvalidEventError:
            return None
        return entities, features, ts, [reset is True for reset in resets], targets

    def _entity_column(self, keys, documents: list[dict]) -> list[str] | None:
        present = [bool(key) for key in keys]
        if all(present):
            try:
                return [key.decode("utf-8") for key in keys]
            except UnicodeDecodeError:
                return None
        if any(present):
            return None
        entities = [document.get(self.format.entity_field) for document in documents]
        if set(map(type, entities)) != {str} or not all(entities):
            return None
        return entities

    def _feature_column(self, documents: list[dict]) -> list[list] | None:
        fmt = self.format
        rows = [document.get(fmt.features_field) for document in documents]
        if fmt.feature_names is not None and None in rows:
            names = fmt.feature_names
            if not all(all(name in document for name in names) for document in documents if fmt.features_field
                       not in document):
                return None
            rows = [row if row is not None else [document[name] for name in names]
                    for row, document in zip(rows, documents)]
        if set(map(type, rows)) != {list} or set(map(len, rows)) != {fmt.input_size}:
            return None
        if not set(map(type, chain.from_iterable(rows))) <= {float, int}:
            return None
        return rows

    def _timestamp_column(self, documents: list[dict], timestamps_ms) -> list[int] | None:
        values = [document.get(self.format.ts_field) for document in documents]
        kinds = set(map(type, values))
        if kinds == {int} and max(map(abs, values)) < MAX_ABS_TIMESTAMP_MS:
            return values
        if not kinds <= {int, type(None)} or any(value is not None and abs(value) >= MAX_ABS_TIMESTAMP_MS
                                                 for value in values):
            return None  # ISO-8601 strings, floats and out-of-range numbers take the per-record path
        record_times = [None] * len(values) if timestamps_ms is None else timestamps_ms
        return [value if value is not None else (NO_TIME if record_time is None else record_time)
                for value, record_time in zip(values, record_times)]

    def _assemble(self, entities, rows, ts, resets, targets, kept, keys, values, offsets, partitions, dead
                  ) -> tuple[EventBatch, list[DeadLetter]]:
        features = np.array(rows, np.float64).reshape(len(rows), self.format.input_size)
        finite = np.isfinite(features).all(axis=1) & (np.abs(features) <= _FLOAT32_MAX).all(axis=1)
        keep = np.asarray(kept, np.int64)
        if not finite.all():
            for position in np.flatnonzero(~finite).tolist():
                index = kept[position]
                row = features[position]
                bad = row[~(np.isfinite(row) & (np.abs(row) <= _FLOAT32_MAX))][0]
                dead.append(DeadLetter(index, keys[index], values[index], errors.NON_FINITE_FEATURE,
                                       f"Invalid feature {float(bad)!r}: not a finite float32 number"))
            dead.sort(key=lambda letter: letter.index)
            entities = [entity for entity, ok in zip(entities, finite) if ok]
            targets = [target for target, ok in zip(targets, finite) if ok]
            features, keep = features[finite], keep[finite]
            ts = np.asarray(ts, np.int64)[finite]
            resets = np.asarray(resets, bool)[finite]
        offsets = np.asarray(offsets, np.int64)
        partition_column = (np.full(keep.size, partitions, np.int32) if np.isscalar(partitions)
                            else np.asarray(partitions, np.int32)[keep])
        batch = EventBatch(
            entities=entities,
            features=features.astype(np.float32),
            ts_ms=np.asarray(ts, np.int64),
            resets=np.asarray(resets, bool),
            offsets=offsets[keep] if keep.size else np.zeros(0, np.int64),
            partitions=partition_column,
            targets=targets if any(target is not None for target in targets) else None,
            record_index=keep,
        )
        return batch, dead
