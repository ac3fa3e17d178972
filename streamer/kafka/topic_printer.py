"""Printing a topic's records, to read the outputs and dead letters of `run` while trying it out."""

from __future__ import annotations

import time
from collections.abc import Callable

from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError

from streamer.errors import BrokerError, ConfigError
from streamer.kafka.admin import list_topics

KNOWN_TOPICS_LISTED = 10  # topic names a "not found" error lists
ISOLATION_LEVELS = ("read_committed", "read_uncommitted")


def format_record(key: bytes | None, value: bytes | None, headers, *, with_key: bool, with_headers: bool) -> str:
    """Return one line for a record: headers, key and value, separated by tabs, in the order Kafka's console
    consumer prints them (headers as name:value pairs joined by commas, NO_HEADERS when there are none)."""
    fields = []
    if with_headers:
        fields.append(",".join(f"{name}:{_text(header)}" for name, header in headers) or "NO_HEADERS")
    if with_key:
        fields.append(_text(key))
    fields.append(_text(value))
    return "\t".join(fields)


def _text(data: bytes | None) -> str:
    return "null" if data is None else data.decode("utf-8", errors="replace")


async def print_topic(topic: str, bootstrap_servers: str, *, from_beginning: bool = False,
                      max_messages: int | None = None, timeout_ms: int | None = None, with_key: bool = False,
                      with_headers: bool = False, write: Callable[[str], None] = print,
                      request_timeout_ms: int = 30_000, isolation_level: str = "read_committed") -> int:
    """Write each record of every partition of ``topic`` as one line and return how many were written.

    Reads without a consumer group, so no offsets are committed. Stops after ``max_messages`` records or
    when no record arrived for ``timeout_ms``, and otherwise runs until cancelled. With the default
    ``read_committed`` isolation, records of open or aborted transactions (the outputs an exactly-once
    service wrote before it failed) are not printed.
    """
    if isolation_level not in ISOLATION_LEVELS:
        raise ConfigError(f"Invalid isolation level {isolation_level!r}: expected one of {', '.join(ISOLATION_LEVELS)}")
    try:
        topics = await list_topics(bootstrap_servers, request_timeout_ms)
    except KafkaError as error:
        raise BrokerError(f"Listing topics on {bootstrap_servers} failed: {error!r}; check --bootstrap-servers and "
                          "that the broker is running") from error
    if topic not in topics:
        names = sorted(name for name in topics if not name.startswith("__"))
        known = ", ".join(names[:KNOWN_TOPICS_LISTED]) or "none"
        if len(names) > KNOWN_TOPICS_LISTED:
            known += f" and {len(names) - KNOWN_TOPICS_LISTED} more"
        raise ConfigError(f"Topic not found: {topic} (topics on {bootstrap_servers}: {known})")
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap_servers, group_id=None, enable_auto_commit=False,
                                auto_offset_reset="earliest" if from_beginning else "latest",
                                request_timeout_ms=request_timeout_ms, isolation_level=isolation_level)
    await consumer.start()
    written = 0
    try:
        last_record = time.monotonic()
        while max_messages is None or written < max_messages:
            batches = await consumer.getmany(timeout_ms=200)
            if not batches:
                if timeout_ms is not None and (time.monotonic() - last_record) * 1000 >= timeout_ms:
                    break
                continue
            last_record = time.monotonic()
            for records in batches.values():
                for record in records:
                    if max_messages is not None and written >= max_messages:
                        break
                    write(format_record(record.key, record.value, record.headers, with_key=with_key,
                                        with_headers=with_headers))
                    written += 1
    finally:
        await consumer.stop()
    return written
