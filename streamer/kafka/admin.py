"""Topic administration: create the service's topics when they are missing."""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import AsyncIterator

from aiokafka.admin import AIOKafkaAdminClient, NewPartitions, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import InvalidPartitionsError, TopicAlreadyExistsError, for_code

from streamer.errors import BrokerError, ConfigError
from streamer.kafka.security import PLAINTEXT, KafkaSecurity

logger = logging.getLogger(__name__)

# Larger than Kafka's 1 MB default, so an oversized input record can still reach the dead-letter topic
# and be rejected there by streamer's own record limit instead of by the broker.
TOPIC_MAX_MESSAGE_BYTES = 8 * 1024 * 1024


@asynccontextmanager
async def _admin_client(bootstrap_servers: str, request_timeout_ms: int,
                        security: KafkaSecurity) -> AsyncIterator[AIOKafkaAdminClient]:
    """Start an admin client for the block and close it afterwards."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers, **security.client_options(),
                                request_timeout_ms=request_timeout_ms)
    await admin.start()
    try:
        yield admin
    finally:
        await admin.close()


@dataclass(frozen=True)
class TopicSpec:
    """A topic to create if missing."""

    name: str
    partitions: int
    replication_factor: int = 1
    config: dict[str, str] = field(default_factory=dict)


async def ensure_topics(bootstrap_servers: str, specs: list[TopicSpec], request_timeout_ms: int, *,
                        security: KafkaSecurity = PLAINTEXT) -> dict[str, int]:
    """Create the missing topics and return the partition count of every named topic."""
    async with _admin_client(bootstrap_servers, request_timeout_ms, security) as admin:
        existing = set(await admin.list_topics())
        missing = [spec for spec in specs if spec.name not in existing]
        if missing:
            new_topics = [NewTopic(spec.name, spec.partitions, spec.replication_factor, topic_configs=spec.config)
                          for spec in missing]
            try:
                response = await admin.create_topics(new_topics)
            except TopicAlreadyExistsError:
                pass  # another group member created them first
            else:
                created = _check_created(response)
                if created:
                    logger.info("Created topics %s", ", ".join(created))
        return await _partition_counts(admin, [spec.name for spec in specs])


def _check_created(response) -> list[str]:
    """Return the topics a CreateTopics response created; raise for a topic the broker refused.

    A topic that already exists (another member created it first) is fine. A rejection that a retry cannot
    change, such as a replication factor above the number of brokers or an invalid name, raises
    ``ConfigError`` with the broker's reason. Other rejections raise ``BrokerError``, which callers retry.
    """
    created = []
    for topic_error in response.topic_errors:
        topic, code = topic_error[0], topic_error[1]
        message = topic_error[2] if len(topic_error) > 2 and topic_error[2] else ""
        if code == 0:
            created.append(topic)
            continue
        error_type = for_code(code)
        if error_type is TopicAlreadyExistsError:
            continue
        reason = f"Cannot create topic {topic!r}: the broker rejected it with {error_type.__name__}"
        reason += f" ({message})" if message else ""
        if error_type.retriable:
            raise BrokerError(reason)
        raise ConfigError(reason)
    return created


async def ensure_partitions(bootstrap_servers: str, topic: str, count: int, request_timeout_ms: int, *,
                            security: KafkaSecurity = PLAINTEXT) -> int:
    """Add partitions to ``topic`` until it has at least ``count``; return its partition count."""
    async with _admin_client(bootstrap_servers, request_timeout_ms, security) as admin:
        current = (await _partition_counts(admin, [topic]))[topic]
        if current >= count:
            return current
        response = await admin.create_partitions({topic: NewPartitions(total_count=count)})
        for topic_error in response.topic_errors:
            code = topic_error[1]
            # InvalidPartitions: another member added them first, so the count is already at least this one.
            if code not in (0, InvalidPartitionsError.errno):
                detail = f" ({topic_error[2]})" if len(topic_error) > 2 and topic_error[2] else ""
                raise BrokerError(f"Cannot add partitions to {topic!r}: the broker rejected the request with "
                                  f"{for_code(code).__name__}{detail}")
        counts = await _partition_counts(admin, [topic])
        logger.info("Topic %s now has %d partitions (had %d)", topic, counts[topic], current)
        return counts[topic]


async def max_message_bytes(bootstrap_servers: str, topics: list[str], request_timeout_ms: int, *,
                            security: KafkaSecurity = PLAINTEXT) -> dict[str, int]:
    """Return each topic's ``max.message.bytes``: the largest record batch its partitions accept."""
    async with _admin_client(bootstrap_servers, request_timeout_ms, security) as admin:
        responses = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, topic, {"max.message.bytes": None}) for topic in topics])
    limits = {}
    for response in responses:
        for code, message, _, name, entries in response.resources:
            if code:
                detail = f" ({message})" if message else ""
                raise BrokerError(f"Cannot read the configuration of topic {name!r}: the broker rejected the "
                                  f"request with {for_code(code).__name__}{detail}")
            limits.update({name: int(entry[1]) for entry in entries if entry[0] == "max.message.bytes"})
    missing = sorted(set(topics) - set(limits))
    if missing:
        raise BrokerError(f"The broker returned no max.message.bytes for topics {missing}")
    return limits


async def list_topics(bootstrap_servers: str, request_timeout_ms: int, *,
                      security: KafkaSecurity = PLAINTEXT) -> set[str]:
    """Return the names of the topics on the cluster."""
    async with _admin_client(bootstrap_servers, request_timeout_ms, security) as admin:
        return set(await admin.list_topics())


async def _partition_counts(admin: AIOKafkaAdminClient, names: list[str], attempts: int = 50) -> dict[str, int]:
    """Describe topics until every one reports its partitions, each with a leader.

    New topics need a moment to appear, and a producer that sends before a partition has a leader gets
    NotLeaderForPartition and retries with a warning.
    """
    counts: dict[str, int] = {}
    for _ in range(attempts):
        described = await admin.describe_topics(names)
        counts = {item["topic"]: len(item["partitions"]) for item in described
                  if item["partitions"] and all(partition["leader"] >= 0 for partition in item["partitions"])}
        if len(counts) == len(names):
            return counts
        await asyncio.sleep(0.1)
    missing = sorted(set(names) - set(counts))
    raise BrokerError(f"Topics {missing} report no partitions or no partition leaders after creation; check the "
                      "broker log")
