"""Cost of durability: service throughput with and without the changelog and exactly-once, and restore time.

One broker (started here unless ``--bootstrap-servers`` is given), one service process at a time, and this
driver process, all on one machine. Model: the seed LSTM with 8 features, hidden 64, 2 layers, 1 output
(``torch.manual_seed(0)``); services run with ``STREAMER_TORCH_THREADS=1``.

Throughput: ``--events`` synthetic events over ``--entities`` entities, keyed by entity, are written once to a
4-partition input topic. Each configuration then reads that same topic with its own consumer group and
output topic: (a) at-least-once without the changelog, (b) at-least-once with the changelog, (c)
exactly-once with the changelog. The clock runs from the service's first ``/readyz`` 200 (polled every
20 ms) until the group's committed offsets reach the end of every input partition (polled every 50 ms with
``AIOKafkaAdminClient.list_consumer_group_offsets``). The configurations run ``--repeats`` times, interleaved
(a, b, c, a, b, c, ...), and the median of each is reported. NOTE: offsets are committed at checkpoints
(every ``STREAMER_CHECKPOINT_INTERVAL_MS``, 1 s by default), so a measurement can include up to one interval
after the last batch.

Restore: ``--restore-entities`` state records of this model are written to a changelog topic with 4
partitions (each entity on its key's partition, as the service places them), with aiokafka record batches
and without transactions. Then ``streamer.kafka.restore.restore_partition`` loads every partition into one
``StateArena``, first one partition after the other, then all partitions concurrently with
``asyncio.gather``. Last, a service process is started on that changelog and timed from process start to
``/readyz`` 200, which waits for the restore of every assigned partition.

Scale-out: a second member then joins the group. It is timed from its process start until ``/readyz``
returns 200 on both members again, and the changelog records each member read for that rebalance are
counted (``streamer_restored_records_total``). The first member keeps the state of the partitions the
rebalance gives back to it, so it reads none.

Usage: python benchmarks/durability.py [--events N] [--restore-entities N] [--repeats N] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import os
import pstats
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import torch
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

import kafka_end_to_end as e2e
from streamer.data.synthetic import iter_event_batches
from streamer.kafka.local_broker import LocalKafka
from streamer.kafka.producer import KeyPartitioner, send_records
from streamer.kafka.restore import restore_partition
from streamer.model import SeedNet, load_model
from streamer.state.arena import StateArena
from streamer.state.changelog import StateCodec, changelog_topic

INPUT, HIDDEN, LAYERS, OUTPUT, WINDOW = 8, 64, 2, 1, 30
PARTITIONS = 4
RESULTS = Path(__file__).parent / "results" / "durability.json"
CONFIGURATIONS = {
    "at-least-once": {"STREAMER_GUARANTEE": "at-least-once", "STREAMER_CHANGELOG": "false"},
    "at-least-once + changelog": {"STREAMER_GUARANTEE": "at-least-once", "STREAMER_CHANGELOG": "true"},
    "exactly-once + changelog": {"STREAMER_GUARANTEE": "exactly-once", "STREAMER_CHANGELOG": "true"},
}
BASELINE = "at-least-once"
# Maximum throughput loss relative to the baseline.
TARGET_LOSS = {"at-least-once + changelog": 0.25, "exactly-once + changelog": 0.40}
TARGET_RESTORE_S = 20.0
RESTORE_ENTITY_PREFIX = "entity-"
PRODUCER_BATCH_BYTES = 1 << 20
WRITE_CHUNK = 65_536
READY_POLL_S = 0.02
COMMIT_POLL_S = 0.05
SERVICE_START_TIMEOUT_S = 300.0
DRAIN_TIMEOUT_S = 600.0
PROFILE_LINES = 25


# -- service process -------------------------------------------------------------------------------------


class ServiceProcess:
    """``python -m streamer run`` configured through ``STREAMER_*`` variables."""

    def __init__(self, work_dir: Path, name: str, environment: dict[str, str]) -> None:
        self.metrics_port = e2e.free_port()
        self.log_path = work_dir / f"service-{name}.log"
        env = {**os.environ, "STREAMER_METRICS_PORT": str(self.metrics_port), "STREAMER_LOG_LEVEL": "INFO",
               "STREAMER_TORCH_THREADS": "1", **environment}
        self._log = self.log_path.open("wb")
        self.started = time.perf_counter()
        self.process = subprocess.Popen([sys.executable, "-m", "streamer", "run"], env=env, stdout=self._log,
                                        stderr=subprocess.STDOUT)

    def get(self, path: str) -> tuple[int, str]:
        url = f"http://127.0.0.1:{self.metrics_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

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

    def metric_sum(self, name: str) -> float:
        _, text = self.get("/metrics")
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(name) and line[len(name)] in " {")

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
    """Admin client, a group-less consumer for end offsets, and a producer, on one bootstrap address."""

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
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

    async def create_topics(self, names: list[str], configs: dict[str, str] | None = None) -> None:
        configs = {"max.message.bytes": str(8 << 20), **(configs or {})}
        await self.admin.create_topics([NewTopic(name, PARTITIONS, 1, topic_configs=configs) for name in names])

    async def end_offsets(self, topic: str) -> dict[int, int]:
        partitions = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        ends = await self.offsets_consumer.end_offsets(partitions)
        return {tp.partition: offset for tp, offset in ends.items()}

    async def wait_committed(self, group: str, topic: str, targets: dict[int, int], service: ServiceProcess
                             ) -> float:
        """Poll the group's committed offsets until each partition reaches ``targets`` and return that time."""
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while True:
            offsets = await self.admin.list_consumer_group_offsets(group)
            committed = {tp.partition: meta.offset for tp, meta in offsets.items() if tp.topic == topic}
            if all(committed.get(p, -1) >= end for p, end in targets.items()):
                return time.perf_counter()
            if service.process.poll() is not None:
                raise RuntimeError(f"service exited with {service.process.returncode}:\n{service.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"committed offsets {committed} did not reach {targets} in {DRAIN_TIMEOUT_S:.0f} s")
            await asyncio.sleep(COMMIT_POLL_S)

    async def write(self, topic: str, records: list[tuple[int, bytes, bytes]]) -> float:
        """Write ``(partition, key, value)`` records in record batches, wait for acknowledgements, return seconds."""
        started = time.perf_counter()
        for start in range(0, len(records), WRITE_CHUNK):
            futures = await send_records(self.producer, topic, records[start:start + WRITE_CHUNK])
            await asyncio.gather(*futures)
        return time.perf_counter() - started


# -- throughput ------------------------------------------------------------------------------------------


def write_model(path: Path) -> Path:
    torch.manual_seed(0)
    torch.save(SeedNet(INPUT, HIDDEN, WINDOW, OUTPUT, LAYERS).eval().state_dict(), path)
    return path


def entity_key(value: bytes) -> bytes:
    """Return the entity id of a synthetic event, which starts with ``{"entity":"<id>"``."""
    start = value.index(b'"entity":"') + 10
    return value[start:value.index(b'"', start)]


def input_records(n_events: int, n_entities: int) -> list[tuple[int, bytes, bytes]]:
    partitioner = KeyPartitioner(PARTITIONS)
    records = []
    for batch in iter_event_batches(n_events, n_entities, INPUT, seed=0):
        for value in batch:
            key = entity_key(value)
            records.append((partitioner(key), key, value))
    return records


async def measure_configuration(broker: Broker, work_dir: Path, model_path: Path, input_topic: str,
                                input_ends: dict[int, int], name: str, repeat: int) -> dict:
    suffix = uuid.uuid4().hex[:8]
    output, dead_letter, group = f"dur-out-{suffix}", f"dur-dlq-{suffix}", f"dur-group-{suffix}"
    await broker.create_topics([output, dead_letter])
    environment = {"STREAMER_MODEL": str(model_path), "STREAMER_BOOTSTRAP_SERVERS": broker.bootstrap,
                   "STREAMER_INPUT_TOPICS": input_topic, "STREAMER_OUTPUT_TOPIC": output,
                   "STREAMER_DEAD_LETTER_TOPIC": dead_letter, "STREAMER_GROUP_ID": group,
                   "STREAMER_TOPIC_PARTITIONS": str(PARTITIONS), **CONFIGURATIONS[name]}
    if name.startswith("exactly-once"):
        environment["STREAMER_GROUP_INSTANCE_ID"] = "member-0"
    service = ServiceProcess(work_dir, f"{group}-{repeat}", environment)
    try:
        ready = await service.wait_ready()
        done = await broker.wait_committed(group, input_topic, input_ends, service)
        changelog_records = await asyncio.to_thread(service.metric_sum, "streamer_changelog_records_total")
    finally:
        exit_code = service.stop()
    if exit_code != 0:
        raise RuntimeError(f"service exited with {exit_code}:\n{service.log_tail()}")
    events = sum(input_ends.values())
    outputs = sum((await broker.end_offsets(output)).values())
    seconds = done - ready
    return {"configuration": name, "repeat": repeat, "events": events, "seconds": round(seconds, 3),
            "events_per_s": round(events / seconds), "startup_seconds": round(ready - service.started, 3),
            "output_end_offsets": outputs, "changelog_records": int(changelog_records)}


async def measure_throughput(broker: Broker, work_dir: Path, model_path: Path, args: argparse.Namespace) -> dict:
    input_topic = f"dur-in-{uuid.uuid4().hex[:8]}"
    await broker.create_topics([input_topic])
    records = input_records(args.events, args.entities)
    print(f"Writing {len(records):,} events to {input_topic} ...", flush=True)
    prefill_s = await broker.write(input_topic, records)
    del records
    input_ends = await broker.end_offsets(input_topic)
    runs = []
    for repeat in range(args.repeats):
        for name in CONFIGURATIONS:
            run = await measure_configuration(broker, work_dir, model_path, input_topic, input_ends, name, repeat)
            print(f"  {name} (run {repeat + 1}): {run['events_per_s']:,} events/s in {run['seconds']:.2f} s",
                  flush=True)
            runs.append(run)
    medians = {name: float(np.median([run["events_per_s"] for run in runs if run["configuration"] == name]))
               for name in CONFIGURATIONS}
    baseline = medians[BASELINE]
    targets = {}
    for name, maximum_loss in TARGET_LOSS.items():
        loss = 1.0 - medians[name] / baseline
        targets[name] = {"max_loss": maximum_loss, "measured_loss": round(loss, 3),
                         "ratio_to_baseline": round(medians[name] / baseline, 3), "met": loss <= maximum_loss}
    return {"events": sum(input_ends.values()), "entities": args.entities, "partitions": PARTITIONS,
            "prefill_seconds": round(prefill_s, 2), "repeats": args.repeats,
            "median_events_per_s": {name: round(value) for name, value in medians.items()},
            "runs": runs, "targets": targets}


# -- restore ---------------------------------------------------------------------------------------------


def state_records(model_path: Path, n_entities: int, seed: int = 0) -> tuple[list[tuple[int, bytes, bytes]],
                                                                           StateCodec, str]:
    """Return one state record per entity, keyed and partitioned by entity, with random rows."""
    model = load_model(model_path)
    codec = StateCodec({name: model.state_shape for name in model.state_names}, "stateful")
    rng = np.random.default_rng(seed)
    partitioner = KeyPartitioner(PARTITIONS)
    records = []
    chunk = 100_000
    for start in range(0, n_entities, chunk):
        count = min(chunk, n_entities - start)
        rows = rng.standard_normal((count, codec.floats), dtype=np.float32)
        steps = rng.integers(1, 1000, count)
        offsets = rng.integers(0, 1 << 30, count)
        values = codec.encode(model.fingerprint, steps, offsets, np.full(count, 1_733_300_000_000), rows)
        for i, value in enumerate(values):
            key = f"{RESTORE_ENTITY_PREFIX}{start + i}".encode()
            records.append((partitioner(key), key, value))
    return records, codec, model.fingerprint


async def restore_all(bootstrap: str, topic: str, codec: StateCodec, fingerprint: str, concurrent: bool
                      ) -> tuple[float, int, list[dict]]:
    """Restore every partition of ``topic`` into one new arena; return seconds, entities and per-partition results."""
    arena = StateArena(codec.row_shapes)

    def restore(partition: int):
        return restore_partition(bootstrap_servers=bootstrap, topic=topic, partition=partition, codec=codec,
                                 arena=arena, fingerprint=fingerprint, mismatch_policy="fail")

    started = time.perf_counter()
    if concurrent:
        results = await asyncio.gather(*(restore(p) for p in range(PARTITIONS)))
    else:
        results = [await restore(p) for p in range(PARTITIONS)]
    seconds = time.perf_counter() - started
    summary = [{"partition": r.partition, "records": r.records, "entities": r.entities,
                "seconds": round(r.duration_s, 3), "anomalies": r.anomalies} for r in results]
    return seconds, len(arena), summary


def profile_restore(bootstrap: str, topic: str, codec: StateCodec, fingerprint: str) -> str:
    """Profile a sequential restore of all partitions and return the top functions by their own time."""
    profiler = cProfile.Profile()
    profiler.enable()
    asyncio.run(restore_all(bootstrap, topic, codec, fingerprint, concurrent=False))
    profiler.disable()
    stream = io.StringIO()
    pstats.Stats(profiler, stream=stream).sort_stats("tottime").print_stats(PROFILE_LINES)
    return stream.getvalue()


async def measure_restore(broker: Broker, work_dir: Path, model_path: Path, args: argparse.Namespace) -> dict:
    suffix = uuid.uuid4().hex[:8]
    group = f"dur-restore-group-{suffix}"
    topic = changelog_topic(group)
    await broker.create_topics([topic], {"cleanup.policy": "compact"})
    records, codec, fingerprint = state_records(model_path, args.restore_entities)
    print(f"Writing {len(records):,} state records ({codec.record_bytes} bytes each) to {topic} ...", flush=True)
    write_s = await broker.write(topic, records)
    del records
    print(f"  written in {write_s:.1f} s", flush=True)

    sequential_s, sequential_entities, sequential = await restore_all(broker.bootstrap, topic, codec, fingerprint,
                                                                      concurrent=False)
    print(f"  sequential restore: {sequential_entities:,} entities in {sequential_s:.2f} s", flush=True)
    concurrent_s, concurrent_entities, concurrent = await restore_all(broker.bootstrap, topic, codec, fingerprint,
                                                                      concurrent=True)
    print(f"  concurrent restore: {concurrent_entities:,} entities in {concurrent_s:.2f} s", flush=True)

    input_topic, output, dead_letter = f"dur-restore-in-{suffix}", f"dur-restore-out-{suffix}", f"dur-restore-dlq-{suffix}"
    await broker.create_topics([input_topic, output, dead_letter])
    environment = {
        "STREAMER_MODEL": str(model_path), "STREAMER_BOOTSTRAP_SERVERS": broker.bootstrap,
        "STREAMER_INPUT_TOPICS": input_topic, "STREAMER_OUTPUT_TOPIC": output,
        "STREAMER_DEAD_LETTER_TOPIC": dead_letter, "STREAMER_GROUP_ID": group,
        "STREAMER_TOPIC_PARTITIONS": str(PARTITIONS), "STREAMER_CHANGELOG": "true",
        "STREAMER_MODEL_MISMATCH": "fail"}
    service = ServiceProcess(work_dir, group, environment)
    try:
        ready = await service.wait_ready()
        restored = await asyncio.to_thread(service.metric_sum, "streamer_restored_records_total")
        entities = await asyncio.to_thread(service.metric_sum, "streamer_state_entities")
        restore_seconds = await asyncio.to_thread(service.metric_sum, "streamer_restore_duration_seconds_sum")
        service_ready_s = ready - service.started
        print(f"  service start to /readyz: {service_ready_s:.2f} s ({int(entities):,} entities)", flush=True)
        scale_out = await measure_scale_out(work_dir, f"{group}-joiner", environment, service, restored)
    finally:
        exit_code = service.stop()
    if exit_code != 0:
        raise RuntimeError(f"service exited with {exit_code}:\n{service.log_tail()}")

    best = min(sequential_s, concurrent_s)
    result = {
        "entities": args.restore_entities, "record_bytes": codec.record_bytes, "partitions": PARTITIONS,
        "write_seconds": round(write_s, 2),
        "restore_sequential_seconds": round(sequential_s, 2), "restore_sequential_entities": sequential_entities,
        "restore_concurrent_seconds": round(concurrent_s, 2), "restore_concurrent_entities": concurrent_entities,
        "sequential_partitions": sequential, "concurrent_partitions": concurrent,
        "service_start_to_ready_seconds": round(service_ready_s, 2),
        "service_restored_records": int(restored), "service_state_entities": int(entities),
        "service_restore_duration_seconds_sum": round(restore_seconds, 2),
        "scale_out": scale_out,
        "target": {"max_seconds": TARGET_RESTORE_S, "measured_seconds": round(best, 2),
                   "met": best <= TARGET_RESTORE_S and sequential_entities == args.restore_entities},
    }
    if not result["target"]["met"] or args.profile:
        print("  profiling a sequential restore ...", flush=True)
        result["profile_top_functions"] = await asyncio.to_thread(profile_restore, broker.bootstrap, topic, codec,
                                                                  fingerprint)
    return result


async def measure_scale_out(work_dir: Path, name: str, environment: dict[str, str], first: ServiceProcess,
                            first_restored: float) -> dict:
    """Start a second member of ``first``'s group; time it until both are ready and count what each re-read.

    The joiner becomes ready only after the rebalance and the restore of its own partitions. The first
    member is polled after that, so a restore of its own after the rebalance is waited for too.
    """
    joiner = ServiceProcess(work_dir, name, environment)
    try:
        joiner_ready = await joiner.wait_ready()
        first_ready = await first.wait_ready()
        joiner_read = await asyncio.to_thread(joiner.metric_sum, "streamer_restored_records_total")
        first_read = await asyncio.to_thread(first.metric_sum, "streamer_restored_records_total") - first_restored
        first_entities = await asyncio.to_thread(first.metric_sum, "streamer_state_entities")
        joiner_entities = await asyncio.to_thread(joiner.metric_sum, "streamer_state_entities")
    finally:
        exit_code = joiner.stop()
    if exit_code != 0:
        raise RuntimeError(f"joining service exited with {exit_code}:\n{joiner.log_tail()}")
    seconds = max(joiner_ready, first_ready) - joiner.started
    print(f"  second member: start to both ready {seconds:.2f} s; changelog records read again by the first "
          f"member {int(first_read):,}, by the second {int(joiner_read):,}", flush=True)
    return {"start_to_both_ready_seconds": round(seconds, 2), "first_member_records_read": int(first_read),
            "second_member_records_read": int(joiner_read), "first_member_entities": int(first_entities),
            "second_member_entities": int(joiner_entities)}


# -- report ----------------------------------------------------------------------------------------------


def format_tables(report: dict) -> str:
    lines = []
    throughput = report.get("throughput")
    if throughput:
        lines += [f"Throughput ({throughput['events']:,} events, {throughput['entities']:,} entities, "
                  f"median of {throughput['repeats']}):",
                  "| configuration | events/s | ratio to at-least-once | max loss | met |", "|---|---:|---:|---:|---|"]
        for name, value in throughput["median_events_per_s"].items():
            target = throughput["targets"].get(name)
            ratio, loss, met = "1.000", "", ""
            if target is not None:
                ratio = f"{target['ratio_to_baseline']:.3f}"
                loss = f"{target['max_loss']:.0%}"
                met = "yes" if target["met"] else "NO"
            lines.append(f"| {name} | {value:,} | {ratio} | {loss} | {met} |")
    restore = report.get("restore")
    if restore:
        lines += ["", f"Restore of {restore['entities']:,} entities ({restore['record_bytes']} bytes per record, "
                      f"{restore['partitions']} partitions):",
                  "| measurement | seconds |", "|---|---:|",
                  f"| write the changelog | {restore['write_seconds']} |",
                  f"| restore_partition, one partition after the other | {restore['restore_sequential_seconds']} |",
                  f"| restore_partition, all partitions with asyncio.gather | {restore['restore_concurrent_seconds']} |",
                  f"| service process start to /readyz | {restore['service_start_to_ready_seconds']} |",
                  f"| second member joins: its start to both members ready "
                  f"| {restore['scale_out']['start_to_both_ready_seconds']} |",
                  f"changelog records read for the rebalance: first member "
                  f"{restore['scale_out']['first_member_records_read']:,}, second member "
                  f"{restore['scale_out']['second_member_records_read']:,}",
                  f"target: at most {restore['target']['max_seconds']:.0f} s: "
                  f"{'met' if restore['target']['met'] else 'NOT met'}"]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=300_000, help="events in the throughput input")
    parser.add_argument("--entities", type=int, default=10_000, help="entities in the throughput input")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each configuration; the median is reported")
    parser.add_argument("--restore-entities", type=int, default=1_000_000, help="state records to restore")
    parser.add_argument("--skip-restore", action="store_true", help="measure throughput only")
    parser.add_argument("--skip-throughput", action="store_true", help="measure restore and scale-out only")
    parser.add_argument("--profile", action="store_true", help="profile the restore even when the target is met")
    parser.add_argument("--quick", action="store_true",
                        help="30,000 events, 1 repeat, 50,000 entities to restore, no results file")
    parser.add_argument("--bootstrap-servers", help="use this running broker instead of starting a local one")
    parser.add_argument("--output", type=Path, help=f"results file (default {RESULTS}; none with --quick)")
    args = parser.parse_args(argv)
    if args.quick:
        args.events, args.repeats, args.restore_entities = 30_000, 1, 50_000
    if args.output is None and not args.quick:
        args.output = RESULTS
    if min(args.events, args.entities, args.repeats, args.restore_entities) < 1:
        parser.error("--events, --entities, --repeats and --restore-entities must be positive")
    return args


async def run_benchmark(args: argparse.Namespace, bootstrap: str, work_dir: Path) -> dict:
    model_path = write_model(work_dir / "seed-lstm.pt")
    broker = Broker(bootstrap)
    await broker.start()
    try:
        report = {}
        if not args.skip_throughput:
            report["throughput"] = await measure_throughput(broker, work_dir, model_path, args)
        if not args.skip_restore:
            report["restore"] = await measure_restore(broker, work_dir, model_path, args)
        return report
    finally:
        await broker.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    info = e2e.machine_info()
    with tempfile.TemporaryDirectory(prefix="streamer-durability-") as temporary:
        work_dir = Path(temporary)
        broker = None
        bootstrap = args.bootstrap_servers
        if bootstrap is None:
            broker = LocalKafka(work_dir / "kafka")
            print("Starting a local Kafka broker ...", flush=True)
            bootstrap = broker.start(timeout_s=120)
        try:
            results = asyncio.run(run_benchmark(args, bootstrap, work_dir))
        finally:
            if broker is not None:
                broker.stop()

    report = {"machine": info, "command": "python " + " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"),
              "model": {"input": INPUT, "hidden": HIDDEN, "layers": LAYERS, "output": OUTPUT, "torch_threads": 1},
              "throughput_definition": "events / seconds from the service's first /readyz 200 until the group's "
                                       "committed offsets reach the end of every input partition",
              **results, "total_seconds": round(time.perf_counter() - started, 1)}
    print(format_tables(report))
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.output}")
    met = all(target["met"] for target in report.get("throughput", {}).get("targets", {}).values())
    if "restore" in report:
        met = met and report["restore"]["target"]["met"]
    print(f"targets {'met' if met else 'NOT met'}; total {report['total_seconds']:.0f} s")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
