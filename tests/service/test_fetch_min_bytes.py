"""STREAMER_FETCH_MIN_BYTES reaches the consumer: the broker returns a fetch after enough bytes or the maximum wait."""

from __future__ import annotations

import asyncio
import time
import uuid

import orjson
import pytest
import torch

from streamer.model import SeedNet
from tests.service.service_helpers import ServiceProcess, create_topics, produce, read_topic

pytestmark = pytest.mark.kafka

EVENTS = 4
GAP_S = 0.15


def test_spread_events_share_held_fetch(kafka_bootstrap, tmp_path):
    torch.manual_seed(13)
    model_path = tmp_path / "net.pt"
    torch.save(SeedNet(4, 8, 5, 1, 1).eval().state_dict(), model_path)
    suffix = uuid.uuid4().hex[:8]
    topics = {"input_topics": f"fmb-in-{suffix}", "output_topic": f"fmb-out-{suffix}",
              "dead_letter_topic": f"fmb-dlq-{suffix}"}
    asyncio.run(create_topics(kafka_bootstrap, {name: 1 for name in topics.values()}))
    # Each event is far below 1 MiB, so every fetch waits the whole 2 s unless the setting is lost.
    service = ServiceProcess(tmp_path, model=model_path, bootstrap_servers=kafka_bootstrap, group_id=f"fmb-{suffix}",
                             topic_partitions=1, fetch_min_bytes=1 << 20, fetch_max_wait_ms=2000, **topics)
    try:
        service.wait_ready()

        async def produce_spread() -> None:
            for index in range(EVENTS):
                await produce(kafka_bootstrap, topics["input_topics"],
                              [(b"e1", orjson.dumps({"features": [index, 0.5, -0.5, 1.0]}))])
                await asyncio.sleep(GAP_S)

        asyncio.run(produce_spread())
        outputs = asyncio.run(read_topic(kafka_bootstrap, topics["output_topic"], EVENTS, timeout_s=30))
        assert len(outputs) == EVENTS
        deadline = time.monotonic() + 10
        while service.metric("streamer_events_consumed_total") < EVENTS and time.monotonic() < deadline:
            time.sleep(0.1)
        batches = service.metric("streamer_batch_events_count")
    finally:
        assert service.stop() == 0, service.log()

    # Fetches that return at once give one batch per event (EVENTS batches, 150 ms apart). Held fetches
    # collect the spread events: one batch, or two when a held fetch's 2 s ended between two events.
    assert 1 <= batches <= 2
