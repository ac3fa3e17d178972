"""Producing outputs and dead letters in record batches, keyed by entity."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Sequence

# Records for one topic: ``(partition, key, value)`` each, and each record's headers, or None for no headers.
OutgoingRecords = tuple[list[tuple[int, bytes | None, bytes]], list[list[tuple[str, bytes]]] | None]

from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import murmur2
from aiokafka.record.default_records import DefaultRecordBatchBuilder

BATCH_HEADER_BYTES = 61  # the header of a record batch (magic 2), which estimate_record_bytes includes


def estimate_record_bytes(key: bytes | None, value: bytes | None, headers: Sequence[tuple[str, bytes]]) -> int:
    """Return an upper bound of the bytes of a record batch holding this one record, as aiokafka estimates it."""
    return DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, headers)


class KeyPartitioner:
    """Kafka's default partitioner for keyed records (murmur2 of the key, positive, modulo partitions).

    Results are cached per key, because the same entities recur in every batch.
    """

    def __init__(self, partitions: int) -> None:
        self.partitions = partitions
        self._cache: dict[bytes, int] = {}

    def __call__(self, key: bytes) -> int:
        partition = self._cache.get(key)
        if partition is None:
            partition = (murmur2(key) & 0x7FFFFFFF) % self.partitions
            if len(self._cache) < 1_000_000:
                self._cache[key] = partition
        return partition


async def send_records(producer: AIOKafkaProducer, topic: str, records: Sequence[tuple[int, bytes, bytes]],
                       headers: Sequence[list[tuple[str, bytes]]] | None = None, *,
                       max_batch_bytes: int | None = None) -> list[asyncio.Future]:
    """Append ``(partition, key, value)`` records to record batches and hand them to the producer.

    Returns one future per record batch; each resolves when the broker acknowledges that batch. Building
    batches directly avoids the per-record cost of ``AIOKafkaProducer.send``.
    For a transactional producer, aiokafka adds each batch's partition to the open transaction.
    ``max_batch_bytes`` (the topic's ``max.message.bytes``) closes a batch before it grows past that size by
    aiokafka's estimate, when it is below the producer's own batch size. A single larger record still goes
    alone in its batch, which the broker rejects.
    """
    by_partition: dict[int, list[int]] = defaultdict(list)
    for position, (partition, _, _) in enumerate(records):
        by_partition[partition].append(position)
    futures = []
    for partition, positions in by_partition.items():
        batch = producer.create_batch()
        batch_bytes = BATCH_HEADER_BYTES
        for position in positions:
            _, key, value = records[position]
            record_headers = headers[position] if headers is not None else []
            if max_batch_bytes is not None:
                record_bytes = estimate_record_bytes(key, value, record_headers) - BATCH_HEADER_BYTES
                if batch.record_count() and batch_bytes + record_bytes > max_batch_bytes:
                    batch.close()
                batch_bytes += record_bytes
            if batch.append(key=key, value=value, timestamp=None, headers=record_headers) is None:
                futures.append(await producer.send_batch(batch, topic, partition=partition))
                batch = producer.create_batch()
                if max_batch_bytes is not None:
                    batch_bytes = BATCH_HEADER_BYTES + record_bytes
                if batch.append(key=key, value=value, timestamp=None, headers=record_headers) is None:
                    raise ValueError(f"Record of {len(value)} bytes does not fit in an empty batch for {topic}")
        if batch.record_count():
            futures.append(await producer.send_batch(batch, topic, partition=partition))
    return futures
