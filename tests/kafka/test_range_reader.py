"""RangeReader: range bounds, read_committed rules and errors against the real broker; retries with a fake client."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.client import AIOKafkaClient
from aiokafka.errors import KafkaConnectionError, NotLeaderForPartitionError
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from streamer.errors import BrokerError
from streamer.kafka.range_reader import RangeReader


async def produce(bootstrap: str, topic: str, values: list[bytes], partition: int = 0,
                  batch_per_record: bool = False) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        for index, value in enumerate(values):
            sent = await producer.send(topic, value, key=b"k%d" % index, partition=partition,
                                       timestamp_ms=1000 + index)
            if batch_per_record:
                await sent
        await producer.flush()
    finally:
        await producer.stop()


async def end_offsets(bootstrap: str, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, isolation_level="read_committed")
    await consumer.start()
    try:
        return await consumer.end_offsets(tps)
    finally:
        await consumer.stop()


async def read_all(bootstrap: str, ranges: list[tuple[TopicPartition, int, int]], count: int = 3,
                   **options) -> tuple[dict[TopicPartition, list[tuple[int, int, bytes, bytes]]], int]:
    """Read every range in rounds of ``count`` records; return (offset, timestamp, key, value) rows per partition."""
    client = AIOKafkaClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    await client.bootstrap()
    reader = RangeReader(client, ranges, **options)
    rows: dict[TopicPartition, list] = {tp: [] for tp, _, _ in ranges}
    try:
        tps = [tp for tp, _, _ in ranges]
        while True:
            await reader.fill(tps, count)
            pending = False
            for tp in tps:
                head = reader.buffers[tp].take(count)
                assert len(head) <= count
                rows[tp].extend(zip(head.offsets, head.timestamps_ms, head.keys, head.values))
                pending = pending or len(reader.buffers[tp]) > 0 or not reader.finished(tp)
            if not pending:
                return rows, reader.requests
            reader.prefetch(tps, count)
    finally:
        await reader.close()
        await client.close()


def test_reads_exactly_the_range_in_offset_order(kafka_bootstrap, topic_factory):
    topic = topic_factory(partitions=2)
    asyncio.run(produce(kafka_bootstrap, topic, [b"a%d" % i for i in range(20)], partition=0))
    asyncio.run(produce(kafka_bootstrap, topic, [b"b%d" % i for i in range(7)], partition=1))
    tp0, tp1 = TopicPartition(topic, 0), TopicPartition(topic, 1)

    rows, _ = asyncio.run(read_all(kafka_bootstrap, [(tp0, 5, 17), (tp1, 0, 7)], count=4))

    assert [offset for offset, _, _, _ in rows[tp0]] == list(range(5, 17))
    assert [value for _, _, _, value in rows[tp0]] == [b"a%d" % i for i in range(5, 17)]
    assert [key for _, _, key, _ in rows[tp0]] == [b"k%d" % i for i in range(5, 17)]
    assert [timestamp for _, timestamp, _, _ in rows[tp0]] == [1000 + i for i in range(5, 17)]
    assert [value for _, _, _, value in rows[tp1]] == [b"b%d" % i for i in range(7)]


def test_small_fetches_still_read_everything(kafka_bootstrap, unique_topic):
    asyncio.run(produce(kafka_bootstrap, unique_topic, [b"v%03d" % i for i in range(50)], batch_per_record=True))
    tp = TopicPartition(unique_topic, 0)

    # Each record is its own batch, so a partition limit of a few batches needs several requests. A limit
    # below one batch would still return that batch, by the broker's rule.
    rows, requests = asyncio.run(read_all(kafka_bootstrap, [(tp, 0, 50)], count=10, partition_max_bytes=200))

    assert [value for _, _, _, value in rows[tp]] == [b"v%03d" % i for i in range(50)]
    assert requests > 1


def test_aborted_transactions_and_markers_are_skipped(kafka_bootstrap, unique_topic):
    async def write() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, transactional_id=f"t-{unique_topic}")
        await producer.start()
        try:
            async with producer.transaction():
                for value in (b"committed-1", b"committed-2"):
                    await producer.send(unique_topic, value, partition=0)
            await producer.begin_transaction()
            for value in (b"aborted-1", b"aborted-2", b"aborted-3"):
                await producer.send(unique_topic, value, partition=0)
            await producer.flush()
            await producer.abort_transaction()
            async with producer.transaction():
                await producer.send(unique_topic, b"committed-3", partition=0)
        finally:
            await producer.stop()

    asyncio.run(write())
    tp = TopicPartition(unique_topic, 0)
    end = asyncio.run(end_offsets(kafka_bootstrap, [tp]))[tp]

    rows, _ = asyncio.run(read_all(kafka_bootstrap, [(tp, 0, end)], count=2))

    assert end == 9  # 6 records and 3 transaction markers
    assert [value for _, _, _, value in rows[tp]] == [b"committed-1", b"committed-2", b"committed-3"]


def test_reader_removed_offset_raises(kafka_bootstrap, unique_topic):
    asyncio.run(produce(kafka_bootstrap, unique_topic, [b"x"] * 3))
    tp = TopicPartition(unique_topic, 0)

    with pytest.raises(BrokerError, match="no longer on the broker"):
        asyncio.run(read_all(kafka_bootstrap, [(tp, 10, 20)]))


def test_reader_range_past_data_stalls(kafka_bootstrap, unique_topic):
    asyncio.run(produce(kafka_bootstrap, unique_topic, [b"x"] * 3))
    tp = TopicPartition(unique_topic, 0)

    # Offset 3 is the log end, so fetching there is valid but returns nothing.
    with pytest.raises(BrokerError, match="No records for 1 s"):
        asyncio.run(read_all(kafka_bootstrap, [(tp, 3, 10)], stall_timeout_s=1.0, max_wait_ms=50))


class _FakeResponse:
    API_VERSION = 11

    def __init__(self, topic: str, error_code: int, records: bytes) -> None:
        # (partition, error, highwater, [last stable offset, log start offset, aborted, replica, records])
        self.topics = [(topic, [(0, error_code, 3, 3, 0, [], -1, records)])]


class _FakeCluster:
    def leader_for_partition(self, tp: TopicPartition) -> int:
        return 1


class _FlakyClient:
    """A client whose first Fetch fails to connect and whose second gets a not-leader error."""

    def __init__(self, topic: str, records: bytes) -> None:
        self.cluster = _FakeCluster()
        self.metadata_updates = 0
        self._answers = ["connection", "not leader", "records"]
        self._topic = topic
        self._records = records

    def force_metadata_update(self) -> None:
        self.metadata_updates += 1

    async def send(self, node_id: int, request) -> _FakeResponse:
        answer = self._answers.pop(0) if len(self._answers) > 1 else self._answers[0]
        if answer == "connection":
            raise KafkaConnectionError("broker unreachable")
        if answer == "not leader":
            return _FakeResponse(self._topic, NotLeaderForPartitionError.errno, b"")
        return _FakeResponse(self._topic, 0, self._records)


def test_fetch_errors_are_retried():
    builder = DefaultRecordBatchBuilder(2, 0, 0, -1, -1, -1, 1 << 20)
    for offset in range(3):
        builder.append(offset, timestamp=100 + offset, key=None, value=b"v%d" % offset, headers=[])
    client = _FlakyClient("events", bytes(builder.build()))
    tp = TopicPartition("events", 0)

    async def read() -> list[bytes | None]:
        reader = RangeReader(client, [(tp, 0, 3)], retry_backoff_s=0.01, stall_timeout_s=5.0)
        await reader.fill([tp], 3)
        return reader.buffers[tp].take(3).values

    assert asyncio.run(read()) == [b"v0", b"v1", b"v2"]
    assert client.metadata_updates == 1
