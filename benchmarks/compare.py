"""Streamer side by side with peer implementations of the same job, and with two physical limits.

The job: read events ``{"features": [8 numbers]}`` keyed by entity (10,000 entities) from a 4-partition
input topic and write one output ``{"entity", "prediction": [...]}`` keyed by entity per event to the output
topic, at-least-once. The model is the seed LSTM, ``SeedNet(8, 64, 30, 1, 2)`` after ``torch.manual_seed(0)``,
whose weights are saved once and loaded by every implementation. Each process uses one torch thread.
Implementations (``benchmarks/peers/``):

- ``streamer``: ``python -m streamer run`` with default settings (stateful semantics).
- ``naive-loop``: an aiokafka per-event loop running the seed ``SeedNet`` over each entity's last 30
  events from zero state at batch 1.
- ``state-loop``: an aiokafka per-event loop carrying ``(h, c)`` per entity in a dict, one ``nn.LSTM``
  step at batch 1.
- ``quixstreams``: Quix Streams ``sdf.apply(..., stateful=True)`` with ``(h, c)`` in its state store.
- ``faust``: faust-streaming, an agent with a ``Table`` of ``(h, c)``.

Quix Streams and faust-streaming run in their own virtual environment, built by
``benchmarks/peers/setup-venv.sh``, so their pinned dependencies stay out of the project's environment.

Per implementation, one broker for all, one implementation process at a time:

1. Parity and latency, one process. A parity prefix (``--parity-events`` events over 50 entities, so each
   entity gets about 40 events and the 30-event window fills) is written first. Its outputs are compared
   per entity, in order, with streamer's (``window`` semantics with ``seq_len`` 30 for ``naive-loop``,
   from a separate streamer process); every prediction must agree within 1e-5. Then a paced load of
   ``--load`` events/s over 10,000 entities runs for ``--load-seconds``. Latency of one event = the output
   record's timestamp minus the input record's timestamp. Output topics are created with
   ``message.timestamp.type=LogAppendTime``, so the broker stamps each output when it appends it and no
   implementation can copy the input timestamp into its output (Quix Streams does that by default). The
   input timestamp is the CreateTime this driver sets when it appends the record to a batch. Outputs are
   matched to inputs per entity in order.
2. Throughput, a new process on new topics. ``--events`` events are written first. The driver polls the
   output topic's end offsets every 50 ms and measures from the first poll that sees an output (so startup
   is excluded) until all outputs are there or ``--budget-seconds`` have passed. events/s is the outputs
   written in that window divided by its length. CPU seconds are utime + stime from ``/proc/<pid>/stat``
   over the same window, and peak RSS is ``VmHWM`` from ``/proc/<pid>/status`` at its end.

Limits: the Kafka client floor (``benchmarks/peers/kafka_floor.py``: the same consumer and producer
settings as the service, records passed through unchanged) is measured as phase 2. The compute floor is
the model's matrix-multiply FLOPs per event divided by the single-thread float32 ``torch.matmul`` rate at
batch 4096 on the model's shapes, measured here.

Usage: python benchmarks/compare.py [--quick] [--only NAME,...] [--output PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import orjson
import torch

import kafka_end_to_end as e2e
from streamer.kafka.local_broker import LocalKafka
from streamer.kafka.producer import KeyPartitioner

from aiokafka.admin import NewTopic

REPOSITORY = Path(__file__).resolve().parent.parent
PEERS_DIRECTORY = Path(__file__).resolve().parent / "peers"
RESULTS = Path(__file__).parent / "results" / "compare.json"
PEERS_PYTHON = Path(os.environ.get("STREAMER_CACHE", Path.home() / ".cache" / "streamer")) / "peers-venv" / "bin" / "python"
INPUT, HIDDEN, LAYERS, OUTPUT, WINDOW = e2e.INPUT, e2e.HIDDEN, e2e.LAYERS, e2e.OUTPUT, e2e.WINDOW
PARTITIONS = e2e.PARTITIONS
ENTITIES = 10_000
PARITY_ENTITIES = 50
PARITY_TOLERANCE = 1e-5
OUTPUT_POLL_S = 0.05
FIRST_OUTPUT_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0
TARGET_SPEEDUP = 10.0
TARGET_FLOOR_RATIO = 1.5
CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


# -- implementations -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Implementation:
    name: str
    description: str
    semantics: str  # the streamer semantics its outputs must match: "stateful" or "window"
    peers_venv: bool = False
    script: str | None = None  # None for streamer itself
    arguments: tuple[str, ...] = ()


STREAMER = Implementation("streamer", "python -m streamer run, default settings", "stateful")
STREAMER_WINDOW = Implementation("streamer-window", "python -m streamer run, window semantics, seq_len 30",
                                 "window")
PEERS = (
    Implementation("naive-loop", "aiokafka per-event loop, SeedNet over the last 30 events from zero state, "
                   "batch 1", "window", script="aiokafka_loop.py", arguments=("--mode", "naive")),
    Implementation("state-loop", "aiokafka per-event loop, (h, c) per entity in a dict, one LSTM step at batch 1",
                   "stateful", script="aiokafka_loop.py", arguments=("--mode", "stateful")),
    Implementation("quixstreams", "Quix Streams, sdf.apply(stateful=True) with (h, c) in its state store",
                   "stateful", peers_venv=True, script="quix_peer.py"),
    Implementation("faust", "faust-streaming agent with a Table of (h, c)", "stateful", peers_venv=True,
                   script="faust_peer.py"),
)
KAFKA_FLOOR = Implementation("kafka-floor", "aiokafka getmany -> send_batch of the same records -> commit, "
                             "no processing", "none", script="kafka_floor.py")


class ImplementationProcess:
    """One running implementation, with its CPU time and peak RSS read from /proc."""

    def __init__(self, implementation: Implementation, work_dir: Path, bootstrap: str, model_path: Path,
                 topics: e2e.Topics, peers_python: Path) -> None:
        self.implementation = implementation
        self.log_path = work_dir / f"{implementation.name}-{topics.group}.log"
        environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPOSITORY)}
        if implementation.script is None:
            command = [sys.executable, "-m", "streamer", "run"]
            environment.update({
                "STREAMER_MODEL": str(model_path),
                "STREAMER_BOOTSTRAP_SERVERS": bootstrap,
                "STREAMER_INPUT_TOPICS": topics.input,
                "STREAMER_OUTPUT_TOPIC": topics.output,
                "STREAMER_DEAD_LETTER_TOPIC": topics.dead_letter,
                "STREAMER_GROUP_ID": topics.group,
                "STREAMER_TOPIC_PARTITIONS": str(PARTITIONS),
                "STREAMER_METRICS_PORT": str(e2e.free_port()),
                "STREAMER_TORCH_THREADS": "1",
                "STREAMER_GUARANTEE": "at-least-once",
                "STREAMER_LOG_LEVEL": "WARNING",
            })
            if implementation.semantics == "window":
                environment.update({"STREAMER_SEMANTICS": "window", "STREAMER_SEQ_LEN": str(WINDOW)})
        else:
            python = peers_python if implementation.peers_venv else Path(sys.executable)
            state_dir = work_dir / f"state-{topics.group}"
            command = [str(python), str(PEERS_DIRECTORY / implementation.script), *implementation.arguments,
                       "--bootstrap-servers", bootstrap, "--input-topic", topics.input,
                       "--output-topic", topics.output, "--group-id", topics.group, "--model", str(model_path),
                       "--state-dir", str(state_dir), "--partitions", str(PARTITIONS)]
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(command, env=environment, stdout=self._log, stderr=subprocess.STDOUT,
                                        cwd=REPOSITORY)

    def cpu_seconds(self) -> float:
        """Return utime + stime of the process so far, from /proc/<pid>/stat."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        # After the command name, field 3 (state) is index 0, so utime (field 14) and stime (15) are 11 and 12.
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS_PER_S

    def peak_rss_bytes(self) -> int:
        """Return VmHWM (peak resident set size) of the process, from /proc/<pid>/status."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"no VmHWM in /proc/{self.process.pid}/status")

    def check_running(self) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(f"{self.implementation.name} exited with {self.process.returncode}:\n"
                               f"{self.log_tail()}")

    def stop(self) -> int | None:
        """Send SIGTERM, wait up to STOP_TIMEOUT_S, then SIGKILL; return the exit code."""
        try:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                print(f"  {self.implementation.name} did not stop within {STOP_TIMEOUT_S:.0f} s of SIGTERM; "
                      "killing it", flush=True)
                self.process.kill()
                self.process.wait(10)
                return None
        finally:
            self._log.close()

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


# -- topics and records ----------------------------------------------------------------------------------


async def create_topics(broker: e2e.Broker, prefix: str) -> e2e.Topics:
    """Create new input, output and dead-letter topics; outputs get broker-side (LogAppendTime) timestamps."""
    topics = e2e.Topics.unique(prefix)
    size = {"max.message.bytes": str(8 << 20)}
    await broker.admin.create_topics([
        NewTopic(topics.input, PARTITIONS, 1, topic_configs=size),
        NewTopic(topics.output, PARTITIONS, 1, topic_configs={**size, "message.timestamp.type": "LogAppendTime"}),
        NewTopic(topics.dead_letter, PARTITIONS, 1, topic_configs=size),
    ])
    await wait_for_leaders(broker, topics.names)
    return topics


async def wait_for_leaders(broker: e2e.Broker, names: tuple[str, ...], attempts: int = 100) -> None:
    """Poll topic metadata until every partition has a leader, so the first writes are not retried."""
    for _ in range(attempts):
        described = await broker.admin.describe_topics(list(names))
        ready = [item for item in described
                 if len(item["partitions"]) == PARTITIONS and all(p["leader"] >= 0 for p in item["partitions"])]
        if len(ready) == len(names):
            # NOTE: a new KRaft partition can be named leader in metadata before it accepts writes, so the
            # driver's first writes may still log NotLeaderForPartitionError once and be retried.
            return
        await asyncio.sleep(0.05)
    raise TimeoutError(f"partitions of {names} have no leader after {attempts * 0.05:.0f} s")


def keyed_events(n_events: int, n_entities: int, seed: int, keep_ts: bool) -> list[tuple[int, bytes, bytes]]:
    keys, values = e2e.make_events(n_events, n_entities, seed=seed)
    if not keep_ts:
        values = [e2e.without_ts(value) for value in values]
    return e2e.keyed_records(KeyPartitioner(PARTITIONS), keys, values)


async def wait_for_outputs(broker: e2e.Broker, topic: str, target: int, timeout_s: float,
                           process: ImplementationProcess) -> int:
    """Poll the output end offsets until they add up to ``target``; return the count reached."""
    deadline = time.monotonic() + timeout_s
    while True:
        count = sum((await broker.end_offsets(topic)).values())
        if count >= target or time.monotonic() > deadline:
            return count
        process.check_running()
        await asyncio.sleep(OUTPUT_POLL_S)


def records_by_key(records: list) -> dict[bytes, list]:
    grouped: dict[bytes, list] = collections.defaultdict(list)
    for record in sorted(records, key=lambda r: (r.partition, r.offset)):
        grouped[record.key].append(record)
    return grouped


# -- phase 1: parity and latency --------------------------------------------------------------------------


def predictions_by_key(records: list) -> dict[bytes, list[list[float]]]:
    return {key: [orjson.loads(record.value)["prediction"] for record in group]
            for key, group in records_by_key(records).items()}


def compare_predictions(reference: dict[bytes, list], candidate: dict[bytes, list]) -> dict:
    """Compare per-entity output sequences; return counts and the largest absolute difference."""
    max_difference = 0.0
    mismatched_entities = []
    compared = 0
    for key in sorted(set(reference) | set(candidate)):
        expected, actual = reference.get(key, []), candidate.get(key, [])
        if len(expected) != len(actual):
            mismatched_entities.append(key.decode())
            continue
        if expected:
            difference = np.abs(np.asarray(expected, np.float64) - np.asarray(actual, np.float64)).max()
            max_difference = max(max_difference, float(difference))
            compared += len(expected)
    return {"compared_outputs": compared, "max_abs_difference": max_difference,
            "entities_with_different_output_counts": mismatched_entities[:10],
            "passed": not mismatched_entities and compared > 0 and max_difference <= PARITY_TOLERANCE}


def latency_by_matching(inputs: list, outputs: list, measured_from_ms: int) -> dict:
    """Latency of each event: its output's LogAppendTime minus its input's CreateTime, in ms.

    The k-th output of an entity belongs to the k-th input of that entity, because every implementation
    processes one entity's events in order and writes each entity's outputs to one partition. Only inputs
    created at or after ``measured_from_ms`` count.
    """
    input_groups, output_groups = records_by_key(inputs), records_by_key(outputs)
    latencies = []
    unmatched = 0
    for key, group in input_groups.items():
        produced = output_groups.get(key, [])
        unmatched += abs(len(group) - len(produced))
        latencies.extend(out.timestamp - record.timestamp for record, out in zip(group, produced)
                         if record.timestamp >= measured_from_ms)
    if any(record.timestamp_type != 1 for record in outputs[:10]):
        raise RuntimeError("output records do not carry LogAppendTime timestamps")
    summary = {"inputs": len(inputs), "outputs": len(outputs), "unmatched": unmatched, "measured": len(latencies)}
    if latencies:
        values = np.asarray(latencies, np.float64)
        for quantile in (50, 99, 99.9):
            summary[f"p{quantile:g}_ms"] = float(np.percentile(values, quantile))
        summary["max_ms"] = float(values.max())
    return summary


async def parity_and_latency(broker: e2e.Broker, implementation: Implementation, context: RunContext,
                             reference: dict[bytes, list] | None) -> tuple[dict, dict[bytes, list]]:
    args = context.args
    topics = await create_topics(broker, f"cmp-{implementation.name}")
    await e2e.prefill(broker, topics.input, context.parity_records)
    process = context.start(implementation, topics)
    try:
        count = await wait_for_outputs(broker, topics.output, len(context.parity_records), FIRST_OUTPUT_TIMEOUT_S,
                                       process)
        if count < len(context.parity_records):
            raise RuntimeError(f"{implementation.name}: {count} of {len(context.parity_records)} parity outputs "
                               f"after {FIRST_OUTPUT_TIMEOUT_S:.0f} s:\n{process.log_tail()}")
        output_start = await broker.end_offsets(topics.output)
        parity_records = await e2e.read_outputs(broker.bootstrap, topics.output, {}, output_start)
        predictions = predictions_by_key(parity_records)
        parity = compare_predictions(reference, predictions) if reference is not None else None
        result = {"parity": parity}
        if args.load_seconds <= 0:
            return result, predictions

        input_start = await broker.end_offsets(topics.input)
        # Inputs appended before this time (epoch ms, the clock of CreateTime) are warm-up and not measured.
        measured_from_ms = int(time.time() * 1000 + args.warmup_seconds * 1000)
        sent = await e2e.paced_load(broker, topics.input, context.load_pool, args.load,
                                    args.warmup_seconds + args.load_seconds, 0)
        expected = sum(output_start.values()) + sent["sent"]
        drain_timeout = max(30.0, 2 * (args.warmup_seconds + args.load_seconds))
        await wait_for_outputs(broker, topics.output, expected, drain_timeout, process)
        input_end = await broker.end_offsets(topics.input)
        output_end = await broker.end_offsets(topics.output)
        inputs = await e2e.read_outputs(broker.bootstrap, topics.input, input_start, input_end)
        outputs = await e2e.read_outputs(broker.bootstrap, topics.output, output_start, output_end)
        result["latency"] = {"offered_events_per_s": args.load, "sent": sent["sent"],
                             "achieved_events_per_s": round(sent["achieved_events_per_s"], 1),
                             "warmup_seconds": args.warmup_seconds, "drain_timeout_s": drain_timeout,
                             **latency_by_matching(inputs, outputs, measured_from_ms)}
        return result, predictions
    finally:
        exit_code = process.stop()
        if exit_code not in (0, None):
            print(f"  {implementation.name} exited with {exit_code}; log tail:\n{process.log_tail()}", flush=True)


# -- phase 2: throughput ---------------------------------------------------------------------------------


async def throughput(broker: e2e.Broker, implementation: Implementation, context: RunContext) -> dict:
    args = context.args
    topics = await create_topics(broker, f"cmp-{implementation.name}")
    await e2e.prefill(broker, topics.input, context.throughput_records)
    total = len(context.throughput_records)
    process = context.start(implementation, topics)
    try:
        started = time.perf_counter()
        first_count = await wait_for_outputs(broker, topics.output, 1, FIRST_OUTPUT_TIMEOUT_S, process)
        first_time = time.perf_counter()
        if first_count == 0:
            raise RuntimeError(f"{implementation.name}: no output after {FIRST_OUTPUT_TIMEOUT_S:.0f} s:\n"
                               f"{process.log_tail()}")
        first_cpu = process.cpu_seconds()
        last_count = await wait_for_outputs(broker, topics.output, total, args.budget_seconds, process)
        last_time = time.perf_counter()
        last_cpu = process.cpu_seconds()
        peak_rss = process.peak_rss_bytes()
        events = last_count - first_count
        window_s = last_time - first_time
        return {
            "events_written": total,
            "outputs_at_first_poll": first_count,
            "outputs_at_end": last_count,
            "finished": last_count >= total,
            "startup_seconds": round(first_time - started, 3),
            "window_seconds": round(window_s, 3),
            "events_per_s": round(events / window_s) if window_s > 0 else None,
            "cpu_seconds": round(last_cpu - first_cpu, 2),
            "cpu_us_per_event": round((last_cpu - first_cpu) / events * 1e6, 1) if events else None,
            "cpu_seconds_total": round(last_cpu, 2),
            "peak_rss_mib": round(peak_rss / 2**20, 1),
        }
    finally:
        exit_code = process.stop()
        if exit_code not in (0, None):
            print(f"  {implementation.name} exited with {exit_code}; log tail:\n{process.log_tail()}", flush=True)


# -- the compute floor ------------------------------------------------------------------------------------


def model_flops_per_event() -> dict:
    """Matrix-multiply FLOPs of one LSTM step plus the head (a multiply-add counts as 2 FLOPs)."""
    gates = 4 * HIDDEN
    layers = [2 * gates * (INPUT + HIDDEN)] + [2 * gates * (HIDDEN + HIDDEN)] * (LAYERS - 1)
    head = 2 * HIDDEN * OUTPUT
    return {"lstm_layers": layers, "head": head, "total": sum(layers) + head}


def compute_floor(batch: int = 4096, repeats: int = 7, iterations: int = 20) -> dict:
    """Single-thread float32 matmul rate on the model's shapes at ``batch`` rows, as events/s of the model.

    Each layer's gates are one matmul of [x, h] (batch x (in + hidden)) by (in + hidden) x 4 hidden, and the
    head is batch x hidden by hidden x output. The best of ``repeats`` timings is used.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        generator = torch.Generator().manual_seed(0)
        shapes = [(INPUT + HIDDEN, 4 * HIDDEN)] + [(2 * HIDDEN, 4 * HIDDEN)] * (LAYERS - 1) + [(HIDDEN, OUTPUT)]
        operands = [(torch.randn(batch, k, generator=generator), torch.randn(k, n, generator=generator))
                    for k, n in shapes]
        outputs = [torch.empty(batch, n) for _, n in shapes]
        for _ in range(3):
            for (a, b), out in zip(operands, outputs):
                torch.matmul(a, b, out=out)
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            for _ in range(iterations):
                for (a, b), out in zip(operands, outputs):
                    torch.matmul(a, b, out=out)
            best = min(best, (time.perf_counter() - started) / iterations)
    finally:
        torch.set_num_threads(threads)
    flops = model_flops_per_event()
    return {"batch": batch, "seconds_per_batch": best, "gflops_per_s": round(flops["total"] * batch / best / 1e9, 2),
            "flops_per_event": flops, "events_per_s": round(batch / best),
            "method": "best of 7 timings of 20 rounds of torch.matmul(out=...) on the model's gate and head "
                      "shapes at batch 4096, one thread, float32; element-wise gate activations are not counted"}


# -- the run ---------------------------------------------------------------------------------------------


@dataclass
class RunContext:
    args: argparse.Namespace
    work_dir: Path
    bootstrap: str
    model_path: Path
    peers_python: Path
    parity_records: list = field(default_factory=list)
    load_pool: list = field(default_factory=list)
    throughput_records: list = field(default_factory=list)
    running: list = field(default_factory=list)

    def start(self, implementation: Implementation, topics: e2e.Topics) -> ImplementationProcess:
        print(f"  starting {implementation.name} on {topics.input}", flush=True)
        process = ImplementationProcess(implementation, self.work_dir, self.bootstrap, self.model_path, topics,
                                        self.peers_python)
        self.running.append(process)
        return process

    def stop_all(self) -> None:
        for process in self.running:
            if process.process.poll() is None:
                process.stop()


async def run_all(context: RunContext, selected: list[Implementation]) -> dict:
    args = context.args
    broker = e2e.Broker(context.bootstrap)
    await broker.start()
    results: dict = {}
    try:
        references: dict[str, dict[bytes, list]] = {}
        if any(peer.semantics == "window" for peer in selected):
            print("streamer-window: reference outputs for the window-semantics peers ...", flush=True)
            _, references["window"] = await parity_and_latency(
                broker, STREAMER_WINDOW, context_without_load(context), None)

        for implementation in [STREAMER, *selected]:
            print(f"{implementation.name}: parity and latency at {args.load:,} events/s ...", flush=True)
            reference = references.get(implementation.semantics)
            phase_one, predictions = await parity_and_latency(broker, implementation, context, reference)
            if implementation is STREAMER:
                references["stateful"] = predictions
                phase_one["parity"] = {"reference": True}
            print(f"  {json.dumps(phase_one)}", flush=True)
            print(f"{implementation.name}: throughput ...", flush=True)
            phase_two = await throughput(broker, implementation, context)
            print(f"  {json.dumps(phase_two)}", flush=True)
            results[implementation.name] = {"description": implementation.description,
                                            "semantics": implementation.semantics, **phase_one,
                                            "throughput": phase_two}

        print("kafka-floor: throughput ...", flush=True)
        results[KAFKA_FLOOR.name] = {"description": KAFKA_FLOOR.description,
                                     "throughput": await throughput(broker, KAFKA_FLOOR, context)}
        print(f"  {json.dumps(results[KAFKA_FLOOR.name]['throughput'])}", flush=True)
    finally:
        context.stop_all()
        await broker.close()
    return results


def context_without_load(context: RunContext) -> RunContext:
    args = argparse.Namespace(**{**vars(context.args), "load_seconds": 0})
    return RunContext(args, context.work_dir, context.bootstrap, context.model_path, context.peers_python,
                      context.parity_records, context.load_pool, context.throughput_records, context.running)


# -- report ----------------------------------------------------------------------------------------------


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator in (None, 0):
        return None
    return round(numerator / denominator, 2)


def add_ratios(results: dict) -> None:
    base = results["streamer"]
    base_rate = base["throughput"]["events_per_s"]
    for name, result in results.items():
        if name in ("streamer", KAFKA_FLOOR.name):
            continue
        result["streamer_ratio"] = {
            "events_per_s": ratio(base_rate, result["throughput"]["events_per_s"]),
            "p99_ms": ratio(base.get("latency", {}).get("p99_ms"), result.get("latency", {}).get("p99_ms")),
            "cpu_us_per_event": ratio(base["throughput"]["cpu_us_per_event"], result["throughput"]["cpu_us_per_event"]),
            "peak_rss_mib": ratio(base["throughput"]["peak_rss_mib"], result["throughput"]["peak_rss_mib"]),
        }


def check_targets(results: dict, floors: dict) -> dict:
    streamer = results["streamer"]
    rate = streamer["throughput"]["events_per_s"]
    p99 = streamer.get("latency", {}).get("p99_ms")
    peers = {name: result for name, result in results.items() if name not in ("streamer", KAFKA_FLOOR.name)}
    targets = {}
    if peers:
        best_name = max(peers, key=lambda name: peers[name]["throughput"]["events_per_s"] or 0)
        best = peers[best_name]
        best_p99 = best.get("latency", {}).get("p99_ms")
        speedup = ratio(rate, best["throughput"]["events_per_s"])
        targets["ten_times_best_peer"] = {
            "best_peer": best_name, "speedup": speedup, "streamer_p99_ms": p99, "best_peer_p99_ms": best_p99,
            "met": speedup is not None and speedup >= TARGET_SPEEDUP and p99 is not None and best_p99 is not None
            and p99 <= best_p99}
    floor_rate = floors["kafka_client"]["events_per_s"]
    targets["within_1_5x_of_kafka_floor"] = {"floor_over_streamer": ratio(floor_rate, rate),
                                             "met": floor_rate is not None and rate is not None
                                             and floor_rate / rate <= TARGET_FLOOR_RATIO}
    return targets


def format_number(value, digits: int = 0) -> str:
    if value is None:
        return "n/a"
    return f"{value:,.{digits}f}"


def format_markdown(report: dict) -> str:
    machine = report["machine"]
    lines = ["# streamer compared with peers and with the physical limits", "",
             f"Command: `{report['command']}`, {report['date']}, {report['total_seconds']:.0f} s.",
             f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']} GiB, Python "
             f"{machine['python']}, torch {machine['torch']}, aiokafka {machine['aiokafka']} (project), "
             f"Kafka {machine['kafka']} broker on 127.0.0.1, load average at start "
             f"{', '.join(f'{x:.2f}' for x in machine['load_average_at_start'])}.",
             f"Peers venv: {report.get('peers_versions', 'n/a')}.", "",
             f"Events: {ENTITIES:,} entities, 8 features, 4 input partitions. Throughput: "
             f"{report['settings']['events']:,} events written first, measured from the first output for up to "
             f"{report['settings']['budget_seconds']:g} s. Latency: paced load of {report['settings']['load']:,} "
             f"events/s, {report['settings']['warmup_seconds']:g} s of warm-up and then "
             f"{report['settings']['load_seconds']:g} s measured, output LogAppendTime minus input "
             "CreateTime. Parity: outputs of the first "
             f"{report['settings']['parity_events']:,} events ({PARITY_ENTITIES} entities) within "
             f"{PARITY_TOLERANCE:g} of streamer's.", "",
             "| implementation | events/s | streamer ÷ it | p50 ms | p99 ms | CPU s | CPU µs/event | peak RSS MiB "
             "| parity max diff |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]

    for name, result in report["results"].items():
        tp = result["throughput"]
        latency = result.get("latency", {})
        parity = result.get("parity") or {}
        if parity.get("reference"):
            parity_text = "reference"
        elif "max_abs_difference" in parity:
            parity_text = f"{parity['max_abs_difference']:.1e} ({'pass' if parity['passed'] else 'FAIL'})"
        else:
            parity_text = "n/a"
        speed = result.get("streamer_ratio", {}).get("events_per_s")
        if name == "streamer":
            speed_text = "1.00"
        elif speed is None:
            speed_text = "n/a"
        else:
            speed_text = f"{speed:,.2f}"
        finished = "" if tp["finished"] else " (budget)"
        # A paced load above the implementation's throughput builds a queue, so its latency is mostly waiting.
        saturated = " (saturated)" if tp["events_per_s"] is not None and tp["events_per_s"] < report["settings"]["load"] else ""
        lines.append(f"| {name} | {format_number(tp['events_per_s'])}{finished} | {speed_text} "
                     f"| {format_number(latency.get('p50_ms'))}{saturated} | {format_number(latency.get('p99_ms'))} "
                     f"| {format_number(tp['cpu_seconds'], 1)} | {format_number(tp['cpu_us_per_event'], 1)} "
                     f"| {format_number(tp['peak_rss_mib'])} | {parity_text} |")

    floors = report["floors"]
    streamer_rate = report["results"]["streamer"]["throughput"]["events_per_s"]
    compute = floors["compute"]
    lines += ["", "Limits:", "",
              f"- Kafka client floor (same records passed through, no processing): "
              f"{format_number(floors['kafka_client']['events_per_s'])} events/s; streamer reaches "
              f"{format_number(100 * streamer_rate / floors['kafka_client']['events_per_s'], 1)}% of it.",
              f"- Compute floor: {compute['flops_per_event']['total']:,} matmul FLOPs per event at "
              f"{compute['gflops_per_s']} GFLOP/s (one thread, batch {compute['batch']}) = "
              f"{format_number(compute['events_per_s'])} events/s; streamer reaches "
              f"{format_number(100 * streamer_rate / compute['events_per_s'], 2)}% of it.", "", "Targets:", ""]

    for name, target in report["targets"].items():
        details = ", ".join(f"{key} {value}" for key, value in target.items() if key != "met")
        lines.append(f"- {name}: {'met' if target['met'] else '**not met**'} ({details})")
    for problem in report["problems"]:
        lines.append(f"- PROBLEM: {problem}")
    lines += ["", "Implementations:", ""]
    for name, result in report["results"].items():
        lines.append(f"- `{name}`: {result['description']}")
    return "\n".join(lines) + "\n"


def find_problems(results: dict) -> list[str]:
    problems = []
    for name, result in results.items():
        parity = result.get("parity")
        if parity and not parity.get("reference") and not parity.get("passed"):
            problems.append(f"{name}: parity failed ({parity})")
        latency = result.get("latency")
        if latency and latency["unmatched"]:
            problems.append(f"{name}: {latency['unmatched']} of {latency['inputs']} load events had no matching "
                            f"output within {latency['drain_timeout_s']:.0f} s, so its percentiles leave them out")
    return problems


def peers_versions(peers_python: Path) -> str:
    completed = subprocess.run([str(peers_python), "-c", "import quixstreams, faust, aiokafka, confluent_kafka; "
                                "print(f'quixstreams {quixstreams.__version__}, faust-streaming {faust.__version__}, "
                                "aiokafka {aiokafka.__version__}, confluent-kafka {confluent_kafka.__version__}')"],
                               capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    return completed.stdout.strip() or f"unavailable: {completed.stderr.strip()[-300:]}"


# -- command line ----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000, help="events written before each throughput phase")
    parser.add_argument("--budget-seconds", type=float, default=30.0,
                        help="maximum throughput measurement per implementation, in s, from its first output")
    parser.add_argument("--load", type=int, default=1_000,
                        help="paced load for the latency phase, in events/s")
    parser.add_argument("--load-seconds", type=float, default=15.0,
                        help="duration of the measured paced load, in s, after the warm-up")
    parser.add_argument("--warmup-seconds", type=float, default=5.0,
                        help="paced load before the measured part, in s; its events are left out of the latency")
    parser.add_argument("--parity-events", type=int, default=2_000,
                        help=f"events over {PARITY_ENTITIES} entities whose outputs are compared with streamer's")
    parser.add_argument("--only", help="comma-separated peers to run (default all): "
                        + ", ".join(peer.name for peer in PEERS))
    parser.add_argument("--peers-python", type=Path, default=PEERS_PYTHON,
                        help="interpreter of the peers venv (built by benchmarks/peers/setup-venv.sh)")
    parser.add_argument("--quick", action="store_true",
                        help="200,000 events, 10 s budget, 2 s of warm-up and 5 s of measured load, no results "
                        "file unless --output is given")
    parser.add_argument("--output", type=Path, help=f"results file (default {RESULTS}, none with --quick); the "
                        "Markdown table goes next to it with the suffix .md")
    args = parser.parse_args(argv)

    if args.quick:
        args.events = min(args.events, 200_000)
        args.budget_seconds = min(args.budget_seconds, 10.0)
        args.load_seconds = min(args.load_seconds, 5.0)
        args.warmup_seconds = min(args.warmup_seconds, 2.0)
    elif args.output is None:
        args.output = RESULTS

    names = {peer.name: peer for peer in PEERS}
    if args.only:
        unknown = [name for name in args.only.split(",") if name not in names]
        if unknown:
            parser.error(f"unknown peer(s) {unknown}: expected some of {sorted(names)}")
        args.selected = [names[name] for name in args.only.split(",")]
    else:
        args.selected = list(PEERS)
    if any(peer.peers_venv for peer in args.selected) and not args.peers_python.exists():
        parser.error(f"peers venv interpreter {args.peers_python} not found; run benchmarks/peers/setup-venv.sh")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    info = e2e.machine_info()
    print("Compute floor (single-thread matmul) ...", flush=True)
    compute = compute_floor()
    print(f"  {compute['gflops_per_s']} GFLOP/s = {compute['events_per_s']:,} events/s", flush=True)

    with tempfile.TemporaryDirectory(prefix="streamer-compare-") as temporary:
        work_dir = Path(temporary)
        model_path = e2e.write_model(work_dir / "seed-lstm.pt")
        context = RunContext(args, work_dir, "", model_path, args.peers_python)
        context.parity_records = keyed_events(args.parity_events, PARITY_ENTITIES, seed=2, keep_ts=False)
        pool_events = min(e2e.LOAD_POOL_EVENTS, int(args.load * (args.warmup_seconds + args.load_seconds)) + 1)
        context.load_pool = keyed_events(pool_events, ENTITIES, seed=1, keep_ts=False)
        context.throughput_records = keyed_events(args.events, ENTITIES, seed=0, keep_ts=True)
        broker = LocalKafka(work_dir / "kafka")
        print("Starting a local Kafka broker ...", flush=True)
        context.bootstrap = broker.start(timeout_s=120)
        try:
            results = asyncio.run(run_all(context, args.selected))
        finally:
            context.stop_all()
            broker.stop()

    floors = {"kafka_client": results.pop(KAFKA_FLOOR.name)["throughput"], "compute": compute}
    add_ratios(results)
    report = {"machine": info, "command": "python " + " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"),
              "peers_versions": peers_versions(args.peers_python) if args.peers_python.exists() else None,
              "settings": {"events": args.events, "entities": ENTITIES, "budget_seconds": args.budget_seconds,
                           "load": args.load, "load_seconds": args.load_seconds,
                           "warmup_seconds": args.warmup_seconds,
                           "parity_events": args.parity_events, "parity_entities": PARITY_ENTITIES,
                           "partitions": PARTITIONS},
              "latency_definition": "output record LogAppendTime (output topics use message.timestamp.type="
                                    "LogAppendTime) minus input record CreateTime set by the driver, in ms, "
                                    "outputs matched to inputs per entity in order",
              "results": results, "floors": floors}
    report["targets"] = check_targets(results, floors)
    report["problems"] = find_problems(results)
    report["total_seconds"] = round(time.perf_counter() - started, 1)
    markdown = format_markdown(report)
    print(markdown)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=1) + "\n")
        args.output.with_suffix(".md").write_text(markdown)
        print(f"wrote {args.output} and {args.output.with_suffix('.md')}")
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
