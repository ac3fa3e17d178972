"""Fault harness: a consumer group of `streamer run` processes under kill -9, restarts, joins and leaves.

For each guarantee (at-least-once, exactly-once) the harness creates new topics with ``--partitions``
partitions, starts three service processes in one consumer group with the changelog on, and writes
``--events`` events over ``--entities`` entities, paced over ``--duration-s`` seconds. Each event is keyed by
its entity and carries the entity's sequence number: ``{"features": [...], "seq": n}``. While the events are
written, a chaos loop runs three kinds of actions in a seeded random order at evenly spaced times:

- ``--kills`` kill -9s of a random running member, each followed by a restart with the same member id after
  a random delay of up to 1 s;
- ``--joins`` new members;
- ``--leaves`` SIGTERM stops of a random running member, which is not restarted.

The harness then waits until the group's committed offsets reach the end of every input partition, stops the
survivors with SIGTERM, and compares everything the group wrote with an offline replay: one
``streamer.engine.Engine`` over all input records in per-partition offset order (each entity's events are on
one partition, so this is every entity's event order). Requirements:

- no lost event: every input record has an output (outputs name their input partition and offset);
- every output's step equals the replay's, and its prediction is within ``TOLERANCE`` of the replay's;
- exactly-once: no duplicate outputs for read_committed consumers; at-least-once: duplicates only repeat an
  identical output (same step, predictions within ``TOLERANCE`` of each other);
- the latest changelog record of every entity equals the replay's final state: h and c within
  ``TOLERANCE``, same step count, same last applied offset, same partition, this model's fingerprint;
- no dead letters, and no service process exits unless the harness stopped or killed it.

Recovery time of a kill: from the SIGKILL until the first sample (every ``MONITOR_INTERVAL_S``) in which every
input partition's committed offset is above its committed offset sampled just before the kill, or has
reached the partition's end offset. The producer writes to every partition every ``PRODUCE_TICK_S``, so this
is the time until the whole group, including the killed member's partitions, commits new progress again.
Readiness time of a restart: from the SIGKILL until the restarted process's ``/readyz`` returns 200.

Exactly-once runs always use static membership (``member-0``, ``member-1``, ...), because the transactional id
is derived from the member id, and a restarted member must abort its predecessor's open transaction.

Usage: python benchmarks/fault_harness.py [--short] [--kills N] [--guarantee both] [--seed S]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import orjson
import torch
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

import kafka_end_to_end as e2e
from streamer.engine import Engine, EventBatch
from streamer.kafka.local_broker import LocalKafka
from streamer.kafka.producer import KeyPartitioner, send_records
from streamer.model import SeedNet, load_model
from streamer.state.changelog import StateCodec, changelog_topic

INPUT, HIDDEN, WINDOW, OUTPUT, LAYERS = 4, 16, 5, 1, 2
TOLERANCE = 1e-6
INITIAL_MEMBERS = 3
RESULTS_DIR = Path(__file__).parent / "results"
GUARANTEES = ("at-least-once", "exactly-once")
# Fraction of events that go to a small set of hot entities, so that some entities get long histories.
HOT_FRACTION = 0.2
HOT_ENTITIES = 20
MONITOR_INTERVAL_S = 0.1
PRODUCE_TICK_S = 0.05
READY_POLL_S = 0.1
SERVICE_READY_TIMEOUT_S = 120.0
DRAIN_TIMEOUT_S = 240.0
STOP_TIMEOUT_S = 60.0
MAX_RESTART_DELAY_S = 1.0
# Longer than aiokafka's default transaction timeout (60 s) plus the broker's check for timed-out transactions
# (transaction.abort.timed.out.transaction.cleanup.interval.ms, 10 s by default).
STABLE_OFFSETS_TIMEOUT_S = 90.0
SERVICE_SETTINGS = {
    "STREAMER_CHANGELOG": "true",
    "STREAMER_CHECKPOINT_INTERVAL_MS": "250",
    "STREAMER_MAX_BATCH_EVENTS": "256",
    "STREAMER_TORCH_THREADS": "1",
    "STREAMER_SHUTDOWN_TIMEOUT_S": "20",
    "STREAMER_LOG_LEVEL": "INFO",
}


# -- service processes -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Topics:
    input: str
    output: str
    dead_letter: str
    group: str

    @classmethod
    def unique(cls, prefix: str) -> Topics:
        suffix = uuid.uuid4().hex[:8]
        return cls(f"{prefix}-in-{suffix}", f"{prefix}-out-{suffix}", f"{prefix}-dlq-{suffix}",
                   f"{prefix}-group-{suffix}")


class Member:
    """One ``python -m streamer run`` process of the group; ``name`` is its static member id."""

    def __init__(self, name: str, incarnation: int, work_dir: Path, environment: dict[str, str]) -> None:
        self.name = name
        self.metrics_port = e2e.free_port()
        self.log_path = work_dir / f"{name}-{incarnation}.log"
        self.started = time.monotonic()
        self.expected_exit = False
        env = {**os.environ, **environment, "STREAMER_METRICS_PORT": str(self.metrics_port)}
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "streamer", "run"], env=env, stdout=log,
                                            stderr=subprocess.STDOUT)

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def ready(self) -> bool:
        url = f"http://127.0.0.1:{self.metrics_port}/readyz"
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    async def wait_ready(self, timeout_s: float = SERVICE_READY_TIMEOUT_S) -> float | None:
        """Poll ``/readyz`` until 200 and return that monotonic time, or None on exit or timeout."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.running:
            if await asyncio.to_thread(self.ready):
                return time.monotonic()
            await asyncio.sleep(READY_POLL_S)
        return None

    def kill(self) -> None:
        self.expected_exit = True
        if self.running:
            self.process.kill()
        self.process.wait(10)

    def terminate(self) -> None:
        self.expected_exit = True
        if self.running:
            self.process.send_signal(signal.SIGTERM)

    async def wait_exit(self, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        deadline = time.monotonic() + timeout_s
        while self.running and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        if self.running:
            self.process.kill()
            self.process.wait(10)
            return None
        return self.process.returncode

    def log_tail(self, characters: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-characters:]


class Group:
    """The members of the consumer group, their history, and every process ever started."""

    def __init__(self, work_dir: Path, environment: dict[str, str], static: bool) -> None:
        self.work_dir = work_dir
        self.environment = environment
        self.static = static
        self.members: dict[str, Member] = {}
        self.all_processes: list[Member] = []
        self._next_id = 0

    def start(self, name: str | None = None) -> Member:
        """Start a member; with ``name`` a restart that reuses that member id, otherwise a new id."""
        if name is None:
            name = f"member-{self._next_id}"
            self._next_id += 1
        incarnation = sum(1 for process in self.all_processes if process.name == name)
        environment = dict(self.environment)
        if self.static:
            environment["STREAMER_GROUP_INSTANCE_ID"] = name
        member = Member(name, incarnation, self.work_dir, environment)
        self.members[name] = member
        self.all_processes.append(member)
        return member

    def kill_all(self) -> None:
        """Kill every process still running; a no-op after a normal stop."""
        for process in self.all_processes:
            if process.running:
                process.kill()

    def running_names(self) -> list[str]:
        return sorted(name for name, member in self.members.items() if member.running and not member.expected_exit)

    def unexpected_exits(self) -> list[dict]:
        return [{"member": process.name, "exit_code": process.process.returncode, "log": str(process.log_path),
                 "log_tail": process.log_tail(1500)}
                for process in self.all_processes
                if process.process.poll() is not None and not process.expected_exit]


# -- broker helpers --------------------------------------------------------------------------------------


class Broker:
    """Admin client and a group-less consumer for end offsets, on one bootstrap address."""

    def __init__(self, bootstrap: str, partitions: int) -> None:
        self.bootstrap = bootstrap
        self.partitions = partitions
        self.admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        self.offsets_consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
        self.stable_offsets_consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                                        isolation_level="read_committed")

    async def start(self) -> None:
        await self.admin.start()
        await self.offsets_consumer.start()
        await self.stable_offsets_consumer.start()

    async def close(self) -> None:
        await self.stable_offsets_consumer.stop()
        await self.offsets_consumer.stop()
        await self.admin.close()

    async def create_topics(self, topics: Topics) -> None:
        # Output and dead-letter topics get the input's partition count, so outputs keep their input's
        # partition number.
        await self.admin.create_topics([NewTopic(name, self.partitions, 1)
                                        for name in (topics.input, topics.output, topics.dead_letter)])

    async def end_offsets(self, topic: str) -> dict[int, int]:
        partitions = [TopicPartition(topic, p) for p in range(self.partitions)]
        ends = await self.offsets_consumer.end_offsets(partitions)
        return {tp.partition: offset for tp, offset in ends.items()}

    async def wait_stable(self, topics: list[str], timeout_s: float) -> float | None:
        """Wait until no open transaction holds back the last stable offset of any partition of ``topics``.

        Returns the seconds waited, or None after ``timeout_s``. A transaction of a producer that died and whose
        transactional id never starts again stays open until the broker aborts it after the producer's
        transaction timeout (aiokafka's default is 60 s).
        """
        started = time.monotonic()
        partitions = [TopicPartition(topic, p) for topic in topics for p in range(self.partitions)]
        while time.monotonic() - started < timeout_s:
            high_watermarks = await self.offsets_consumer.end_offsets(partitions)
            stable = await self.stable_offsets_consumer.end_offsets(partitions)
            if all(stable[tp] >= high_watermarks[tp] for tp in partitions):
                return time.monotonic() - started
            await asyncio.sleep(0.5)
        return None

    async def committed(self, group: str, topic: str) -> dict[int, int]:
        offsets = await self.admin.list_consumer_group_offsets(group)
        committed = {p: 0 for p in range(self.partitions)}
        for tp, meta in offsets.items():
            if tp.topic == topic and meta.offset >= 0:
                committed[tp.partition] = meta.offset
        return committed


@dataclass
class Sample:
    time: float
    committed: dict[int, int]
    ends: dict[int, int]


class OffsetMonitor:
    """Samples the group's committed offsets and the input end offsets every ``MONITOR_INTERVAL_S``."""

    def __init__(self, broker: Broker, topics: Topics) -> None:
        self.broker = broker
        self.topics = topics
        self.samples: list[Sample] = []
        self._task: asyncio.Task | None = None

    async def sample(self) -> Sample:
        # End offsets first: a commit can only reach offsets that existed before it.
        ends = await self.broker.end_offsets(self.topics.input)
        committed = await self.broker.committed(self.topics.group, self.topics.input)
        sample = Sample(time.monotonic(), committed, ends)
        self.samples.append(sample)
        return sample

    async def _run(self) -> None:
        while True:
            await self.sample()
            await asyncio.sleep(MONITOR_INTERVAL_S)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="offset-monitor")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    def recovered_at(self, after: float, baseline: dict[int, int]) -> float | None:
        """Return the first sample time after ``after`` where every partition progressed past ``baseline``."""
        for sample in self.samples:
            if sample.time <= after:
                continue
            if all(sample.committed[p] > baseline[p] or sample.committed[p] >= sample.ends[p]
                   for p in baseline):
                return sample.time
        return None


async def read_all(bootstrap: str, topic: str, partitions: int, isolation_level: str,
                   timeout_s: float = 120.0) -> list:
    """Read every record of ``topic`` from the beginning up to the end offsets found at the start.

    With read_committed the end offset is the last stable offset, and records of aborted transactions are
    skipped.
    """
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                isolation_level=isolation_level, auto_offset_reset="earliest",
                                max_partition_fetch_bytes=8 << 20, fetch_max_bytes=64 << 20)
    await consumer.start()
    records = []
    try:
        assigned = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(assigned)
        ends = await consumer.end_offsets(assigned)
        await consumer.seek_to_beginning(*assigned)
        remaining = {tp for tp in assigned if ends[tp] > 0}
        deadline = time.monotonic() + timeout_s
        while remaining:
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading {topic} timed out after {timeout_s:.0f} s")
            fetched = await consumer.getmany(*remaining, timeout_ms=500, max_records=100_000)
            for tp, messages in fetched.items():
                records.extend(message for message in messages if message.offset < ends[tp])
            for tp in list(remaining):
                if await consumer.position(tp) >= ends[tp]:
                    remaining.discard(tp)
    finally:
        await consumer.stop()
    return records


# -- events ----------------------------------------------------------------------------------------------


def write_model(path: Path) -> Path:
    torch.manual_seed(0)
    torch.save(SeedNet(INPUT, HIDDEN, WINDOW, OUTPUT, LAYERS).eval().state_dict(), path)
    return path


def make_events(n_events: int, n_entities: int, partitions: int, seed: int) -> list[tuple[int, bytes, bytes]]:
    """Return ``(partition, key, value)`` of every event in production order, partitioned by key as Kafka does.

    ``HOT_FRACTION`` of the events go to the first ``HOT_ENTITIES`` entities, the rest uniformly to all.
    """
    rng = np.random.default_rng(seed)
    hot = rng.random(n_events) < HOT_FRACTION
    chosen = np.where(hot, rng.integers(0, min(HOT_ENTITIES, n_entities), n_events),
                      rng.integers(0, n_entities, n_events))
    features = rng.normal(size=(n_events, INPUT)).round(4).tolist()
    partitioner = KeyPartitioner(partitions)
    sequence = np.zeros(n_entities, np.int64)
    events = []
    for index, entity in enumerate(chosen.tolist()):
        key = f"entity-{entity:05d}".encode()
        value = orjson.dumps({"features": features[index], "seq": int(sequence[entity])})
        sequence[entity] += 1
        events.append((partitioner(key), key, value))
    return events


async def produce_paced(bootstrap: str, topic: str, events: list[tuple[int, bytes, bytes]], seconds: float
                        ) -> float:
    """Write ``events`` in order at an even rate over ``seconds``; return the seconds it took."""
    # Idempotence keeps each partition's records in send order when a request is retried.
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=5)
    await producer.start()
    started = time.monotonic()
    try:
        futures = []
        sent = 0
        rate = len(events) / seconds
        while sent < len(events):
            due = min(len(events), int((time.monotonic() - started) * rate) + 1)
            if due > sent:
                futures += await send_records(producer, topic, events[sent:due])
                sent = due
            await asyncio.sleep(PRODUCE_TICK_S)
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return time.monotonic() - started


# -- chaos -----------------------------------------------------------------------------------------------


@dataclass
class ChaosLog:
    kills: list[dict] = field(default_factory=list)
    joins: list[dict] = field(default_factory=list)
    leaves: list[dict] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def plan_actions(kills: int, joins: int, leaves: int, rng: np.random.Generator) -> list[str]:
    actions = ["kill"] * kills + ["join"] * joins + ["leave"] * leaves
    rng.shuffle(actions)
    return actions


async def run_chaos(group: Group, monitor: OffsetMonitor, actions: list[str], seconds: float,
                    rng: np.random.Generator, log: ChaosLog) -> list[asyncio.Task]:
    """Run ``actions`` at evenly spaced times over ``seconds``; return the tasks that measure readiness."""
    started = time.monotonic()
    waiters: list[asyncio.Task] = []
    for index, action in enumerate(actions):
        due = started + seconds * (index + 1) / (len(actions) + 1)
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        running = group.running_names()
        if action == "kill":
            if not running:
                log.skipped.append("kill: no running member")
                continue
            name = running[int(rng.integers(len(running)))]
            baseline = (await monitor.sample()).committed
            killed_at = time.monotonic()
            group.members[name].kill()
            delay = float(rng.uniform(0.0, MAX_RESTART_DELAY_S))
            await asyncio.sleep(delay)
            member = group.start(name)
            entry = {"member": name, "at_s": round(killed_at - started, 3), "restart_delay_s": round(delay, 3),
                     "at_monotonic": killed_at, "baseline": baseline}
            log.kills.append(entry)
            waiters.append(asyncio.create_task(_record_ready(member, entry, killed_at)))
        elif action == "join":
            baseline = (await monitor.sample()).committed
            joined_at = time.monotonic()
            member = group.start()
            entry = {"member": member.name, "at_s": round(joined_at - started, 3), "at_monotonic": joined_at,
                     "baseline": baseline}
            log.joins.append(entry)
            waiters.append(asyncio.create_task(_record_ready(member, entry, joined_at)))
        else:
            if len(running) <= 1:
                log.skipped.append("leave: only one running member")
                continue
            name = running[int(rng.integers(len(running)))]
            baseline = (await monitor.sample()).committed
            left_at = time.monotonic()
            member = group.members[name]
            member.terminate()
            entry = {"member": name, "at_s": round(left_at - started, 3), "at_monotonic": left_at,
                     "baseline": baseline}
            log.leaves.append(entry)
            waiters.append(asyncio.create_task(_record_exit(member, entry, left_at)))
    return waiters


async def _record_ready(member: Member, entry: dict, since: float) -> None:
    ready = await member.wait_ready()
    entry["ready_s"] = None if ready is None else round(ready - since, 3)


async def _record_exit(member: Member, entry: dict, since: float) -> None:
    entry["exit_code"] = await member.wait_exit()
    entry["exit_s"] = round(time.monotonic() - since, 3)


# -- verification ----------------------------------------------------------------------------------------


@dataclass
class Replay:
    """The offline replay's output per input position, and the engine holding the final states."""

    positions: list[tuple[int, int]]
    entities: list[str]
    predictions: np.ndarray
    steps: np.ndarray
    engine: Engine


def replay(model_path: Path, inputs: list) -> tuple[Replay, int]:
    """Replay the input records in per-partition offset order; return the replay and out-of-order seq count."""
    ordered = sorted(inputs, key=lambda record: (record.partition, record.offset))
    entities = [record.key.decode() for record in ordered]
    documents = [orjson.loads(record.value) for record in ordered]
    batch = EventBatch.build(entities, [document["features"] for document in documents],
                             offsets=[record.offset for record in ordered],
                             partitions=[record.partition for record in ordered])
    engine = Engine(load_model(model_path))
    result = engine.process(batch)
    expected_seq: dict[str, int] = {}
    out_of_order = 0
    for entity, document in zip(entities, documents):
        if document["seq"] != expected_seq.get(entity, 0):
            out_of_order += 1
        expected_seq[entity] = document["seq"] + 1
    positions = [(record.partition, record.offset) for record in ordered]
    return Replay(positions, entities, result.predictions[:, 0].astype(np.float64), result.steps, engine), out_of_order


def compare_outputs(outputs: list, reference: Replay, exactly_once: bool) -> dict:
    """Match every output to its input position and compare it with the replay."""
    index = {position: i for i, position in enumerate(reference.positions)}
    by_position: dict[int, list[tuple[int, float]]] = {}
    unknown = wrong_entity = 0
    for record in outputs:
        document = orjson.loads(record.value)
        position = index.get((document["source"]["partition"], document["source"]["offset"]))
        if position is None:
            unknown += 1
            continue
        if document["entity"] != reference.entities[position]:
            wrong_entity += 1
        by_position.setdefault(position, []).append((document["step"], float(document["prediction"][0])))

    lost = len(reference.positions) - len(by_position)
    duplicates = nonidentical = step_mismatches = 0
    max_difference = 0.0
    for position, seen in by_position.items():
        steps = [step for step, _ in seen]
        predictions = np.array([prediction for _, prediction in seen])
        step_mismatches += sum(int(step != reference.steps[position]) for step in steps)
        max_difference = max(max_difference, float(np.abs(predictions - reference.predictions[position]).max()))
        duplicates += len(seen) - 1
        if len(seen) > 1 and (len(set(steps)) > 1 or predictions.max() - predictions.min() > TOLERANCE):
            nonidentical += 1
    return {"outputs": len(outputs), "lost": lost, "duplicates": duplicates, "nonidentical_duplicates": nonidentical,
            "step_mismatches": step_mismatches, "max_prediction_difference": max_difference,
            "unknown_sources": unknown, "wrong_entity": wrong_entity,
            "exactly_once": exactly_once}


def compare_state(changelog: list, reference: Replay, fingerprint: str) -> dict:
    """Compare the latest changelog record of every entity with the replay engine's final arena state."""
    arena = reference.engine.arena
    codec = StateCodec({name: shape for name, shape in arena.row_shapes.items()}, "stateful")
    latest: dict[str, tuple[int, bytes | None]] = {}
    for record in sorted(changelog, key=lambda record: (record.partition, record.offset)):
        latest[record.key.decode()] = (record.partition, record.value)
    alive = {entity: item for entity, item in latest.items() if item[1] is not None}
    decoded, invalid, other_models = codec.decode(list(alive), [value for _, value in alive.values()])
    invalid += [(entity, "state of another model") for entity in other_models]
    expected_entities = set(arena.entities())
    mismatches: list[dict] = []
    missing = sorted(expected_entities - set(decoded.entities))
    extra = sorted(set(decoded.entities) - expected_entities)
    max_difference = 0.0
    for i, entity in enumerate(decoded.entities):
        slot = arena.slot_of(entity)
        if slot is None:
            continue
        expected_rows = arena.export_rows(np.array([slot]))[0]
        difference = float(np.abs(decoded.rows[i] - expected_rows).max())
        max_difference = max(max_difference, difference)
        problems = []
        if decoded.steps[i] != arena.steps[slot]:
            problems.append(f"steps {decoded.steps[i]} != {arena.steps[slot]}")
        if decoded.last_offsets[i] != arena.last_offset[slot]:
            problems.append(f"last offset {decoded.last_offsets[i]} != {arena.last_offset[slot]}")
        if alive[entity][0] != arena.partition[slot]:
            problems.append(f"partition {alive[entity][0]} != {arena.partition[slot]}")
        if decoded.fingerprints[i] != fingerprint:
            problems.append(f"fingerprint {decoded.fingerprints[i]} != {fingerprint}")
        if difference > TOLERANCE:
            problems.append(f"state rows differ by {difference:.3g}")
        if problems:
            mismatches.append({"entity": entity, "problems": problems})
    return {"entities": len(expected_entities), "changelog_records": len(changelog),
            "state_mismatches": len(mismatches) + len(missing) + len(extra) + len(invalid),
            "missing_entities": len(missing), "extra_entities": len(extra), "invalid_records": len(invalid),
            "max_state_difference": max_difference, "first_mismatches": mismatches[:5] + [
                {"entity": entity, "problems": ["no changelog record"]} for entity in missing[:5]]}


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"count": 0}
    array = np.asarray(values)
    return {"count": len(values), "p50": round(float(np.percentile(array, 50)), 3),
            "p90": round(float(np.percentile(array, 90)), 3), "max": round(float(array.max()), 3),
            "mean": round(float(array.mean()), 3)}


# -- one run ---------------------------------------------------------------------------------------------


async def run_guarantee(guarantee: str, args: argparse.Namespace, bootstrap: str, work_dir: Path,
                        model_path: Path) -> dict:
    """Run the group under chaos with one guarantee and verify its outputs and state."""
    exactly_once = guarantee == "exactly-once"
    static = exactly_once or args.membership == "static"
    rng = np.random.default_rng([args.seed, GUARANTEES.index(guarantee)])
    topics = Topics.unique("fh-eos" if exactly_once else "fh-alo")
    run_dir = work_dir / guarantee
    run_dir.mkdir(parents=True, exist_ok=True)
    broker = Broker(bootstrap, args.partitions)
    await broker.start()
    started = time.monotonic()
    cleanup: list[Group] = []
    try:
        await broker.create_topics(topics)
        events = make_events(args.events, args.entities, args.partitions, args.seed)
        environment = {**SERVICE_SETTINGS, "STREAMER_MODEL": str(model_path), "STREAMER_BOOTSTRAP_SERVERS": bootstrap,
                       "STREAMER_INPUT_TOPICS": topics.input, "STREAMER_OUTPUT_TOPIC": topics.output,
                       "STREAMER_DEAD_LETTER_TOPIC": topics.dead_letter, "STREAMER_GROUP_ID": topics.group,
                       "STREAMER_TOPIC_PARTITIONS": str(args.partitions), "STREAMER_GUARANTEE": guarantee}
        group = Group(run_dir, environment, static)
        cleanup.append(group)
        first = [group.start() for _ in range(INITIAL_MEMBERS)]
        readiness = await asyncio.gather(*(member.wait_ready() for member in first))
        if None in readiness:
            tails = "\n".join(f"--- {m.name}\n{m.log_tail()}" for m in first)
            raise RuntimeError(f"the first members did not become ready:\n{tails}")
        print(f"[{guarantee}] {INITIAL_MEMBERS} members ready after {time.monotonic() - started:.1f} s; writing "
              f"{len(events):,} events over {args.duration_s:.0f} s with {args.kills} kills, {args.joins} joins, "
              f"{args.leaves} leaves", flush=True)

        monitor = OffsetMonitor(broker, topics)
        monitor.start()
        chaos_log = ChaosLog()
        actions = plan_actions(args.kills, args.joins, args.leaves, rng)
        produce_task = asyncio.create_task(produce_paced(bootstrap, topics.input, events, args.duration_s))
        waiters = await run_chaos(group, monitor, actions, args.duration_s, rng, chaos_log)
        produce_seconds = await produce_task
        ends = await broker.end_offsets(topics.input)
        drain_started = time.monotonic()
        drained = await wait_drained(broker, topics, ends, group)
        drain_seconds = time.monotonic() - drain_started
        await asyncio.gather(*waiters)
        await monitor.sample()
        await monitor.stop()

        survivors = [group.members[name] for name in group.running_names()]
        for member in survivors:
            member.terminate()
        exit_codes = {member.name: await member.wait_exit() for member in survivors}
        print(f"[{guarantee}] drained={drained} in {drain_seconds:.1f} s; stopped {len(survivors)} survivors "
              f"{exit_codes}", flush=True)

        isolation = "read_committed" if exactly_once else "read_uncommitted"
        stable_wait = None
        if exactly_once:
            stable_wait = await broker.wait_stable([topics.output, changelog_topic(topics.group)],
                                                   STABLE_OFFSETS_TIMEOUT_S)
        inputs = await read_all(bootstrap, topics.input, args.partitions, "read_uncommitted")
        outputs = await read_all(bootstrap, topics.output, args.partitions, isolation)
        dead_letters = await read_all(bootstrap, topics.dead_letter, args.partitions, isolation)
        changelog = await read_all(bootstrap, changelog_topic(topics.group), args.partitions, "read_committed")
        uncommitted_outputs = (len(await read_all(bootstrap, topics.output, args.partitions, "read_uncommitted"))
                               if exactly_once else len(outputs))
    finally:
        for running_group in cleanup:
            running_group.kill_all()
        await broker.close()

    reference, out_of_order = replay(model_path, inputs)
    output_check = compare_outputs(outputs, reference, exactly_once)
    state_check = compare_state(changelog, reference, reference.engine.model.fingerprint)
    recovery = [monitor.recovered_at(kill["at_monotonic"], kill["baseline"]) for kill in chaos_log.kills]
    for kill, recovered in zip(chaos_log.kills, recovery):
        kill["recovery_s"] = None if recovered is None else round(recovered - kill["at_monotonic"], 3)
    for entry in chaos_log.joins + chaos_log.leaves:
        recovered = monitor.recovered_at(entry["at_monotonic"], entry["baseline"])
        entry["recovery_s"] = None if recovered is None else round(recovered - entry["at_monotonic"], 3)
    for entry in chaos_log.kills + chaos_log.joins + chaos_log.leaves:
        del entry["at_monotonic"], entry["baseline"]

    isolated = isolated_kills(chaos_log)
    unexpected = group.unexpected_exits()
    stop_failures = {name: code for name, code in exit_codes.items() if code != 0}
    recovery_times = [kill["recovery_s"] for kill in chaos_log.kills if kill["recovery_s"] is not None]
    ready_times = [kill["ready_s"] for kill in chaos_log.kills if kill.get("ready_s") is not None]
    run = {
        "guarantee": guarantee,
        "membership": "static" if static else "dynamic",
        "topics": {"input": topics.input, "output": topics.output, "group": topics.group},
        "events": len(inputs),
        "entities": state_check["entities"],
        "partitions": args.partitions,
        "kills": len(chaos_log.kills),
        "restarts": len(chaos_log.kills),
        "joins": len(chaos_log.joins),
        "leaves": len(chaos_log.leaves),
        "skipped_actions": chaos_log.skipped,
        "produce_seconds": round(produce_seconds, 2),
        "drained": drained,
        "drain_seconds_after_last_event": round(drain_seconds, 2),
        "open_transaction_wait_s": None if stable_wait is None else round(stable_wait, 1),
        "seconds": round(time.monotonic() - started, 1),
        **{key: value for key, value in output_check.items() if key != "exactly_once"},
        "outputs_read_uncommitted": uncommitted_outputs,
        "dead_letters": len(dead_letters),
        "seq_out_of_order": out_of_order,
        **{key: value for key, value in state_check.items()},
        "recovery_s": percentiles(recovery_times),
        "recovery_isolated_kills_s": percentiles([kill["recovery_s"] for kill in isolated]),
        "kills_not_recovered": len(chaos_log.kills) - len(recovery_times),
        "restart_ready_s": percentiles(ready_times),
        "unexpected_exits": unexpected,
        "survivor_exit_codes": exit_codes,
        "chaos": {"kills": chaos_log.kills, "joins": chaos_log.joins, "leaves": chaos_log.leaves},
        "logs": str(run_dir),
    }
    run["requirements"] = check_requirements(run, exactly_once)
    run["passed"] = all(item["met"] for item in run["requirements"].values())
    if stop_failures:
        run["stop_failures"] = stop_failures
    return run


def isolated_kills(log: ChaosLog) -> list[dict]:
    """Return the recovered kills whose recovery interval overlaps no other action's recovery interval."""
    intervals = [(entry["at_s"], entry["at_s"] + entry["recovery_s"] if entry.get("recovery_s") is not None
                  else float("inf"), id(entry)) for entry in log.kills + log.joins + log.leaves]
    isolated = []
    for kill in log.kills:
        if kill.get("recovery_s") is None:
            continue
        start, end = kill["at_s"], kill["at_s"] + kill["recovery_s"]
        if all(other_end < start or other_start > end
               for other_start, other_end, other in intervals if other != id(kill)):
            isolated.append(kill)
    return isolated


async def wait_drained(broker: Broker, topics: Topics, ends: dict[int, int], group: Group) -> bool:
    """Wait until the group's committed offsets reach ``ends``; return False after ``DRAIN_TIMEOUT_S``."""
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while time.monotonic() < deadline:
        committed = await broker.committed(topics.group, topics.input)
        if all(committed[p] >= end for p, end in ends.items()):
            return True
        if not group.running_names():
            return False
        await asyncio.sleep(0.2)
    return False


def check_requirements(run: dict, exactly_once: bool) -> dict:
    requirements = {
        "all_input_committed": {"met": run["drained"], "measured": run["drained"]},
        "no_lost_events": {"met": run["lost"] == 0, "measured": run["lost"]},
        "steps_equal_replay": {"met": run["step_mismatches"] == 0, "measured": run["step_mismatches"]},
        "predictions_within_tolerance": {"met": run["max_prediction_difference"] <= TOLERANCE,
                                         "measured": run["max_prediction_difference"], "tolerance": TOLERANCE},
        "outputs_name_known_inputs": {"met": run["unknown_sources"] == 0 and run["wrong_entity"] == 0,
                                      "measured": run["unknown_sources"] + run["wrong_entity"]},
        "state_equals_replay": {"met": run["state_mismatches"] == 0, "measured": run["state_mismatches"],
                                "max_state_difference": run["max_state_difference"], "tolerance": TOLERANCE},
        "no_dead_letters": {"met": run["dead_letters"] == 0, "measured": run["dead_letters"]},
        "no_unexpected_exits": {"met": not run["unexpected_exits"], "measured": len(run["unexpected_exits"])},
        "events_in_sequence": {"met": run["seq_out_of_order"] == 0, "measured": run["seq_out_of_order"]},
    }
    if exactly_once:
        requirements["transactions_resolved"] = {"met": run["open_transaction_wait_s"] is not None,
                                                 "measured": run["open_transaction_wait_s"]}
        requirements["no_duplicates"] = {"met": run["duplicates"] == 0, "measured": run["duplicates"]}
    else:
        requirements["duplicates_identical"] = {"met": run["nonidentical_duplicates"] == 0,
                                                "measured": run["nonidentical_duplicates"],
                                                "duplicates": run["duplicates"]}
    return requirements


# -- report ----------------------------------------------------------------------------------------------


RECOVERY_DEFINITION = (
    "recovery_s: from the SIGKILL of a member until the first offset sample (every "
    f"{MONITOR_INTERVAL_S} s) in which every input partition's committed offset is above its value sampled "
    "just before the kill, or equals the partition's end offset; new events reach every partition every "
    f"{PRODUCE_TICK_S} s while the chaos runs. restart_ready_s: from the SIGKILL until the restarted "
    "process's /readyz returns 200 (polled every "
    f"{READY_POLL_S} s). The restart follows the kill after a random delay of up to {MAX_RESTART_DELAY_S} s, "
    "included in both. Isolated kills: kills whose interval from kill to recovery overlaps no other kill's, "
    "join's or leave's interval.")


def numpy_to_json(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def format_markdown(report: dict) -> str:
    lines = [
        "# Fault harness",
        "",
        f"Command: `{report['command']}` ({report['date']}, {report['machine']['cores']} cores, "
        f"{report['machine']['cpu']}). Seed {report['seed']}. Result: "
        f"{'all requirements met' if report['passed'] else 'REQUIREMENTS FAILED'}.",
        "",
        "| guarantee | events | entities | partitions | kills | restarts | joins | leaves | lost | duplicates | "
        "non-identical duplicates | step mismatches | max prediction difference | state mismatches | "
        "max state difference | recovery p50 / p90 / max (s) | isolated kills: recovery p50 / max (s) | "
        "restart ready p50 / max (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|",
    ]
    for run in report["runs"]:
        recovery, ready, isolated = run["recovery_s"], run["restart_ready_s"], run["recovery_isolated_kills_s"]
        lines.append(
            f"| {run['guarantee']} ({run['membership']}) | {run['events']:,} | {run['entities']:,} | "
            f"{run['partitions']} | {run['kills']} | {run['restarts']} | {run['joins']} | {run['leaves']} | "
            f"{run['lost']} | {run['duplicates']} | {run['nonidentical_duplicates']} | {run['step_mismatches']} | "
            f"{run['max_prediction_difference']:.3g} | {run['state_mismatches']} | "
            f"{run['max_state_difference']:.3g} | {recovery.get('p50')} / {recovery.get('p90')} / "
            f"{recovery.get('max')} | {isolated.get('p50')} / {isolated.get('max')} ({isolated['count']} kills) | "
            f"{ready.get('p50')} / {ready.get('max')} |")
    lines += ["", "Requirements:", ""]
    for run in report["runs"]:
        for name, item in run["requirements"].items():
            lines.append(f"- {run['guarantee']}: {name}: {'met' if item['met'] else 'NOT met'} "
                         f"(measured {item['measured']})")
    lines += ["", "Definitions: " + RECOVERY_DEFINITION,
              f"Prediction and state tolerance: {TOLERANCE}. Outputs are read with read_committed for "
              "exactly-once and read_uncommitted for at-least-once.", ""]
    return "\n".join(lines)


def print_summary(report: dict) -> None:
    print(format_markdown(report))
    for run in report["runs"]:
        for name, item in run["requirements"].items():
            if not item["met"]:
                print(f"FAILED [{run['guarantee']}] {name}: {item}", flush=True)
        for exit_info in run["unexpected_exits"]:
            print(f"unexpected exit of {exit_info['member']} ({exit_info['exit_code']}):\n{exit_info['log_tail']}")


# -- command line ----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--guarantee", choices=[*GUARANTEES, "both"], default="both",
                        help="delivery guarantee of the services; both runs one after the other")
    parser.add_argument("--short", action="store_true",
                        help="the CI form: 10 kills, 1 join, 1 leave, 30,000 events over 55 s per guarantee")
    parser.add_argument("--kills", type=int, help="kill -9s, each followed by a restart (default 10)")
    parser.add_argument("--joins", type=int, help="members added during the run (default: 1 per 25 kills, at least 1)")
    parser.add_argument("--leaves", type=int,
                        help="members stopped with SIGTERM and not restarted (default: 1 per 25 kills, at least 1)")
    parser.add_argument("--events", type=int, help="events written per guarantee (default: 2,000 per kill, "
                                                   "30,000 to 100,000)")
    parser.add_argument("--entities", type=int, default=1000, help="distinct entities (Kafka keys)")
    parser.add_argument("--partitions", type=int, default=4, help="partitions of the input topic")
    parser.add_argument("--duration-s", type=float,
                        help="seconds over which events are written and chaos actions spread (default: 4.5 per "
                             "action, at least 30)")
    parser.add_argument("--membership", choices=["static", "dynamic"], default="static",
                        help="membership of at-least-once runs; exactly-once always uses static member ids")
    parser.add_argument("--seed", type=int, default=0, help="seed of the events and of the chaos schedule")
    parser.add_argument("--bootstrap-servers", help="use this running broker instead of starting a local one")
    parser.add_argument("--output", type=Path,
                        help="report JSON path; a Markdown summary is written next to it (default: "
                             "benchmarks/results/fault_harness_short.json or _long.json)")
    parser.add_argument("--work-dir", type=Path, help="directory for service logs (default: a temporary one, "
                                                      "kept when a requirement fails)")
    args = parser.parse_args(argv)

    if args.short:
        args.kills = 10 if args.kills is None else args.kills
        args.events = 30_000 if args.events is None else args.events
        args.duration_s = 55.0 if args.duration_s is None else args.duration_s
    if args.kills is None:
        args.kills = 10
    if args.kills < 0:
        parser.error("--kills must be 0 or more")
    if args.joins is None:
        args.joins = max(1, args.kills // 25)
    if args.leaves is None:
        args.leaves = max(1, args.kills // 25)
    if args.leaves >= INITIAL_MEMBERS + args.joins:
        parser.error(f"--leaves must be below {INITIAL_MEMBERS} plus --joins, so that one member remains")
    if args.events is None:
        args.events = min(100_000, max(30_000, 2_000 * args.kills))
    if args.duration_s is None:
        args.duration_s = max(30.0, 4.5 * (args.kills + args.joins + args.leaves))
    if args.entities < 1 or args.partitions < 1 or args.events < 1 or args.duration_s <= 0:
        parser.error("--entities, --partitions, --events and --duration-s must be positive")
    if args.output is None:
        args.output = RESULTS_DIR / ("fault_harness_short.json" if args.short else "fault_harness_long.json")
    return args


async def run_all(args: argparse.Namespace, bootstrap: str, work_dir: Path) -> list[dict]:
    model_path = write_model(work_dir / "seed-lstm.pt")
    guarantees = GUARANTEES if args.guarantee == "both" else (args.guarantee,)
    return [await run_guarantee(guarantee, args, bootstrap, work_dir, model_path) for guarantee in guarantees]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    info = e2e.machine_info()
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="streamer-fault-harness-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    broker = None
    bootstrap = args.bootstrap_servers
    try:
        if bootstrap is None:
            broker = LocalKafka(work_dir / "kafka")
            print("Starting a local Kafka broker ...", flush=True)
            bootstrap = broker.start(timeout_s=120)
        runs = asyncio.run(run_all(args, bootstrap, work_dir))
    finally:
        if broker is not None:
            broker.stop()

    report = {
        "machine": info, "command": "python " + " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"),
        "seed": args.seed, "model": {"input": INPUT, "hidden": HIDDEN, "layers": LAYERS, "output": OUTPUT,
                                     "torch_seed": 0},
        "service_settings": SERVICE_SETTINGS, "tolerance": TOLERANCE, "recovery_definition": RECOVERY_DEFINITION,
        "runs": runs, "passed": all(run["passed"] for run in runs),
        "total_seconds": round(time.monotonic() - started, 1),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=1, default=numpy_to_json) + "\n")
    args.output.with_suffix(".md").write_text(format_markdown(report))
    print_summary(report)
    print(f"wrote {args.output} and {args.output.with_suffix('.md')}; total {report['total_seconds']:.0f} s; "
          f"service logs in {work_dir}")
    if report["passed"] and args.work_dir is None:
        import shutil

        shutil.rmtree(work_dir, ignore_errors=True)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
