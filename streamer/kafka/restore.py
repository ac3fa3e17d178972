"""Restoring one partition's entity states from the changelog topic before the partition is processed."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import numpy as np
from aiokafka import AIOKafkaConsumer, TopicPartition

from streamer.errors import StateError
from streamer.kafka.admin import TOPIC_MAX_MESSAGE_BYTES
from streamer.kafka.security import PLAINTEXT, KafkaSecurity
from streamer.state.arena import StateArena
from streamer.state.changelog import StateCodec

logger = logging.getLogger(__name__)

PROGRESS_LOG_INTERVAL_S = 10.0
STALLED_POLLS = 20  # empty polls (500 ms each) below the end offset before a restore stops early
# The differences a state record's fingerprint covers, named in messages about another model's state.
OTHER_MODEL_CAUSES = "other weights or manifest, another semantics, or in window semantics another window length"
STABLE_OFFSET_TIMEOUT_S = 120.0  # well above the transaction timeout the service sets (15 s)


@dataclass
class RestoreResult:
    """Counts of one partition's restore; ``anomalies`` counts each kind of defined fault met."""

    partition: int
    records: int = 0
    entities: int = 0
    tombstones: int = 0
    duration_s: float = 0.0
    end_offset: int = 0
    anomalies: dict[str, int] = field(default_factory=dict)

    def count(self, kind: str, amount: int = 1) -> None:
        self.anomalies[kind] = self.anomalies.get(kind, 0) + amount


async def restore_partition(*, bootstrap_servers: str, topic: str, partition: int, codec: StateCodec,
                            arena: StateArena, fingerprint: str, mismatch_policy: str,
                            request_timeout_ms: int = 10_000, start_offset: int | None = None,
                            security: KafkaSecurity = PLAINTEXT) -> RestoreResult:
    """Load the latest state of every entity of ``partition`` from the changelog into ``arena``.

    Records are read with read_committed up to the end offset found at the start, so states of aborted
    transactions are never loaded and the transaction markers at the log's end are skipped. A later record
    of an entity replaces an earlier one and a tombstone removes it. Records that cannot be decoded are
    skipped and counted (``invalid_record``). A record of another model is skipped and counted
    (``model_mismatch``) under the ``reset`` policy and raises ``StateError`` under ``fail``.
    ``start_offset`` (from a snapshot) skips the records the snapshot already covers. ``entities`` in the
    result counts every entity of the partition in ``arena`` afterwards, those of the snapshot included.
    """
    result = RestoreResult(partition)
    started = time.monotonic()
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap_servers, **security.client_options(),
                                enable_auto_commit=False, isolation_level="read_committed",
                                auto_offset_reset="earliest",
                                max_partition_fetch_bytes=TOPIC_MAX_MESSAGE_BYTES, fetch_max_bytes=64 << 20,
                                request_timeout_ms=max(request_timeout_ms, 40_000))
    await consumer.start()
    try:
        tp = TopicPartition(topic, partition)
        # The offsets are looked up before the partition is assigned. An assigned partition without records
        # keeps a Fetch waiting at the broker for fetch_max_wait_ms, and offset requests queue behind it.
        result.end_offset = await _stable_end_offset(consumer, tp, bootstrap_servers, request_timeout_ms, security)
        beginning = (await consumer.beginning_offsets([tp]))[tp]
        first_offset = beginning
        if start_offset is not None and start_offset >= beginning:
            first_offset = min(start_offset, result.end_offset)
        if first_offset < result.end_offset:
            consumer.assign([tp])
            consumer.seek(tp, first_offset)
            await _read_until_end(consumer, tp, result, codec, arena, fingerprint, mismatch_policy, started)
    finally:
        await consumer.stop()
    result.entities = len(arena.occupied_slots(partition))
    result.duration_s = time.monotonic() - started
    return result


async def _stable_end_offset(consumer: AIOKafkaConsumer, tp: TopicPartition, bootstrap_servers: str,
                             request_timeout_ms: int, security: KafkaSecurity) -> int:
    """Wait until no open transaction holds back the partition, then return its end offset.

    A read_committed consumer sees records only below the last stable offset, which an open transaction of
    a crashed member keeps low until the broker aborts it (after the producer's transaction timeout). States
    committed above that offset by later owners must be restored too, so the restore reads to the high
    watermark once the last stable offset has reached it.
    """
    reader = AIOKafkaConsumer(bootstrap_servers=bootstrap_servers, **security.client_options(),
                              enable_auto_commit=False,
                              isolation_level="read_uncommitted", request_timeout_ms=max(request_timeout_ms, 40_000))
    await reader.start()
    try:
        high_watermark = (await reader.end_offsets([tp]))[tp]
    finally:
        await reader.stop()
    deadline = time.monotonic() + STABLE_OFFSET_TIMEOUT_S
    warned = False
    while (stable := (await consumer.end_offsets([tp]))[tp]) < high_watermark:
        if time.monotonic() > deadline:
            raise asyncio.TimeoutError(f"{tp} stayed behind an open transaction for {STABLE_OFFSET_TIMEOUT_S} s")
        if not warned:
            logger.info("Restore of %s waits for an open transaction to end (stable offset %d, end %d)", tp,
                        stable, high_watermark)
            warned = True
        await asyncio.sleep(0.5)
    return high_watermark


async def _read_until_end(consumer, tp, result, codec, arena, fingerprint, mismatch_policy, started) -> None:
    last_log = time.monotonic()
    stalled = 0
    while await consumer.position(tp) < result.end_offset:
        fetched = (await consumer.getmany(tp, timeout_ms=500, max_records=65536)).get(tp, [])
        if not fetched:
            stalled += 1
            if stalled >= STALLED_POLLS:
                position = await consumer.position(tp)
                logger.warning("Restore of %s stopped at offset %d below the end offset %d: no more records",
                               tp, position, result.end_offset)
                result.count("incomplete_read")
                return
            continue
        stalled = 0
        latest = {message.key: message.value for message in fetched if message.key is not None}
        result.records += len(fetched)
        _apply(latest, tp.partition, result, codec, arena, fingerprint, mismatch_policy)
        if time.monotonic() - last_log >= PROGRESS_LOG_INTERVAL_S:
            last_log = time.monotonic()
            logger.info("Restoring %s: %d/%d records read, %d entities, %.0f s", tp, result.records,
                        result.end_offset, result.entities, last_log - started)
        await asyncio.sleep(0)


def _apply(latest: dict[bytes, bytes | None], partition: int, result: RestoreResult, codec: StateCodec,
           arena: StateArena, fingerprint: str, mismatch_policy: str) -> None:
    deleted = [key.decode("utf-8", "replace") for key, value in latest.items() if value is None]
    if deleted:
        arena.remove_entities(deleted, "tombstone")
        result.tombstones += len(deleted)
    entities = [key.decode("utf-8", "replace") for key, value in latest.items() if value is not None]
    values = [value for value in latest.values() if value is not None]
    if not values:
        return
    records, invalid, other_models = codec.decode(entities, values)
    if invalid:
        result.count("invalid_record", len(invalid))
        arena.remove_entities([entity for entity, _ in invalid], "invalid")
        logger.warning("Skipped %d invalid changelog records of partition %d, first: %s: %s", len(invalid),
                       partition, invalid[0][0], invalid[0][1])
    matches = np.array([record_fingerprint == fingerprint for record_fingerprint in records.fingerprints], bool)
    if other_models or not matches.all():
        mismatched = other_models + [entity for entity, ok in zip(records.entities, matches) if not ok]
        if mismatch_policy == "fail":
            raise StateError(
                f"Changelog partition {partition} contains state of another model for {len(mismatched)} entities "
                f"(first: {mismatched[0]}): {OTHER_MODEL_CAUSES}; start with --model-mismatch reset to discard it")
        result.count("model_mismatch", len(mismatched))
        arena.remove_entities(mismatched, "model_mismatch")
    keep = np.flatnonzero(matches)
    if keep.size:
        names = [records.entities[i] for i in keep.tolist()]
        arena.load(names, partition, records.steps[keep], records.last_offsets[keep], records.last_ts_ms[keep],
                   codec.split_rows(records.rows[keep]))
        result.entities = len(arena.occupied_slots(partition))
