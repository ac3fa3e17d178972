"""Helpers for service tests: run ``streamer run`` as a subprocess and read topics with aiokafka."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewPartitions


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServiceProcess:
    """``streamer run`` in a subprocess configured through STREAMER_* variables."""

    def __init__(self, tmp_path: Path, **settings) -> None:
        self.metrics_port = free_port()
        self.log_path = tmp_path / f"service-{self.metrics_port}.log"
        env = {**os.environ, "STREAMER_METRICS_PORT": str(self.metrics_port), "STREAMER_LOG_LEVEL": "INFO"}
        env.update({f"STREAMER_{name.upper()}": str(value) for name, value in settings.items()})
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen([sys.executable, "-m", "streamer", "run"], env=env, stdout=self._log,
                                        stderr=subprocess.STDOUT)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.metrics_port}{path}"

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.url(path), timeout=2) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"service exited with {self.process.returncode}:\n{self.log()}")
            try:
                if self.get("/readyz")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"service not ready after {timeout_s} s:\n{self.log()}")

    def wait_for_log(self, text: str, timeout_s: float = 60.0) -> None:
        """Wait until ``text`` appears in the log; fail if the process exits or the time runs out."""
        deadline = time.monotonic() + timeout_s
        while text not in self.log():
            assert self.process.poll() is None, self.log()
            assert time.monotonic() < deadline, f"{text!r} not logged within {timeout_s} s:\n{self.log()}"
            time.sleep(0.5)

    def metric(self, name: str) -> float:
        """Sum of all samples of ``name`` in the /metrics output."""
        _, text = self.get("/metrics")
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(name) and (line[len(name)] in " {"))

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout_s)
        finally:
            self._log.close()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]


async def produce(bootstrap: str, topic: str, records: list[tuple[bytes | None, bytes]], partition: int | None = None
                  ) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", max_request_size=8 * 1024 * 1024)
    await producer.start()
    try:
        futures = [await producer.send(topic, key=key, value=value, partition=partition) for key, value in records]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def read_topic(bootstrap: str, topic: str, expected: int, timeout_s: float = 60.0,
                     isolation_level: str = "read_uncommitted") -> list:
    """Read from the beginning until ``expected`` records arrived or ``timeout_s`` passed."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                isolation_level=isolation_level, max_partition_fetch_bytes=8 * 1024 * 1024)
    await consumer.start()
    records = []
    try:
        deadline = time.monotonic() + timeout_s
        while len(records) < expected and time.monotonic() < deadline:
            fetched = await consumer.getmany(timeout_ms=500)
            for messages in fetched.values():
                records.extend(messages)
    finally:
        await consumer.stop()
    return records


async def committed_offsets(bootstrap: str, group_id: str, topic: str, partitions: int) -> dict[int, int | None]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group_id, enable_auto_commit=False)
    await consumer.start()
    try:
        return {p: await consumer.committed(TopicPartition(topic, p)) for p in range(partitions)}
    finally:
        await consumer.stop()


async def create_topics(bootstrap: str, topics: dict[str, int]) -> None:
    from aiokafka.admin import NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, count, 1, topic_configs={"max.message.bytes": str(8 << 20)})
                                   for name, count in topics.items()])
    finally:
        await admin.close()


async def add_partitions(bootstrap: str, topic: str, total: int) -> None:
    """Give ``topic`` ``total`` partitions, as ``kafka-topics.sh --alter --partitions`` does."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_partitions({topic: NewPartitions(total_count=total)})
    finally:
        await admin.close()
