"""Health, readiness and restore checks of a member, driven without a broker."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from aiokafka import TopicPartition

from streamer.config import Settings
from streamer.kafka.service import LIVENESS_STALL_S, StreamerService
from streamer.model import SeedNet
from streamer.state.arena import NO_OFFSET, NO_TIME


@pytest.fixture
def service(tmp_path):
    path = tmp_path / "net.pt"
    torch.save(SeedNet(2, 4, 5, 1, 1).state_dict(), path)
    return StreamerService(Settings(model=path, metrics_port=0))


def test_retrying_broker_calls_keep_the_member_live(service):
    service._last_poll = time.monotonic() - LIVENESS_STALL_S - 1
    assert not service.liveness()[0]

    service._count_retry("create topics")

    assert service.liveness()[0]


def test_readiness_counts_partitions(service):
    service._joined = True
    service._assignment = {TopicPartition("events", 0)}
    assert service.readiness() == (True, "ready: 1 partition assigned")

    service._assignment.add(TopicPartition("events", 1))

    assert service.readiness() == (True, "ready: 2 partitions assigned")


def test_assignment_during_drop_ignored(service, caplog):
    """The consumer that receives an assignment while the member drops its state stops right after."""
    service._dropping = True
    caplog.set_level("INFO")

    asyncio.run(service.on_partitions_assigned({TopicPartition("events", 0)}))

    assert service._assignment == set()
    assert not service._joined
    assert service.metrics.registry.get_sample_value("streamer_rebalances_total") == 0
    assert "left to the next assignment: events[0]" in caplog.text


def test_not_ready_between_revocation_and_assignment(service):
    service._joined = True
    assert service.readiness() == (True, "ready: no partitions assigned, standing by")

    service._rebalancing = True

    assert service.readiness()[0] is False
    assert "rebalancing" in service.readiness()[1]


def test_not_ready_names_the_unreachable_cluster(service):
    assert service.readiness() == (False, "waiting for the first partition assignment")

    service._count_retry("create topics")
    assert service.readiness() == (False, "waiting for the Kafka cluster at 127.0.0.1:9092: retrying create topics")

    service._broker_reachable = False
    assert service.readiness() == (False, "waiting for the Kafka cluster at 127.0.0.1:9092, which does not respond")


def load(arena, entities, partition, offsets):
    shape = (len(entities), 1, 4)
    arena.load(entities, partition, np.ones(len(entities), np.int64), np.asarray(offsets, np.int64),
               np.full(len(entities), NO_TIME, np.int64), {"h": np.zeros(shape, np.float32),
                                                          "c": np.zeros(shape, np.float32)})


def test_restored_offsets_check_reads_slots_late(service):
    arena = service.engine.arena
    load(arena, ["a", "b"], partition=1, offsets=[50, 60])

    class Consumer:
        async def end_offsets(self, partitions):
            # Meanwhile a batch of partition 0 evicts both entities and gives their slots to two others.
            arena.remove_entities(["a", "b"])
            load(arena, ["x", "y"], partition=0, offsets=[900, 950])
            return {tp: 100 for tp in partitions}

    service.consumer = Consumer()
    asyncio.run(service._check_restored_offsets(TopicPartition("events", 1)))

    offsets = arena.last_offset[[arena.slot_of("x"), arena.slot_of("y")]].tolist()
    assert offsets == [900, 950]
    assert NO_OFFSET not in offsets


def test_service_does_not_load_matplotlib():
    # matplotlib writes a font cache under $HOME on import, which fails on a read-only root file system.
    code = "import sys, streamer.kafka.service; print('matplotlib' in sys.modules)"
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert completed.stdout.strip() == "False", completed.stderr
