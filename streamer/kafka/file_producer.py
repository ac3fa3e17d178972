"""Producing the events of a file to a Kafka topic, keyed by entity, to try the service and topic replays."""

from __future__ import annotations

import logging
from pathlib import Path

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from streamer.errors import BrokerError, InvalidEventError
from streamer.io.events import parse_json
from streamer.io.files import check_input_file, read_records
from streamer.kafka.admin import TOPIC_MAX_MESSAGE_BYTES, TopicSpec, ensure_topics
from streamer.kafka.producer import KeyPartitioner, send_records

logger = logging.getLogger(__name__)


def entity_key(value: bytes, entity_field: str = "entity") -> bytes | None:
    """Return the record key of an event: its entity id in UTF-8, or None when the value has no usable one.

    Records without a key still go to the topic, so that the service and replays can dead-letter them.
    """
    try:
        # The service's parser, which accepts the NaN of Python's json.dumps in fields an event does not use.
        document = parse_json(value)
    except InvalidEventError:
        return None
    entity = document.get(entity_field) if type(document) is dict else None
    if type(entity) is int:
        entity = str(entity)  # the event decoder accepts integer ids the same way
    return entity.encode() if type(entity) is str and entity else None


async def produce_file(path: Path, topic: str, bootstrap_servers: str, *, partitions: int = 4,
                       feature_names: tuple[str, ...] | None = None, request_timeout_ms: int = 30_000) -> int:
    """Produce every record of a JSON Lines, CSV or Parquet file to ``topic`` in file order; return the count.

    A missing topic is created with ``partitions`` partitions and the same record size limit as the topics
    the service creates. Keyed records go to the partition of their key (Kafka's default partitioner), so an
    entity's events stay in order. Records without a key go round robin.
    """
    check_input_file(Path(path))  # before the topic is created
    counts = await ensure_topics(bootstrap_servers,
                                 [TopicSpec(topic, partitions, 1, {"max.message.bytes": str(TOPIC_MAX_MESSAGE_BYTES)})],
                                 request_timeout_ms)
    partitioner = KeyPartitioner(counts[topic])
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap_servers, acks="all", enable_idempotence=True,
                                linger_ms=5, max_batch_size=1 << 20, max_request_size=TOPIC_MAX_MESSAGE_BYTES,
                                request_timeout_ms=request_timeout_ms)
    try:
        await producer.start()
    except KafkaError as error:
        raise BrokerError(f"Cannot start a producer at {bootstrap_servers}: {error!r}; check "
                          "--bootstrap-servers and that the broker is running") from error
    produced = 0
    try:
        for chunk in read_records(path, 4096, feature_names):
            records = []
            for index, value in enumerate(chunk.values):
                key = entity_key(value)
                partition = partitioner(key) if key is not None else (produced + index) % partitioner.partitions
                records.append((partition, key, value))
            try:
                futures = await send_records(producer, topic, records)
                for future in futures:
                    await future
            except KafkaError as error:
                raise BrokerError(f"Producing records {produced} to {produced + len(records) - 1} of {path} to "
                                  f"{topic} failed: {error!r}; a record larger than the topic's max.message.bytes "
                                  "is rejected by the broker") from error
            for position, (_, message) in chunk.invalid.items():
                logger.warning("Record %d of %s: %s; produced as it is", chunk.indices[position], path, message)
            produced += len(records)
    finally:
        await producer.stop()
    logger.info("Produced %d records of %s to %s", produced, path, topic)
    return produced
