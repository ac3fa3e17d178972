"""Checkpoints: making outputs, entity state and input offsets durable, in that order."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

import numpy as np
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.structs import OffsetAndMetadata

from streamer.kafka.producer import send_records
from streamer.metrics import StreamerMetrics
from streamer.state.arena import StateArena
from streamer.state.changelog import StateCodec

logger = logging.getLogger(__name__)


@dataclass
class PreparedCheckpoint:
    """An at-least-once checkpoint captured at one moment: what ``Checkpointer.complete`` makes durable."""

    offsets: dict[TopicPartition, int]
    slots: np.ndarray
    records: list[tuple[int, bytes, bytes | None]]
    started: float
    # Committed offsets to commit again before the changelog records are written (see ``Checkpointer.fence``).
    fence: dict[TopicPartition, int]


class Checkpointer:
    """Tracks what the service processed since the last checkpoint and makes it durable.

    At-least-once: the outputs of every batch are acknowledged before anything else. Then the checkpoint
    writes the changelog, waits for its acknowledgements and commits the input offsets. A crash between any two
    steps replays events whose state is either not in the changelog yet (they are applied again) or already
    in it (the idempotent advance skips them). ``prepare`` captures such a checkpoint at one moment and
    ``complete`` runs its steps, so the service can keep processing while a checkpoint completes.

    Exactly-once: one transaction spans everything produced since the last checkpoint: outputs, dead
    letters, changelog records and the input offsets. Consumers that read with read_committed see all of a
    checkpoint or nothing of it.

    Under both guarantees a checkpoint first checks that this member still belongs to the group's current
    generation (``fence``). A member that stalled for longer than its session timeout has lost its
    partitions to another member; without the check its late changelog records would replace the newer
    states of that member.
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
        # The last committed offset of each partition the service owns: committed by this checkpointer, or
        # found at the assignment (None when the group never committed one).
        self.committed_offsets: dict[TopicPartition, int | None] = {}
        # The first offset processed of each owned partition that has no committed offset: the fence commits it.
        self.start_offsets: dict[TopicPartition, int] = {}
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
                     event_times_ms: np.ndarray | None = None,
                     first_offsets: dict[TopicPartition, int] | None = None) -> None:
        """Remember a processed batch: its next offsets and, for exactly-once, its event times for latency.

        ``first_offsets`` (each partition's first offset in the batch) give the fence an offset to commit for
        partitions that have none committed.
        """
        self.pending_offsets.update(next_offsets)
        for tp, offset in (first_offsets or {}).items():
            if self.committed_offsets.get(tp) is None:
                self.start_offsets.setdefault(tp, offset)
        self.pending_events += events
        if event_times_ms is not None and event_times_ms.size:
            self.pending_event_times_ms.append(event_times_ms)

    def due(self) -> bool:
        if not self.pending_offsets and not self.in_transaction:
            return False
        return (self.pending_events >= self.max_events
                or time.monotonic() - self._last_checkpoint >= self.interval_s)

    async def checkpoint(self, owned: Callable[[TopicPartition], bool],
                         acknowledged: Callable[[], Awaitable[None]] | None = None) -> None:
        """Make everything since the last checkpoint durable, in four steps.

        1. Outputs acknowledged: at-least-once awaits ``acknowledged`` (every in-flight batch); exactly-once
           keeps the outputs in the open transaction.
        2. Changelog records for the entities changed since the last checkpoint, and tombstones for the
           entities removed by eviction or expiry, each to the partition their events come from.
        3. Flush: at-least-once waits for the changelog acknowledgements; exactly-once adds the input
           offsets to the transaction.
        4. Commit: at-least-once commits the input offsets; exactly-once commits the transaction.
        """
        if not self.exactly_once:
            await self.complete(self.prepare(owned), acknowledged)
            return
        started = time.perf_counter()
        fence = self._fence_offsets(owned)
        offsets = self._take_offsets(owned)
        written = self.arena.dirty_slots()
        if not offsets and not self.in_transaction and not written.size and not self.arena.removed:
            return  # nothing changed since the last checkpoint, so no transaction is opened
        await self.begin()
        try:
            # Steps 2 and 3. The transaction's commit waits for the changelog records' acknowledgements.
            records = self._changelog_records(written)
            if records:
                await send_records(self.producer, self.changelog_topic, records)
            # aiokafka's transactional offset commit (TxnOffsetCommit v0) carries no group generation, so the
            # broker would accept this transaction from a member that has lost its partitions. The check comes
            # before the transaction's offsets: a plain commit written after them would win over them when the
            # transaction commits.
            await self.fence(fence)
            if offsets:
                await asyncio.wait_for(self.producer.send_offsets_to_transaction(
                    {tp: OffsetAndMetadata(offset, "") for tp, offset in offsets.items()}, self.group_id),
                    self.timeout_s)
            # Step 4
            await asyncio.wait_for(self.producer.commit_transaction(), self.timeout_s)
        except BaseException:
            # Nothing of this checkpoint is known to be durable: write these states again next time.
            self.arena.dirty[written[self.arena.occupied[written]]] = True
            raise
        self.in_transaction = False
        self._observe_transaction_latency()
        self._observe_checkpoint(offsets, started)

    def prepare(self, owned: Callable[[TopicPartition], bool]) -> PreparedCheckpoint:
        """Capture an at-least-once checkpoint without waiting: the offsets and the changed states as of now.

        The states are encoded here, so batches processed while the checkpoint completes change neither its
        changelog records nor its offsets.
        """
        started = time.perf_counter()
        fence = self._fence_offsets(owned)
        offsets = self._take_offsets(owned)
        written = self.arena.dirty_slots()
        records = self._changelog_records(written)
        return PreparedCheckpoint(offsets, written, records, started, fence)

    async def complete(self, prepared: PreparedCheckpoint,
                       acknowledged: Callable[[], Awaitable[None]] | None = None) -> None:
        """Run steps 1 to 4 of an at-least-once checkpoint captured by ``prepare``.

        On failure the captured offsets go back to the pending ones (unless a later batch moved them on) and
        the captured entities are marked changed, so the next checkpoint covers them again.
        """
        try:
            # Step 1
            if acknowledged is not None:
                await acknowledged()
            # Steps 2 and 3
            if prepared.records:
                await self.fence(prepared.fence)
                futures = await send_records(self.producer, self.changelog_topic, prepared.records)
                await asyncio.wait_for(asyncio.gather(*futures), self.timeout_s)
            # Step 4
            if prepared.offsets:
                await asyncio.wait_for(self.consumer.commit(prepared.offsets), self.timeout_s)
        except BaseException:
            self.arena.dirty[prepared.slots[self.arena.occupied[prepared.slots]]] = True
            for tp, offset in prepared.offsets.items():
                self.pending_offsets.setdefault(tp, offset)
            raise
        self._observe_checkpoint(prepared.offsets, prepared.started)

    async def fence(self, offsets: dict[TopicPartition, int]) -> None:
        """Commit the last committed ``offsets`` again, and raise if the group has moved on without this member.

        The group coordinator accepts an offset commit only from a member of its current generation, and
        aiokafka raises ``CommitFailedError`` otherwise. The values are those already committed, so the
        commit changes nothing for a member that still owns its partitions. A partition that never had an
        offset committed gets the first offset this member processed of it. That offset is not past any event
        this member processed, so an owner that resumes there skips none of them.
        """
        if offsets:
            await asyncio.wait_for(self.consumer.commit(offsets), self.timeout_s)

    def _fence_offsets(self, owned: Callable[[TopicPartition], bool]) -> dict[TopicPartition, int]:
        offsets = {tp: offset for tp, offset in self.committed_offsets.items() if offset is not None and owned(tp)}
        for tp, offset in self.start_offsets.items():
            if owned(tp) and self.committed_offsets.get(tp) is None:
                offsets[tp] = offset
        return offsets

    def forget(self, partitions: set[TopicPartition]) -> None:
        """Remove the offsets recorded for ``partitions``, which this member no longer owns."""
        for tp in partitions:
            self.committed_offsets.pop(tp, None)
            self.start_offsets.pop(tp, None)

    def _take_offsets(self, owned: Callable[[TopicPartition], bool]) -> dict[TopicPartition, int]:
        offsets = {tp: offset for tp, offset in self.pending_offsets.items() if owned(tp)}
        self.pending_offsets.clear()
        self.pending_events = 0
        self._last_checkpoint = time.monotonic()
        return offsets

    def _observe_checkpoint(self, offsets: dict[TopicPartition, int], started: float) -> None:
        self.committed_offsets.update(offsets)
        for tp in offsets:
            self.start_offsets.pop(tp, None)
        if offsets:
            self.metrics.commits.inc()
        self.metrics.checkpoints.inc()
        self.metrics.checkpoint_duration_seconds.observe(time.perf_counter() - started)

    def _changelog_records(self, slots: np.ndarray) -> list[tuple[int, bytes, bytes | None]]:
        """Encode the states of ``slots`` and tombstones for removed entities; the slots become clean."""
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
        self.metrics.changelog_records.inc(len(records))
        return records

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
