"""Topic administration: create the service's topics when they are missing."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from streamer.errors import BrokerError

logger = logging.getLogger(__name__)

# Larger than Kafka's 1 MB default, so an oversized input record can still reach the dead-letter topic
# and be rejected there by streamer's own record limit instead of by the broker.
TOPIC_MAX_MESSAGE_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True)
class TopicSpec:
    """A topic to create if missing."""

    name: str
    partitions: int
    replication_factor: int = 1
    config: dict[str, str] = field(default_factory=dict)


async def ensure_topics(bootstrap_servers: str, specs: list[TopicSpec], request_timeout_ms: int) -> dict[str, int]:
    """Create the missing topics and return the partition count of every named topic."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers, request_timeout_ms=request_timeout_ms)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [spec for spec in specs if spec.name not in existing]
        if missing:
            new_topics = [NewTopic(spec.name, spec.partitions, spec.replication_factor, topic_configs=spec.config)
                          for spec in missing]
            try:
                await admin.create_topics(new_topics)
            except TopicAlreadyExistsError:
                pass  # another group member created them first
            logger.info("Created topics %s", ", ".join(spec.name for spec in missing))
        return await _partition_counts(admin, [spec.name for spec in specs])
    finally:
        await admin.close()


async def list_topics(bootstrap_servers: str, request_timeout_ms: int) -> set[str]:
    """Return the names of the topics on the cluster."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers, request_timeout_ms=request_timeout_ms)
    await admin.start()
    try:
        return set(await admin.list_topics())
    finally:
        await admin.close()


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
