"""Pytest fixtures that run tests against a real single-node Kafka broker.

``kafka_broker`` starts one broker per test session (data in a temporary
directory) and stops it at the end of the session. The function-scoped
fixtures start it again when an earlier test left it stopped.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterator

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from streamer.kafka.local_broker import LocalKafka

BROKER_START_TIMEOUT_S = 120.0

TopicFactory = Callable[..., str]


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalKafka]:
    """Running broker shared by the whole test session."""
    broker = LocalKafka(tmp_path_factory.mktemp("kafka-broker"))
    broker.start(timeout_s=BROKER_START_TIMEOUT_S)
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def kafka_bootstrap(kafka_broker: LocalKafka) -> str:
    """Bootstrap address of the session broker, restarted first if a test stopped it."""
    return kafka_broker.start(timeout_s=BROKER_START_TIMEOUT_S)


@pytest.fixture
def topic_factory(kafka_bootstrap: str) -> TopicFactory:
    """Function ``create(partitions=1, prefix="test") -> name`` that creates a uniquely named topic."""

    def create(partitions: int = 1, prefix: str = "test") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        asyncio.run(create_topic(kafka_bootstrap, name, partitions))
        return name

    return create


@pytest.fixture
def unique_topic(topic_factory: TopicFactory) -> str:
    """Name of a new, empty single-partition topic."""
    return topic_factory()


async def create_topic(bootstrap: str, name: str, partitions: int = 1) -> None:
    """Create topic ``name`` with replication factor 1."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(name, num_partitions=partitions, replication_factor=1)]
        )
    finally:
        await admin.close()
