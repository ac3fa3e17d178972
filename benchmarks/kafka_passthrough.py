"""The latency floor of the Kafka clients: consume events and produce one small record per event, nothing else.

The same client settings as the service (aiokafka consumer in a group, idempotent producer with acks=all and the
service's default ``linger_ms`` unless given, record batches built with ``send_records``), no decoding and no
model. Each output carries the input's timestamp as ``ts`` and its ``source``, as the service's outputs do, so the benchmark measures both
with the same code. Prints ``ready`` once partitions are assigned; runs until killed.

Usage: python benchmarks/kafka_passthrough.py BOOTSTRAP INPUT_TOPIC OUTPUT_TOPIC GROUP [LINGER_MS]
"""

from __future__ import annotations

import asyncio
import sys

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from streamer.config import Settings
from streamer.kafka.producer import send_records


async def passthrough(bootstrap: str, input_topic: str, output_topic: str, group: str, linger_ms: int) -> None:
    settings = Settings()  # the service's defaults, changed by STREAMER_* variables of this process
    consumer = AIOKafkaConsumer(input_topic, bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False,
                                auto_offset_reset="latest", fetch_max_wait_ms=settings.fetch_max_wait_ms,
                                fetch_min_bytes=settings.fetch_min_bytes, max_poll_records=settings.max_batch_events)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True,
                                linger_ms=linger_ms)
    await consumer.start()
    await producer.start()
    announced = False
    while True:
        fetched = await consumer.getmany(timeout_ms=100, max_records=settings.max_batch_events)
        if not announced and consumer.assignment():
            print("ready", flush=True)
            announced = True
        records = [(tp.partition, message.key,
                    orjson.dumps({"ts": message.timestamp,
                                  "source": {"topic": tp.topic, "partition": tp.partition, "offset": message.offset}}))
                   for tp, messages in fetched.items() for message in messages]
        if records:
            await send_records(producer, output_topic, records)


if __name__ == "__main__":
    asyncio.run(passthrough(*sys.argv[1:5], int(sys.argv[5]) if len(sys.argv) > 5 else Settings().linger_ms))
