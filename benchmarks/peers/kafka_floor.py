"""The Kafka client floor: consume and produce the same records with no processing, at-least-once.

Same client settings as ``streamer run`` (aiokafka, 4096 records per ``getmany``, 20 ms fetch wait,
idempotent producer with ``acks="all"``, up to eight batches awaiting acknowledgement). Each fetched batch
goes unchanged into producer record batches (``send_batch`` through ``streamer.kafka.producer.send_records``).
Each record goes to the output partition with its input partition's number. The offsets of acknowledged
batches are committed at most once a second.
"""

from __future__ import annotations

import asyncio
import collections
import signal
import time

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from common import COMMIT_INTERVAL_S, argument_parser, configure_logging
from streamer.kafka.producer import send_records

MAX_IN_FLIGHT_BATCHES = 8
MAX_BATCH_RECORDS = 4096
MAX_MESSAGE_BYTES = 8 * 1024 * 1024


async def serve(args) -> None:
    consumer = AIOKafkaConsumer(args.input_topic, bootstrap_servers=args.bootstrap_servers, group_id=args.group_id,
                                enable_auto_commit=False, auto_offset_reset="earliest",
                                max_poll_records=MAX_BATCH_RECORDS, fetch_max_wait_ms=20,
                                max_partition_fetch_bytes=MAX_MESSAGE_BYTES)
    producer = AIOKafkaProducer(bootstrap_servers=args.bootstrap_servers, enable_idempotence=True, acks="all",
                                linger_ms=2, max_batch_size=1 << 20, max_request_size=MAX_MESSAGE_BYTES)
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, task.cancel)

    # Each entry: the acknowledgement futures of one fetched batch and the offsets to commit once they resolve.
    in_flight: collections.deque[tuple[list[asyncio.Future], dict[TopicPartition, int]]] = collections.deque()
    acknowledged: dict[TopicPartition, int] = {}

    async def acknowledge_oldest() -> None:
        futures, offsets = in_flight.popleft()
        await asyncio.gather(*futures)
        acknowledged.update(offsets)

    await producer.start()
    await consumer.start()
    last_commit = time.monotonic()
    try:
        while True:
            fetched = await consumer.getmany(timeout_ms=100, max_records=MAX_BATCH_RECORDS)
            records = [(tp.partition, message.key, message.value)
                       for tp, messages in fetched.items() for message in messages]
            if records:
                futures = await send_records(producer, args.output_topic, records)
                in_flight.append((futures, {tp: messages[-1].offset + 1 for tp, messages in fetched.items()}))
            while len(in_flight) > MAX_IN_FLIGHT_BATCHES or (in_flight and not records):
                await acknowledge_oldest()
            if acknowledged and time.monotonic() - last_commit >= COMMIT_INTERVAL_S:
                await consumer.commit(dict(acknowledged))
                acknowledged.clear()
                last_commit = time.monotonic()
    except asyncio.CancelledError:
        pass
    finally:
        while in_flight:
            await acknowledge_oldest()
        if acknowledged:
            await consumer.commit(dict(acknowledged))
        await consumer.stop()
        await producer.stop()


def main() -> None:
    configure_logging()
    asyncio.run(serve(argument_parser(__doc__.splitlines()[0]).parse_args()))


if __name__ == "__main__":
    main()
