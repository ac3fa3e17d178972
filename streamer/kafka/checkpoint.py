"""Checkpoints: making outputs, entity state and input offsets durable, in that order."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

import numpy as np
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.structs import OffsetAndMetadata

from streamer.kafka.producer import send_records
from streamer.metrics import StreamerMetrics
from streamer.state.arena import StateArena
from streamer.state.changelog import StateCodec

logger = logging.getLogger(__name__)


class Checkpointer:
    """Tracks what the service processed since the last checkpoint and makes it durable.

    At-least-once: the outputs of every batch are acknowledged before anything else. Then the checkpoint
    writes the changelog, waits for its acknowledgements and commits the input offsets. A crash between any two
    steps replays events whose state is either not in the changelog yet (they are applied again) or already
    in it (the idempotent advance skips them).

    Exactly-once: one transaction spans everything produced since the last checkpoint: outputs, dead
    letters, changelog records and the input offsets. Consumers that read with read_committed see all of a
    checkpoint or nothing of it.
    """

    def __init__(self, *, producer: AIOKafkaProducer, consumer: AIOKafkaConsumer, arena: StateArena,
                 codec: StateCodec | None, fingerprint: str, changelog_topic: str | None, group_id: str,
                 exactly_once: bool, metrics: StreamerMetrics, interval_ms: int, max_events: int,
                 timeout_s: float) -> None:
        self.producer = producer
        self.consumer = consumer
        self.arena = arena
        self.codec = codec
        self.fingerprint = fingerprint
        self.changelog_topic = changelog_topic
        self.group_id = group_id
        self.exactly_once = exactly_once
        self.metrics = metrics
        self.interval_s = interval_ms / 1000
        self.max_events = max_events
        self.timeout_s = timeout_s
        self.pending_offsets: dict[TopicPartition, int] = {}
        self.pending_events = 0
        self.pending_event_times_ms: list[np.ndarray] = []
        self._last_checkpoint = time.monotonic()
        self.in_transaction = False

    async def begin(self) -> None:
        """Open the checkpoint's transaction before the first record is produced (exactly-once only)."""
        if self.exactly_once and not self.in_transaction:
            await self.producer.begin_transaction()
            self.in_transaction = True

    def record_batch(self, next_offsets: dict[TopicPartition, int], events: int,
                     event_times_ms: np.ndarray | None = None) -> None:
        """Remember a processed batch: its next offsets and, for exactly-once, its event times for latency."""
        self.pending_offsets.update(next_offsets)
        self.pending_events += events
        if event_times_ms is not None and event_times_ms.size:
            self.pending_event_times_ms.append(event_times_ms)

    def due(self) -> bool:
        if not self.pending_offsets and not self.in_transaction:
            return False
        return (self.pending_events >= self.max_events
                or time.monotonic() - self._last_checkpoint >= self.interval_s)

    async def checkpoint(self, owned: Callable[[TopicPartition], bool]) -> None:
        """Make everything since the last checkpoint durable.

        1. Outputs acknowledged: for at-least-once the service waits for every in-flight batch before calling
           this; exactly-once keeps them in the open transaction.
        2. Changelog records for the entities changed since the last checkpoint, and tombstones for the
           entities removed by eviction or expiry, each to the partition their events come from.
        3. Flush: at-least-once waits for the changelog acknowledgements; exactly-once adds the input
           offsets to the transaction.
        4. Commit: at-least-once commits the input offsets; exactly-once commits the transaction.
        """
        started = time.perf_counter()
        offsets = {tp: offset for tp, offset in self.pending_offsets.items() if owned(tp)}
        await self.begin()
        written = self.arena.dirty_slots()
        try:
            await self._make_durable(offsets, written)
        except BaseException:
            # Nothing of this checkpoint is known to be durable: write these states again next time.
            self.arena.dirty[written[self.arena.occupied[written]]] = True
            raise
        if offsets:
            self.metrics.commits.inc()
        self.metrics.checkpoints.inc()
        self.metrics.checkpoint_duration_seconds.observe(time.perf_counter() - started)
        self.pending_offsets.clear()
        self.pending_events = 0
        self._last_checkpoint = time.monotonic()

    async def _make_durable(self, offsets: dict[TopicPartition, int], slots: np.ndarray) -> None:
        # Step 2
        futures = await self._write_changelog(slots)
        # Step 3
        if self.exactly_once:
            if offsets:
                await asyncio.wait_for(self.producer.send_offsets_to_transaction(
                    {tp: OffsetAndMetadata(offset, "") for tp, offset in offsets.items()}, self.group_id),
                    self.timeout_s)
        elif futures:
            await asyncio.wait_for(asyncio.gather(*futures), self.timeout_s)
        # Step 4
        if self.exactly_once:
            await asyncio.wait_for(self.producer.commit_transaction(), self.timeout_s)
            self.in_transaction = False
            self._observe_transaction_latency()
        elif offsets:
            await asyncio.wait_for(self.consumer.commit(offsets), self.timeout_s)

    async def _write_changelog(self, slots: np.ndarray) -> list[asyncio.Future]:
        arena = self.arena
        removed = arena.drain_removed()
        if self.changelog_topic is None or self.codec is None:
            return []
        records: list[tuple[int, bytes, bytes | None]] = []
        if slots.size:
            values = self.codec.encode(self.fingerprint, arena.steps[slots], arena.last_offset[slots],
                                       arena.last_event_ms[slots], arena.export_rows(slots))
            partitions = arena.partition[slots].tolist()
            records = [(partitions[i], arena.entity_of(slot).encode(), values[i])
                       for i, slot in enumerate(slots.tolist())]
            arena.dirty[slots] = False
        # Tombstones for entities dropped from memory by capacity or idle expiry; revoked partitions keep
        # their changelog state for the next owner.
        records += [(entity.partition, entity.entity.encode(), None) for entity in removed
                    if entity.reason in ("evicted", "expired") and entity.partition >= 0]
        if not records:
            return []
        self.metrics.changelog_records.inc(len(records))
        return await send_records(self.producer, self.changelog_topic, records)

    def _observe_transaction_latency(self) -> None:
        if self.pending_event_times_ms:
            times = np.concatenate(self.pending_event_times_ms)
            self.metrics.observe_latencies(np.maximum(0.0, (time.time() * 1000 - times) / 1000.0))
            self.pending_event_times_ms = []

    async def abort(self) -> None:
        """Abort the open transaction, if any; its outputs, changelog records and offsets are discarded."""
        self.pending_offsets.clear()
        self.pending_events = 0
        self.pending_event_times_ms = []
        if self.in_transaction:
            self.in_transaction = False
            await asyncio.wait_for(self.producer.abort_transaction(), self.timeout_s)
