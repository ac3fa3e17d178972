"""Stopping the service while it retries an unreachable broker."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
from aiokafka.errors import KafkaConnectionError

from streamer.config import Settings
from streamer.errors import BrokerError
from streamer.kafka.retry import retry
from streamer.kafka.service import StreamerService
from streamer.model import SeedNet
from tests.service.service_helpers import free_port


def test_stop_interrupts_backoff():
    async def scenario() -> float:
        stop_at = time.monotonic() + 0.3

        async def unreachable():
            raise KafkaConnectionError("no broker")

        started = time.monotonic()
        with pytest.raises(BrokerError, match="stopped after 1 attempts"):
            await retry("connect", unreachable, timeout_s=1.0, initial_backoff_s=5.0,
                        stopping=lambda: time.monotonic() >= stop_at)
        return time.monotonic() - started

    elapsed_s = asyncio.run(scenario())

    assert elapsed_s < 1.0


def test_stop_during_startup_retries_is_clean(tmp_path):
    torch.save(SeedNet(2, 4, 5, 1, 1).state_dict(), tmp_path / "net.pt")
    settings = Settings(model=tmp_path / "net.pt", bootstrap_servers=f"127.0.0.1:{free_port()}", metrics_port=0,
                        request_timeout_ms=1000, shutdown_timeout_s=2.0)

    async def scenario() -> float:
        service = StreamerService(settings)
        task = asyncio.create_task(service.run())
        await asyncio.sleep(2.0)
        assert not task.done()
        service.request_stop()
        stopped = time.monotonic()
        await asyncio.wait_for(task, 10)  # raises if run() ends with an error
        return time.monotonic() - stopped

    assert asyncio.run(scenario()) < 2.0


def test_cancelled_client_task_does_not_abort_shutdown(tmp_path, caplog):
    torch.save(SeedNet(2, 4, 5, 1, 1).state_dict(), tmp_path / "net.pt")
    service = StreamerService(Settings(model=tmp_path / "net.pt", metrics_port=0))

    async def stop_with_cancelled_task() -> None:
        raise asyncio.CancelledError()

    async def scenario() -> str:
        await service._until_deadline(stop_with_cancelled_task(), "Consumer leaving the group")
        return "returned"

    assert asyncio.run(scenario()) == "returned"
    assert "ended with a cancelled Kafka client task" in caplog.text
