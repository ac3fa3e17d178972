"""End-to-end throughput and latency of the Kafka service (`streamer run`) through a local broker.

One broker (started here unless ``--bootstrap-servers`` is given), one service process, and this driver
process, all on one machine. Model: the seed LSTM with 8 features, hidden 64, 2 layers, 1 output
(``torch.manual_seed(0)``), served with default settings.

Throughput: ``--events`` synthetic events over ``--entities`` entities, keyed by entity, are written to a
4-partition input topic before the service starts. The clock runs from the service's first ``/readyz`` 200
(partitions assigned, polled every 20 ms) until the group's committed offsets reach the end of every input
partition (polled every 50 ms with ``AIOKafkaAdminClient.list_consumer_group_offsets``, which does not join
the group). The time from process start is reported too. NOTE: the service commits offsets at its
checkpoints (every ``STREAMER_CHECKPOINT_INTERVAL_MS``, 1 s by default), so the measured time can include up
to one interval after the last batch.

Latency: the same service first gets an unmeasured load of 10,000 events/s for ``--prewarm-seconds``. On the
benchmark machine the broker's CPU use at a load halved after its first 10 to 20 s of small requests (its JVM
compiles their code paths then), and p99 fell from 24 to 11 ms at 10,000 events/s with the same service, so
a fresh broker would put its own warm-up into whichever load came first. Then the service gets paced loads
(events/s, ``--loads``; ``half`` is half the measured throughput), each for ``--warmup-seconds`` of warm-up
and then ``--load-seconds`` measured. Outputs of events created during the warm-up count towards the output
checks but not the percentiles (their p99 is reported as ``warmup_p99_ms``). Input events carry no ``ts``
field, so the service takes the input record's Kafka timestamp (CreateTime, set by this driver when it
appends the record to a batch) as the event time and copies it into the output's ``ts``. The output topic uses
``message.timestamp.type=LogAppendTime``, so the broker stamps each output when it appends it to the log.
The per-record latency is that LogAppendTime minus ``ts``: from the event's creation until its output is
in Kafka (before the offset commit). Both clocks are this machine's, in milliseconds. Outputs are read
after each load finished, so reading them does not compete for CPU. The service's own histogram
``streamer_end_to_end_latency_seconds`` (event timestamp to output acknowledgement) is read from
``/metrics`` at the end of the warm-up and after the load, and its percentiles are estimated from the
bucket differences as PromQL's ``histogram_quantile`` does. ``--alternative NAME=VALUE`` repeats
the loads with a second service that has one ``STREAMER_*`` setting changed (several, separated by spaces,
change together).

CPU: over each measured window, the CPU time of the service (or pass-through), the broker (when started
here) and this driver is read from ``/proc/PID/stat`` and reported as a percentage of one core, with the
share of all cores that was busy on the machine. On a machine where these processes share few cores, a busy
share near 100 % means latency includes waiting for a core.

Client floor: the same loads go through ``kafka_passthrough.py`` (the service's consumer and producer settings,
no decoding, no model), measured the same way, so the latency the Kafka clients and the broker add on this
machine is known alongside the service's.

``benchmarks/kafka_service_profile.py`` profiles the same phases with the service in process.

Usage: python benchmarks/kafka_end_to_end.py [--events N] [--load-seconds S] [--prewarm-seconds S] [--quick]
       [--alternative NAME=VALUE] [--no-floor]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import orjson
import torch
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from streamer.data.synthetic import iter_event_batches
from streamer.kafka.jars import DEFAULT_KAFKA_VERSION
from streamer.kafka.local_broker import LocalKafka
from streamer.kafka.producer import KeyPartitioner, send_records
from streamer.model import SeedNet

INPUT, HIDDEN, LAYERS, OUTPUT, WINDOW = 8, 64, 2, 1, 30
PARTITIONS = 4
RESULTS = Path(__file__).parent / "results" / "kafka_end_to_end.json"
LATENCY_HISTOGRAM = "streamer_end_to_end_latency_seconds"
TARGET_EVENTS_PER_S = 100_000
TARGET_P99_MS = 10.0
TARGET_P99_LOAD = 10_000
LOG_APPEND_TIME = 1  # ConsumerRecord.timestamp_type of a broker-stamped record (0 is CreateTime)
# Records per send_records call while filling the input topic, so that acknowledgements are awaited in chunks.
PREFILL_CHUNK = 65_536
PRODUCER_BATCH_BYTES = 512 * 1024
# Events in the pool that paced loads cycle through.
LOAD_POOL_EVENTS = 100_000
READY_POLL_S = 0.02
COMMIT_POLL_S = 0.05
PACING_TICK_S = 0.001
SERVICE_START_TIMEOUT_S = 120.0
DRAIN_TIMEOUT_S = 300.0
PREWARM_EVENTS_PER_S = 10_000


# -- the service process ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class Topics:
    input: str
    output: str
    dead_letter: str
    group: str

    @property
    def names(self) -> tuple[str, str, str]:
        return self.input, self.output, self.dead_letter

    @classmethod
    def unique(cls, prefix: str) -> Topics:
        suffix = uuid.uuid4().hex[:8]
        return cls(f"{prefix}-in-{suffix}", f"{prefix}-out-{suffix}", f"{prefix}-dlq-{suffix}",
                   f"{prefix}-group-{suffix}")


class ServiceProcess:
    """``python -m streamer run`` configured through ``STREAMER_*`` variables."""

    def __init__(self, work_dir: Path, bootstrap: str, model_path: Path, topics: Topics,
                 extra_env: dict[str, str] | None = None) -> None:
        self.metrics_port = free_port()
        self.log_path = work_dir / f"service-{topics.group}.log"
        env = {
            **os.environ,
            "STREAMER_MODEL": str(model_path),
            "STREAMER_BOOTSTRAP_SERVERS": bootstrap,
            "STREAMER_INPUT_TOPICS": topics.input,
            "STREAMER_OUTPUT_TOPIC": topics.output,
            "STREAMER_DEAD_LETTER_TOPIC": topics.dead_letter,
            "STREAMER_GROUP_ID": topics.group,
            "STREAMER_TOPIC_PARTITIONS": str(PARTITIONS),
            "STREAMER_METRICS_PORT": str(self.metrics_port),
            "STREAMER_LOG_LEVEL": "INFO",
            **(extra_env or {}),
        }
        command = [sys.executable, "-m", "streamer", "run"]
        self._log = self.log_path.open("wb")
        self.started = time.perf_counter()
        self.process = subprocess.Popen(command, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def get(self, path: str) -> tuple[int, str]:
        url = f"http://127.0.0.1:{self.metrics_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    def metrics_text(self) -> str:
        status, text = self.get("/metrics")
        if status != 200:
            raise RuntimeError(f"GET /metrics returned {status}: {text[:200]}")
        return text

    async def wait_ready(self, timeout_s: float = SERVICE_START_TIMEOUT_S) -> float:
        """Poll ``/readyz`` until it returns 200 and return that ``perf_counter`` time."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"service exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if (await asyncio.to_thread(self.get, "/readyz"))[0] == 200:
                    return time.perf_counter()
            except OSError:
                pass
            await asyncio.sleep(READY_POLL_S)
        raise TimeoutError(f"service not ready after {timeout_s:.0f} s:\n{self.log_tail()}")

    def stop(self, timeout_s: float = 60.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
            raise
        finally:
            self._log.close()

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]


# -- broker helpers --------------------------------------------------------------------------------------


class Broker:
    """Admin client, a group-less consumer for end offsets, and a producer, on one bootstrap address.

    ``pid`` is the broker's process id when it runs on this machine, for the CPU figures.
    """

    def __init__(self, bootstrap: str, pid: int | None = None) -> None:
        self.bootstrap = bootstrap
        self.pid = pid
        self.admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        self.offsets_consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
        self.producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=0,
                                         max_batch_size=PRODUCER_BATCH_BYTES, max_request_size=8 << 20)

    async def start(self) -> None:
        await self.admin.start()
        await self.offsets_consumer.start()
        await self.producer.start()

    async def close(self) -> None:
        await self.producer.stop()
        await self.offsets_consumer.stop()
        await self.admin.close()

    async def create_topics(self, topics: Topics) -> None:
        # The output topic gets as many partitions as the input, so the service writes each output to its
        # input's partition number instead of hashing the key.
        # Outputs get broker-side timestamps: the time each one was appended to the log.
        size = {"max.message.bytes": str(8 << 20)}
        await self.admin.create_topics([
            NewTopic(name, PARTITIONS, 1,
                     topic_configs={**size, "message.timestamp.type": "LogAppendTime"} if name == topics.output
                     else size)
            for name in topics.names])

    async def end_offsets(self, topic: str) -> dict[int, int]:
        partitions = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        ends = await self.offsets_consumer.end_offsets(partitions)
        return {tp.partition: offset for tp, offset in ends.items()}

    async def committed(self, group: str, topic: str) -> dict[int, int]:
        offsets = await self.admin.list_consumer_group_offsets(group)
        return {tp.partition: meta.offset for tp, meta in offsets.items() if tp.topic == topic and meta.offset >= 0}

    async def wait_committed(self, group: str, topic: str, targets: dict[int, int], timeout_s: float,
                             service: ServiceProcess) -> float:
        """Poll the group's committed offsets until each partition reaches ``targets`` and return that time."""
        deadline = time.monotonic() + timeout_s
        while True:
            committed = await self.committed(group, topic)
            if all(committed.get(p, 0) >= end for p, end in targets.items()):
                return time.perf_counter()
            if service.process.poll() is not None:
                raise RuntimeError(f"service exited with {service.process.returncode}:\n{service.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"committed offsets {committed} did not reach {targets} in {timeout_s:.0f} s")
            await asyncio.sleep(COMMIT_POLL_S)


async def read_outputs(bootstrap: str, topic: str, start: dict[int, int], end: dict[int, int]) -> list:
    """Read the records of ``topic`` between the ``start`` and ``end`` offsets of every partition."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                max_partition_fetch_bytes=8 << 20, fetch_max_bytes=32 << 20)
    await consumer.start()
    records = []
    try:
        partitions = [TopicPartition(topic, p) for p in range(PARTITIONS) if end[p] > start.get(p, 0)]
        if not partitions:
            return records
        consumer.assign(partitions)
        for tp in partitions:
            consumer.seek(tp, start.get(tp.partition, 0))
        remaining = set(partitions)
        while remaining:
            fetched = await consumer.getmany(timeout_ms=1000, max_records=50_000)
            for tp, messages in fetched.items():
                limit = end[tp.partition]
                records.extend(message for message in messages if message.offset < limit)
            for tp in list(remaining):
                if await consumer.position(tp) >= end[tp.partition]:
                    remaining.discard(tp)
    finally:
        await consumer.stop()
    return records


# -- events ----------------------------------------------------------------------------------------------


def entity_key(value: bytes) -> bytes:
    """Return the entity id of a synthetic event, which starts with ``{"entity":"<id>"``."""
    start = value.index(b'"entity":"') + 10
    return value[start:value.index(b'"', start)]


def make_events(n_events: int, n_entities: int, seed: int) -> tuple[list[bytes], list[bytes]]:
    values = [value for batch in iter_event_batches(n_events, n_entities, INPUT, seed=seed) for value in batch]
    return [entity_key(value) for value in values], values


def without_ts(value: bytes) -> bytes:
    """Drop the ``ts`` field, so that the service takes the record's Kafka timestamp as the event time."""
    document = orjson.loads(value)
    del document["ts"]
    return orjson.dumps(document)


def keyed_records(partitioner: KeyPartitioner, keys: list[bytes], values: list[bytes]
                  ) -> list[tuple[int, bytes, bytes]]:
    return [(partitioner(key), key, value) for key, value in zip(keys, values)]


async def prefill(broker: Broker, topic: str, records: list[tuple[int, bytes, bytes]]) -> float:
    """Write every record to ``topic``, wait for the acknowledgements and return the seconds taken."""
    started = time.perf_counter()
    for start in range(0, len(records), PREFILL_CHUNK):
        futures = await send_records(broker.producer, topic, records[start:start + PREFILL_CHUNK])
        await asyncio.gather(*futures)
    return time.perf_counter() - started


async def paced_load(broker: Broker, topic: str, pool: list[tuple[int, bytes, bytes]], rate: float,
                     seconds: float, pool_start: int) -> dict:
    """Send ``rate * seconds`` records at ``rate`` per second, each due record as soon as a tick notices it.

    Records are appended with ``timestamp=None``, so each gets the time of its append as its CreateTime.
    """
    total = int(rate * seconds)
    futures = []
    sent = 0
    started = time.perf_counter()
    while sent < total:
        due = min(total, int((time.perf_counter() - started) * rate) + 1)
        if due > sent:
            chunk = [pool[(pool_start + index) % len(pool)] for index in range(sent, due)]
            futures += await send_records(broker.producer, topic, chunk)
            sent = due
        await asyncio.sleep(PACING_TICK_S)
    finished = time.perf_counter()
    await asyncio.gather(*futures)
    return {"sent": sent, "send_seconds": finished - started, "achieved_events_per_s": sent / (finished - started)}


# -- CPU -------------------------------------------------------------------------------------------------


@dataclass
class CpuSample:
    """Cumulative CPU ticks of each named process and of the machine at one moment."""

    monotonic_s: float
    process_ticks: dict[str, int]
    machine_busy_ticks: int
    machine_total_ticks: int


class CpuMeter:
    """CPU time of named processes and of the whole machine, from ``/proc`` (Linux only).

    A process that has exited, or a ``/proc`` that cannot be read, leaves its figure out instead of failing the
    benchmark.
    """

    def __init__(self, processes: dict[str, int | None]) -> None:
        self.processes = {name: pid for name, pid in processes.items() if pid is not None}
        self.ticks_per_s = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    @staticmethod
    def _process_ticks(pid: int) -> int | None:
        try:
            text = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return None
        # The command name is in parentheses and may contain spaces, so fields are counted after it.
        # utime and stime are fields 14 and 15 of the whole line.
        fields = text.rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])

    @staticmethod
    def _machine_ticks() -> tuple[int, int]:
        try:
            first = Path("/proc/stat").read_text().splitlines()[0].split()
        except OSError:
            return 0, 0
        values = [int(value) for value in first[1:9]]  # user nice system idle iowait irq softirq steal
        total = sum(values)
        return total - values[3] - values[4], total

    def sample(self) -> CpuSample:
        ticks = {name: self._process_ticks(pid) for name, pid in self.processes.items()}
        busy, total = self._machine_ticks()
        return CpuSample(time.monotonic(), {name: value for name, value in ticks.items() if value is not None},
                         busy, total)

    def shares(self, before: CpuSample, after: CpuSample) -> dict[str, float]:
        """Return the percent of one core each process used between the samples, and the machine's busy percent."""
        elapsed_s = after.monotonic_s - before.monotonic_s
        result = {}
        if elapsed_s <= 0:
            return result
        for name, ticks in after.process_ticks.items():
            if name in before.process_ticks:
                result[f"{name}_core_percent"] = round(
                    100.0 * (ticks - before.process_ticks[name]) / self.ticks_per_s / elapsed_s, 1)
        total = after.machine_total_ticks - before.machine_total_ticks
        if total > 0:
            result["machine_busy_percent"] = round(
                100.0 * (after.machine_busy_ticks - before.machine_busy_ticks) / total, 1)
        return result


def format_cpu(cpu: dict | None, process: str) -> str:
    """Format the shares as ``process/broker/driver (machine)`` in percent, with ``-`` for a missing figure."""
    cpu = cpu or {}

    def value(key: str) -> str:
        return f"{cpu[key]:.0f}" if key in cpu else "-"

    return (f"{value(f'{process}_core_percent')}/{value('broker_core_percent')}/{value('driver_core_percent')} "
            f"({value('machine_busy_percent')})")


# -- metrics ---------------------------------------------------------------------------------------------


def histogram_buckets(metrics_text: str, name: str) -> list[tuple[float, float]]:
    """Return ``(upper bound, cumulative count)`` of a histogram without labels, sorted by bound."""
    buckets = []
    for line in metrics_text.splitlines():
        if line.startswith(f"{name}_bucket{{"):
            bound = line.split('le="', 1)[1].split('"', 1)[0]
            buckets.append((float("inf") if bound == "+Inf" else float(bound), float(line.rsplit(" ", 1)[1])))
    return sorted(buckets)


def histogram_sum_count(metrics_text: str, name: str) -> tuple[float, float]:
    values = {}
    for line in metrics_text.splitlines():
        for suffix in ("_sum", "_count"):
            if line.startswith(f"{name}{suffix} "):
                values[suffix] = float(line.rsplit(" ", 1)[1])
    return values.get("_sum", 0.0), values.get("_count", 0.0)


def bucket_quantile(buckets: list[tuple[float, float]], quantile: float) -> float | None:
    """Estimate a quantile from cumulative buckets by linear interpolation, as PromQL's histogram_quantile."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = quantile * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return lower_bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / max(count - lower_count, 1e-12)
        lower_bound, lower_count = bound, count
    return None


def histogram_window(before: str, after: str) -> dict:
    """Summarize the service's histograms between two /metrics scrapes."""
    after_buckets = histogram_buckets(after, LATENCY_HISTOGRAM)
    before_counts = dict(histogram_buckets(before, LATENCY_HISTOGRAM))
    delta = [(bound, count - before_counts.get(bound, 0.0)) for bound, count in after_buckets]
    summary = {"observations": int(delta[-1][1]) if delta else 0}
    for quantile in (0.5, 0.99):
        value = bucket_quantile(delta, quantile)
        summary[f"p{int(quantile * 100)}_ms"] = None if value is None else round(value * 1000, 2)
    for name, key in (("streamer_batch_events", "mean_batch_events"),
                      ("streamer_batch_duration_seconds", "mean_batch_duration_ms"),
                      ("streamer_inference_duration_seconds", "mean_inference_ms"),
                      ("streamer_gc_pause_seconds", "mean_gc_pause_ms")):
        sum_after, count_after = histogram_sum_count(after, name)
        sum_before, count_before = histogram_sum_count(before, name)
        batches = count_after - count_before
        mean = (sum_after - sum_before) / batches if batches else None
        if mean is not None and key.endswith("_ms"):
            mean *= 1000
        summary[key] = None if mean is None else round(mean, 3)
    summary["batches"] = int(histogram_sum_count(after, "streamer_batch_events")[1]
                             - histogram_sum_count(before, "streamer_batch_events")[1])
    summary["gc_pauses"] = int(histogram_sum_count(after, "streamer_gc_pause_seconds")[1]
                               - histogram_sum_count(before, "streamer_gc_pause_seconds")[1])
    return summary


def latency_summary(records: list, measured_from_ms: float = 0.0) -> dict:
    """Per-record latency (output LogAppendTime minus the input timestamp copied into ``ts``), in ms.

    Counts cover every record; percentiles cover the records whose input was created at or after
    ``measured_from_ms`` (epoch ms), the end of the warm-up.
    """
    latencies = np.empty(len(records), np.float64)
    created = np.empty(len(records), np.float64)
    sources = set()
    if any(record.timestamp_type != LOG_APPEND_TIME for record in records):
        raise RuntimeError("output records do not carry LogAppendTime timestamps")
    for index, record in enumerate(records):
        document = orjson.loads(record.value)
        created[index] = document["ts"]
        latencies[index] = record.timestamp - document["ts"]
        sources.add((document["source"]["partition"], document["source"]["offset"]))
    measured = latencies[created >= measured_from_ms]
    summary = {"outputs": len(records), "distinct_sources": len(sources), "measured": int(measured.size)}
    if measured.size:
        for quantile in (50, 90, 99, 99.9):
            summary[f"p{quantile:g}_ms"] = float(np.percentile(measured, quantile))
        summary["max_ms"] = float(measured.max())
    warmup = latencies[created < measured_from_ms]
    if warmup.size:
        summary["warmup_p99_ms"] = float(np.percentile(warmup, 99))
    return summary


# -- phases ----------------------------------------------------------------------------------------------


def write_model(path: Path) -> Path:
    torch.manual_seed(0)
    torch.save(SeedNet(INPUT, HIDDEN, WINDOW, OUTPUT, LAYERS).eval().state_dict(), path)
    return path


async def fill_input(broker: Broker, args: argparse.Namespace, prefix: str) -> tuple[Topics, dict[int, int], float]:
    """Create new topics, write ``args.events`` events to the input, and return topics, end offsets and seconds."""
    topics = Topics.unique(prefix)
    await broker.create_topics(topics)
    keys, values = make_events(args.events, args.entities, seed=0)
    records = keyed_records(KeyPartitioner(PARTITIONS), keys, values)
    del keys, values
    print(f"Writing {len(records):,} events to {topics.input} ...", flush=True)
    prefill_s = await prefill(broker, topics.input, records)
    return topics, await broker.end_offsets(topics.input), prefill_s


def load_pool(args: argparse.Namespace, loads: list[int]) -> list[tuple[int, bytes, bytes]]:
    """Return the keyed events that paced loads cycle through, without their ``ts`` field."""
    seconds = args.load_seconds + getattr(args, "warmup_seconds", 0.0)
    keys, values = make_events(min(LOAD_POOL_EVENTS, int(max(loads) * seconds) + 1), args.entities, seed=1)
    return keyed_records(KeyPartitioner(PARTITIONS), keys, [without_ts(value) for value in values])


async def measure_throughput(broker: Broker, work_dir: Path, model_path: Path, args: argparse.Namespace,
                             environment: dict[str, str] | None = None) -> tuple[dict, ServiceProcess, Topics]:
    """Fill the input topic, start the service, and time it until every input offset is committed."""
    topics, input_ends, prefill_s = await fill_input(broker, args, "bench")
    service = ServiceProcess(work_dir, broker.bootstrap, model_path, topics, extra_env=environment)
    ready = await service.wait_ready()
    done = await broker.wait_committed(topics.group, topics.input, input_ends, DRAIN_TIMEOUT_S, service)
    metrics_text = await asyncio.to_thread(service.metrics_text)
    outputs = sum((await broker.end_offsets(topics.output)).values())
    dead_letters = sum((await broker.end_offsets(topics.dead_letter)).values())
    batch_sum, batch_count = histogram_sum_count(metrics_text, "streamer_batch_events")
    consume_s = done - ready
    result = {
        "events": sum(input_ends.values()),
        "entities": args.entities,
        "partitions": PARTITIONS,
        "prefill_seconds": round(prefill_s, 3),
        "startup_seconds": round(ready - service.started, 3),
        "consume_seconds": round(consume_s, 3),
        "events_per_s": round(args.events / consume_s),
        "events_per_s_including_startup": round(args.events / (done - service.started)),
        "outputs": outputs,
        "dead_letters": dead_letters,
        "mean_batch_events": round(batch_sum / batch_count, 1) if batch_count else None,
    }
    if args.verify_outputs:
        records = await read_outputs(broker.bootstrap, topics.output, {}, await broker.end_offsets(topics.output))
        result["distinct_sources"] = len({(orjson.loads(r.value)["source"]["partition"],
                                           orjson.loads(r.value)["source"]["offset"]) for r in records})
    return result, service, topics


async def warmed_load(broker: Broker, topic: str, pool: list[tuple[int, bytes, bytes]], rate: float,
                      seconds: float, warmup_s: float, pool_start: int,
                      read_metrics: Callable[[], str] | None = None,
                      cpu: CpuMeter | None = None) -> tuple[dict, float, str | None]:
    """Offer ``rate`` events/s for ``warmup_s + seconds``.

    Returns the load summary (with ``cpu``, the shares of ``cpu`` over the measured seconds, when given), the
    end of the warm-up in epoch ms, and the output of ``read_metrics`` called when the warm-up ended (None
    without it).
    """
    print(f"  offering {rate:,} events/s for {warmup_s:g} s of warm-up and {seconds:g} s measured ...", flush=True)
    measured_from_ms = time.time() * 1000 + warmup_s * 1000
    load = asyncio.create_task(paced_load(broker, topic, pool, rate, warmup_s + seconds, pool_start))
    await asyncio.sleep(warmup_s)
    cpu_before = cpu.sample() if cpu is not None else None
    metrics = await asyncio.to_thread(read_metrics) if read_metrics is not None else None
    summary = await load
    if cpu is not None and cpu_before is not None:
        summary["cpu"] = cpu.shares(cpu_before, cpu.sample())
    return summary, measured_from_ms, metrics


async def wait_for_outputs(broker: Broker, topic: str, start: dict[int, int], count: int, log_name: str) -> None:
    """Wait until ``topic`` contains ``count`` records after the end offsets ``start``."""
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while True:
        end = await broker.end_offsets(topic)
        if sum(end.values()) - sum(start.values()) >= count:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"Timed out after {DRAIN_TIMEOUT_S:.0f} s waiting for {count:,} outputs in {topic}. "
                               f"See {log_name}")
        await asyncio.sleep(COMMIT_POLL_S)


async def prewarm(broker: Broker, topics: Topics, pool: list[tuple[int, bytes, bytes]], seconds: float,
                  log_name: str) -> int:
    """Offer an unmeasured load for ``seconds``, wait for all its outputs and return the events sent."""
    if seconds <= 0:
        return 0
    print(f"  pre-warming with {PREWARM_EVENTS_PER_S:,} events/s for {seconds:g} s (not measured) ...", flush=True)
    output_start = await broker.end_offsets(topics.output)
    sent = await paced_load(broker, topics.input, pool, PREWARM_EVENTS_PER_S, seconds, 0)
    await wait_for_outputs(broker, topics.output, output_start, sent["sent"], log_name)
    return sent["sent"]


async def measure_latency(broker: Broker, service: ServiceProcess, topics: Topics, loads: list[int],
                          seconds: float, warmup_s: float, pool: list[tuple[int, bytes, bytes]],
                          prewarm_s: float = 0.0) -> list[dict]:
    """Offer each load to a running, caught-up service and summarize the latency of its outputs."""
    rows = []
    pool_start = await prewarm(broker, topics, pool, prewarm_s, str(service.log_path))
    for rate in loads:
        output_start = await broker.end_offsets(topics.output)
        cpu = CpuMeter({"service": service.process.pid, "broker": broker.pid, "driver": os.getpid()})
        sent, measured_from_ms, before = await warmed_load(broker, topics.input, pool, rate, seconds, warmup_s,
                                                           pool_start, service.metrics_text, cpu)
        pool_start += sent["sent"]
        produced = time.perf_counter()
        input_ends = await broker.end_offsets(topics.input)
        done = await broker.wait_committed(topics.group, topics.input, input_ends, DRAIN_TIMEOUT_S, service)
        after = await asyncio.to_thread(service.metrics_text)
        output_end = await broker.end_offsets(topics.output)
        records = await read_outputs(broker.bootstrap, topics.output, output_start, output_end)
        row = {"offered_events_per_s": rate, **{k: round(v, 1) if isinstance(v, float) else v
                                                for k, v in sent.items()},
               "drain_seconds_after_last_send": round(done - produced, 3),
               "kafka_timestamps": {k: round(v, 2) if isinstance(v, float) else v
                                    for k, v in latency_summary(records, measured_from_ms).items()},
               "service_histogram": histogram_window(before, after)}
        rows.append(row)
    return rows


async def run_benchmark(args: argparse.Namespace, bootstrap: str, work_dir: Path, broker_pid: int | None = None
                        ) -> dict:
    model_path = write_model(work_dir / "seed-lstm.pt")
    broker = Broker(bootstrap, broker_pid)
    await broker.start()
    try:
        throughput, service, topics = await measure_throughput(broker, work_dir, model_path, args)
        print_throughput(throughput)
        loads = resolve_loads(args.loads, throughput["events_per_s"])
        pool = load_pool(args, loads)
        # The pool and the clients live until the end. Frozen, they stay out of full collections, which
        # otherwise pause this driver for about 100 ms each, long enough to distort the paced loads.
        gc.collect()
        gc.freeze()

        print("Latency with default settings:", flush=True)
        try:
            default_rows = await measure_latency(broker, service, topics, loads, args.load_seconds,
                                                 args.warmup_seconds, pool, args.prewarm_seconds)
        finally:
            exit_code = service.stop()
        if exit_code != 0:
            raise RuntimeError(f"service exited with {exit_code}:\n{service.log_tail()}")
        runs = [{"settings": "defaults", "environment": {}, "throughput": throughput, "loads": default_rows}]

        for environment in args.alternative:
            runs.append(await alternative_run(broker, work_dir, model_path, environment, loads, args, pool))
        floor = None if args.no_floor else await measure_floor(broker, work_dir, loads, args.load_seconds,
                                                               args.warmup_seconds, pool, args.prewarm_seconds)
        return {"throughput": throughput, "latency": runs, "client_floor": floor}
    finally:
        await broker.close()


async def alternative_run(broker: Broker, work_dir: Path, model_path: Path, environment: dict[str, str],
                          loads: list[int], args: argparse.Namespace, pool: list[tuple[int, bytes, bytes]]) -> dict:
    """Repeat both phases with a service that has one setting changed, on new topics, at the same loads."""
    label = " ".join(f"{name}={value}" for name, value in environment.items())
    print(f"With {label}:", flush=True)
    throughput, service, topics = await measure_throughput(broker, work_dir, model_path, args, environment)
    print_throughput(throughput)
    try:
        rows = await measure_latency(broker, service, topics, loads, args.load_seconds, args.warmup_seconds, pool,
                                     args.prewarm_seconds)
    finally:
        exit_code = service.stop()
    if exit_code != 0:
        raise RuntimeError(f"service exited with {exit_code}:\n{service.log_tail()}")
    return {"settings": label, "environment": environment, "throughput": throughput, "loads": rows}


async def measure_floor(broker: Broker, work_dir: Path, loads: list[int], seconds: float, warmup_s: float,
                        pool: list[tuple[int, bytes, bytes]], prewarm_s: float = 0.0) -> list[dict]:
    """Offer the same loads to ``kafka_passthrough.py``: the latency of the Kafka clients with no processing."""
    print("Latency floor (aiokafka pass-through, no processing):", flush=True)
    topics = Topics.unique("floor")
    await broker.create_topics(topics)
    log = (work_dir / "passthrough.log").open("wb")
    process = subprocess.Popen([sys.executable, str(Path(__file__).parent / "kafka_passthrough.py"), broker.bootstrap,
                                topics.input, topics.output, topics.group], stdout=subprocess.PIPE, stderr=log)
    try:
        ready = await asyncio.wait_for(asyncio.to_thread(process.stdout.readline), SERVICE_START_TIMEOUT_S)
        if ready.strip() != b"ready":
            raise RuntimeError(f"the pass-through exited with {process.poll()}; see {log.name}")
        rows = []
        pool_start = await prewarm(broker, topics, pool, prewarm_s, log.name)
        for rate in loads:
            output_start = await broker.end_offsets(topics.output)
            cpu = CpuMeter({"passthrough": process.pid, "broker": broker.pid, "driver": os.getpid()})
            sent, measured_from_ms, _ = await warmed_load(broker, topics.input, pool, rate, seconds, warmup_s,
                                                          pool_start, cpu=cpu)
            pool_start += sent["sent"]
            await wait_for_outputs(broker, topics.output, output_start, sent["sent"], log.name)
            output_end = await broker.end_offsets(topics.output)
            records = await read_outputs(broker.bootstrap, topics.output, output_start, output_end)
            rows.append({"offered_events_per_s": rate, **{k: round(v, 1) if isinstance(v, float) else v
                                                          for k, v in sent.items()},
                         "kafka_timestamps": {k: round(v, 2) if isinstance(v, float) else v
                                              for k, v in latency_summary(records, measured_from_ms).items()}})
        return rows
    finally:
        process.kill()
        process.wait(10)
        log.close()


def resolve_loads(spec: str, max_events_per_s: int) -> list[int]:
    loads = []
    for item in spec.split(","):
        item = item.strip()
        loads.append(max(1, max_events_per_s // 2) if item == "half" else int(item))
    return loads


# -- report ----------------------------------------------------------------------------------------------


def print_throughput(throughput: dict) -> None:
    print(f"Throughput: {throughput['events']:,} events in {throughput['consume_seconds']:.2f} s = "
          f"{throughput['events_per_s']:,} events/s ({throughput['events_per_s_including_startup']:,} events/s "
          f"including {throughput['startup_seconds']:.1f} s of startup); mean batch "
          f"{throughput['mean_batch_events']} events", flush=True)


def format_table(report: dict) -> str:
    lines = ["| settings | throughput ev/s | offered ev/s | achieved ev/s | outputs | p50 ms | p99 ms | max ms | "
             "histogram p50 ms | histogram p99 ms | mean batch | CPU % service/broker/driver (machine) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for run in report["latency"]:
        for row in run["loads"]:
            kafka, histogram = row["kafka_timestamps"], row["service_histogram"]
            lines.append(f"| {run['settings']} | {run['throughput']['events_per_s']:,} | {row['offered_events_per_s']:,} | {row['achieved_events_per_s']:,.0f} "
                         f"| {kafka['outputs']:,} | {kafka.get('p50_ms', float('nan')):.0f} "
                         f"| {kafka.get('p99_ms', float('nan')):.0f} | {kafka.get('max_ms', float('nan')):.0f} "
                         f"| {histogram['p50_ms']} | {histogram['p99_ms']} | {histogram['mean_batch_events']} "
                         f"| {format_cpu(row.get('cpu'), 'service')} |")
    for row in report.get("client_floor") or []:
        kafka = row["kafka_timestamps"]
        lines.append(f"| client floor (pass-through) | | {row['offered_events_per_s']:,} "
                     f"| {row['achieved_events_per_s']:,.0f} | {kafka['outputs']:,} "
                     f"| {kafka.get('p50_ms', float('nan')):.0f} | {kafka.get('p99_ms', float('nan')):.0f} "
                     f"| {kafka.get('max_ms', float('nan')):.0f} | | | | {format_cpu(row.get('cpu'), 'passthrough')} |")
    return "\n".join(lines)


def check_targets(report: dict) -> dict:
    throughput = report["throughput"]["events_per_s"]
    targets = {"throughput": {"target_events_per_s": TARGET_EVENTS_PER_S, "measured": throughput,
                              "met": throughput >= TARGET_EVENTS_PER_S}}
    default_rows = report["latency"][0]["loads"]
    at_load = [row for row in default_rows if row["offered_events_per_s"] == TARGET_P99_LOAD]
    if at_load:
        p99 = at_load[0]["kafka_timestamps"].get("p99_ms")
        histogram_p99 = at_load[0]["service_histogram"]["p99_ms"]
        floor = [row for row in report.get("client_floor") or [] if row["offered_events_per_s"] == TARGET_P99_LOAD]
        targets["p99_latency"] = {"load_events_per_s": TARGET_P99_LOAD, "target_ms": TARGET_P99_MS,
                                  "measured_ms": p99, "service_histogram_ms": histogram_p99,
                                  "client_floor_ms": floor[0]["kafka_timestamps"].get("p99_ms") if floor else None,
                                  "met": p99 is not None and p99 <= TARGET_P99_MS
                                  and histogram_p99 is not None and histogram_p99 <= TARGET_P99_MS}
    return targets


def check_outputs(report: dict) -> list[str]:
    """Return a message for every phase whose outputs are not exactly one per event."""
    problems = []
    throughput = report["throughput"]
    if throughput["outputs"] != throughput["events"]:
        problems.append(f"throughput phase: {throughput['outputs']} outputs for {throughput['events']} events")
    if "distinct_sources" in throughput and throughput["distinct_sources"] != throughput["events"]:
        problems.append(f"throughput phase: outputs name {throughput['distinct_sources']} distinct input records "
                        f"for {throughput['events']} events")
    if throughput["dead_letters"]:
        problems.append(f"throughput phase: {throughput['dead_letters']} dead letters")
    phases = [(run["settings"], row) for run in report["latency"] for row in run["loads"]]
    phases += [("client floor", row) for row in report.get("client_floor") or []]
    for settings, row in phases:
        kafka = row["kafka_timestamps"]
        if not kafka["outputs"] == kafka["distinct_sources"] == row["sent"]:
            problems.append(f"{settings} at {row['offered_events_per_s']} events/s: {kafka['outputs']} "
                            f"outputs for {kafka['distinct_sources']} distinct inputs, {row['sent']} sent")
    return problems


def machine_info() -> dict:
    cpu = platform.processor()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    import aiokafka

    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(os.sysconf("SC_PAGE_SIZE")
                                                                      * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "python": platform.python_version(), "torch": torch.__version__, "aiokafka": aiokafka.__version__,
            "kafka": DEFAULT_KAFKA_VERSION, "load_average_at_start": os.getloadavg(), "git": git_state()}


def git_state() -> dict:
    """Return the commit and the files that differ from it, because results depend on uncommitted changes too."""
    def git(*arguments: str) -> str:
        completed = subprocess.run(["git", *arguments], capture_output=True, text=True, cwd=Path(__file__).parent)
        return completed.stdout.rstrip("\n") if completed.returncode == 0 else ""

    changed = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines()]
    return {"commit": git("rev-parse", "HEAD"), "modified_files": changed}


# -- command line ----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000, help="events written before the throughput phase")
    parser.add_argument("--entities", type=int, default=10_000, help="distinct entities (Kafka keys)")
    parser.add_argument("--loads", default="1000,10000,half",
                        help="comma-separated offered loads in events/s; 'half' is half the measured throughput")
    parser.add_argument("--load-seconds", type=float, default=20.0,
                        help="measured duration of each offered load, in s, after the warm-up")
    parser.add_argument("--warmup-seconds", type=float, default=2.0,
                        help="start of each load left out of the percentiles and the histogram window, in s")
    parser.add_argument("--prewarm-seconds", type=float, default=30.0,
                        help=f"unmeasured load of {PREWARM_EVENTS_PER_S:,} events/s offered to each service and to "
                             "the pass-through before their measured loads, in s")
    parser.add_argument("--alternative", action="append", default=None, metavar="STREAMER_NAME=VALUE",
                        help="repeat the loads with a service that has this setting changed. Repeatable, and "
                             "several assignments separated by spaces change together")
    parser.add_argument("--no-alternative", action="store_true", help="measure the default settings only")
    parser.add_argument("--no-floor", action="store_true",
                        help="skip the client floor (the same loads through a pass-through with no processing)")
    parser.add_argument("--quick", action="store_true",
                        help="50,000 events, 5 s per load, 2 s of pre-warming, no alternative, outputs verified, "
                             "no results file")
    parser.add_argument("--verify-outputs", action="store_true",
                        help="read every output of the throughput phase and check one per input record")
    parser.add_argument("--bootstrap-servers", help="use this running broker instead of starting a local one")
    parser.add_argument("--output", type=Path, help=f"results file (default {RESULTS}; none with --quick)")
    args = parser.parse_args(argv)

    if args.quick:
        args.events = min(args.events, 50_000)
        args.load_seconds = min(args.load_seconds, 5.0)
        args.warmup_seconds = min(args.warmup_seconds, 1.0)
        args.prewarm_seconds = min(args.prewarm_seconds, 2.0)
        args.verify_outputs = True
    if args.no_alternative or args.alternative is None:
        args.alternative = []

    environments = []
    for alternative in args.alternative:
        assignments = alternative.split()
        if not assignments or any("=" not in item or not item.startswith("STREAMER_") for item in assignments):
            parser.error(f"invalid --alternative {alternative!r}: expected STREAMER_NAME=VALUE")
        environments.append(dict(item.split("=", 1) for item in assignments))
    args.alternative = environments
    if args.output is None and not args.quick:
        args.output = RESULTS
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    info = machine_info()

    with tempfile.TemporaryDirectory(prefix="streamer-bench-") as temporary:
        work_dir = Path(temporary)
        broker = None
        bootstrap = args.bootstrap_servers
        if bootstrap is None:
            broker = LocalKafka(work_dir / "kafka")
            print("Starting a local Kafka broker ...", flush=True)
            bootstrap = broker.start(timeout_s=120)
        try:
            report = asyncio.run(run_benchmark(args, bootstrap, work_dir, broker.pid if broker is not None else None))
        finally:
            if broker is not None:
                broker.stop()

    report = {"machine": info, "command": "python " + " ".join(sys.argv), "prewarm_seconds": args.prewarm_seconds,
              "date": time.strftime("%Y-%m-%d"), "model": {"input": INPUT, "hidden": HIDDEN, "layers": LAYERS,
                                                          "output": OUTPUT},
              "latency_definition": "output record LogAppendTime minus input record CreateTime (copied by the "
                                    "service into the output's ts), in ms. service_histogram is "
                                    f"{LATENCY_HISTOGRAM} (input timestamp to output acknowledgement) over "
                                    "the same window",
              **report}
    report["targets"] = check_targets(report)
    report["problems"] = check_outputs(report)
    report["total_seconds"] = round(time.perf_counter() - started, 1)

    print(format_table(report))
    for name, target in report["targets"].items():
        print(f"target {name}: {'met' if target['met'] else 'NOT met'} ({target})")
    for problem in report["problems"]:
        print(f"PROBLEM: {problem}")
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.output}")
    print(f"total {report['total_seconds']:.0f} s")
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
