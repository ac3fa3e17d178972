"""The changelog record codec: one entity's state as bytes, and batches of records back into arrays.

Value layout (little-endian), format version 1::

    version     u8     1
    semantics   u8     0 = stateful (h, c), 1 = window (ring buffer of inputs)
    fingerprint 8 B    the model fingerprint's 16 hex digits as raw bytes
    steps       i64    events applied since the entity's last reset
    last_offset i64    offset of the last event applied to the state
    last_ts_ms  i64    event time of the last event (i64 minimum when unknown)
    rows        f32[]  the arena rows in state-name order (h then c, each num_layers x hidden_size)

The key is the entity id as UTF-8. A tombstone (null value) deletes the entity.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from streamer.errors import StateError

FORMAT_VERSION = 1
SEMANTICS_CODES = {"stateful": 0, "window": 1}
_HEADER = struct.Struct("<BB8sqqq")
HEADER_BYTES = _HEADER.size


def changelog_topic(group_id: str) -> str:
    return f"{group_id}-state-changelog"


@dataclass
class StateRecords:
    """Decoded changelog records of one batch, as columns; ``rows`` is (n, floats per entity)."""

    entities: list[str]
    fingerprints: list[str]
    steps: np.ndarray
    last_offsets: np.ndarray
    last_ts_ms: np.ndarray
    rows: np.ndarray


class StateCodec:
    """Encode and decode state records for one model and semantics."""

    def __init__(self, row_shapes: dict[str, tuple[int, ...]], semantics: str) -> None:
        self.row_shapes = dict(row_shapes)
        self.semantics_code = SEMANTICS_CODES[semantics]
        self.floats = sum(int(np.prod(shape)) for shape in self.row_shapes.values())
        self.record_bytes = HEADER_BYTES + 4 * self.floats
        self._dtype = np.dtype([("version", "u1"), ("semantics", "u1"), ("fingerprint", "S8"), ("steps", "<i8"),
                                ("last_offset", "<i8"), ("last_ts_ms", "<i8"), ("rows", "<f4", (self.floats,))])

    def encode(self, fingerprint: str, steps: np.ndarray, last_offsets: np.ndarray, last_ts_ms: np.ndarray,
               rows: np.ndarray) -> list[bytes]:
        """Encode n records; ``rows`` is (n, floats per entity) float32, copied into the values."""
        n = steps.size
        packed = np.empty(n, self._dtype)
        packed["version"] = FORMAT_VERSION
        packed["semantics"] = self.semantics_code
        packed["fingerprint"] = bytes.fromhex(fingerprint)
        packed["steps"] = steps
        packed["last_offset"] = last_offsets
        packed["last_ts_ms"] = last_ts_ms
        packed["rows"] = rows.reshape(n, self.floats)
        raw = packed.tobytes()
        size = self.record_bytes
        return [raw[i * size:(i + 1) * size] for i in range(n)]

    def decode(self, entities: list[str], values: list[bytes]
               ) -> tuple[StateRecords, list[tuple[str, str]], list[str]]:
        """Decode records into the valid ones, ``(entity, reason)`` per invalid one and other models' entities.

        A record of another model has a header of this format, with another semantics, or with this
        semantics and another length.
        """
        invalid: list[tuple[str, str]] = []
        other_models: list[str] = []
        good = [i for i, value in enumerate(values) if len(value) == self.record_bytes]
        for i in sorted(set(range(len(values))) - set(good)):
            value = values[i]
            rows_bytes = len(value) - HEADER_BYTES
            if rows_bytes > 0 and rows_bytes % 4 == 0 and value[0] == FORMAT_VERSION and \
                    value[1] in SEMANTICS_CODES.values():
                other_models.append(entities[i])
            else:
                invalid.append((entities[i], f"truncated or foreign record of {len(value)} bytes, "
                                             f"expected {self.record_bytes}"))
        packed = np.frombuffer(b"".join(values[i] for i in good), self._dtype)
        ok = (packed["version"] == FORMAT_VERSION) & (packed["semantics"] == self.semantics_code)
        other_semantics = (packed["version"] == FORMAT_VERSION) & ~ok & \
            np.isin(packed["semantics"], list(SEMANTICS_CODES.values()))
        for position in np.flatnonzero(other_semantics).tolist():
            other_models.append(entities[good[position]])
        for position in np.flatnonzero(~ok & ~other_semantics).tolist():
            invalid.append((entities[good[position]], "unsupported format version or semantics"))
        packed = packed[ok]
        kept = [entities[good[position]] for position in np.flatnonzero(ok).tolist()]
        records = StateRecords(
            entities=kept,
            fingerprints=[raw.hex() for raw in packed["fingerprint"].tolist()],
            steps=packed["steps"].astype(np.int64),
            last_offsets=packed["last_offset"].astype(np.int64),
            last_ts_ms=packed["last_ts_ms"].astype(np.int64),
            rows=np.ascontiguousarray(packed["rows"]),
        )
        return records, invalid, other_models

    def split_rows(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Split (n, floats) rows into arrays per state name with the arena's row shapes."""
        out, start = {}, 0
        for name, shape in self.row_shapes.items():
            size = int(np.prod(shape))
            out[name] = rows[:, start:start + size].reshape(rows.shape[0], *shape)
            start += size
        if start != self.floats:
            raise StateError(f"Invalid state rows: expected {self.floats} floats per entity, got {start}")
        return out
