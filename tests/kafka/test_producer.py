"""Record batches built by send_records, against a producer stand-in that keeps what it is given."""

from __future__ import annotations

import asyncio

from aiokafka.producer.message_accumulator import BatchBuilder

from streamer.kafka.producer import estimate_record_bytes, send_records


class BatchCollector:
    """The two producer methods send_records calls; each batch goes to ``sent`` with its topic and partition."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, int, BatchBuilder]] = []

    def create_batch(self) -> BatchBuilder:
        return BatchBuilder(1 << 20, 0)  # no compression

    async def send_batch(self, batch: BatchBuilder, topic: str, *, partition: int) -> asyncio.Future:
        self.sent.append((topic, partition, batch))
        future = asyncio.get_running_loop().create_future()
        future.set_result(None)
        return future


def test_batches_stay_under_the_topic_limit():
    records = [(position % 2, f"k{position}".encode(), bytes(200)) for position in range(100)]
    headers = [[("trace", b"abc")] for _ in records]
    producer = BatchCollector()

    futures = asyncio.run(send_records(producer, "out", records, headers, max_batch_bytes=2_000))

    assert len(futures) == len(producer.sent)
    assert sum(batch.record_count() for _, _, batch in producer.sent) == 100
    per_record = estimate_record_bytes(b"k10", bytes(200), [("trace", b"abc")]) - 61
    for _, _, batch in producer.sent:
        assert 61 + batch.record_count() * per_record <= 2_000
    # Each of the two partitions gets 50 records in as few batches as the limit allows.
    per_batch = (2_000 - 61) // per_record
    assert len(producer.sent) == 2 * -(-50 // per_batch)


def test_unlimited_batches_fill_producer_size():
    records = [(0, f"k{position}".encode(), bytes(200)) for position in range(100)]
    producer = BatchCollector()

    asyncio.run(send_records(producer, "out", records))

    assert [batch.record_count() for _, _, batch in producer.sent] == [100]
