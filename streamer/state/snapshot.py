"""Local snapshots: one file per changelog partition with its entities' states and the offset they cover.

A restore loads the snapshot, then reads the changelog only from ``next_offset``. The file is written to a
temporary name, flushed with fsync and renamed, so a crash leaves either the old or the new snapshot.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from streamer.errors import StateError

logger = logging.getLogger(__name__)

SNAPSHOT_VERSION = 1
# Older snapshots are ignored: compaction may have removed tombstones (delete.retention.ms, 24 h by default)
# that the changelog tail after the snapshot would otherwise still contain.
MAX_SNAPSHOT_AGE_S = 12 * 3600


@dataclass
class Snapshot:
    """States of one changelog partition as of ``next_offset`` (the first changelog offset not covered)."""

    topic: str
    partition: int
    next_offset: int
    fingerprint: str
    semantics: str
    created_s: float
    entities: list[str]
    steps: np.ndarray
    last_offsets: np.ndarray
    last_ts_ms: np.ndarray
    rows: np.ndarray


def snapshot_path(directory: Path, topic: str, partition: int) -> Path:
    return Path(directory) / f"{topic}-{partition}.snapshot.npz"


def write_snapshot(directory: Path, snapshot: Snapshot) -> Path:
    """Write ``snapshot`` atomically and durably; return its path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = snapshot_path(directory, snapshot.topic, snapshot.partition)
    temporary = path.with_suffix(".tmp")
    encoded = [entity.encode("utf-8") for entity in snapshot.entities]
    header = {"version": SNAPSHOT_VERSION, "topic": snapshot.topic, "partition": snapshot.partition,
              "next_offset": snapshot.next_offset, "fingerprint": snapshot.fingerprint,
              "semantics": snapshot.semantics, "created_s": snapshot.created_s}
    with temporary.open("wb") as file:
        np.savez(file, header=np.frombuffer(json.dumps(header).encode(), np.uint8),
                 entity_bytes=np.frombuffer(b"".join(encoded), np.uint8),
                 entity_lengths=np.array([len(item) for item in encoded], np.int64),
                 steps=snapshot.steps, last_offsets=snapshot.last_offsets, last_ts_ms=snapshot.last_ts_ms,
                 rows=snapshot.rows)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
    directory_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(directory_fd)
    finally:
        os.close(directory_fd)
    return path


def read_snapshot(directory: Path, topic: str, partition: int) -> Snapshot | None:
    """Read the partition's snapshot; None when there is none or it cannot be used (the reason is logged)."""
    path = snapshot_path(directory, topic, partition)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            header = json.loads(data["header"].tobytes())
            lengths = data["entity_lengths"]
            blob = data["entity_bytes"].tobytes()
            bounds = np.concatenate([[0], np.cumsum(lengths)])
            entities = [blob[bounds[i]:bounds[i + 1]].decode("utf-8") for i in range(lengths.size)]
            snapshot = Snapshot(topic=header["topic"], partition=header["partition"],
                                next_offset=header["next_offset"], fingerprint=header["fingerprint"],
                                semantics=header["semantics"], created_s=header["created_s"], entities=entities,
                                steps=data["steps"], last_offsets=data["last_offsets"], last_ts_ms=data["last_ts_ms"],
                                rows=data["rows"])
        if header["version"] != SNAPSHOT_VERSION:
            raise StateError(f"unsupported snapshot version {header['version']}, expected {SNAPSHOT_VERSION}")
    except (OSError, ValueError, KeyError, StateError) as error:
        logger.warning("Ignoring unreadable snapshot %s: %s", path, error)
        return None
    if time.time() - snapshot.created_s > MAX_SNAPSHOT_AGE_S:
        logger.info("Ignoring snapshot %s: older than %d s", path, MAX_SNAPSHOT_AGE_S)
        return None
    return snapshot
