"""Time profile of the Kafka service: cProfile of the throughput phase and wall time per batch stage.

Runs ``StreamerService`` in this process against a local broker (started here unless
``--bootstrap-servers`` is given), with the model, events and topics of ``kafka_end_to_end.py``:

1. Throughput: ``--events`` events are written to the input topic, the service starts, and cProfile runs
   from its first partition assignment until the group's committed offsets reach the end of the input.
2. Stage timing: wall time of each batch stage (fetch, decode, engine step, delivery of outputs until
   acknowledged) and of each checkpoint, which commits the input offsets. It is measured during the
   throughput phase and during a paced load of ``--load`` events/s for ``--load-seconds``.

NOTE: the stage timers wrap private methods of ``StreamerService`` (``_process``, ``_deliver``,
``_checkpoint``). A stage whose method no longer exists is listed as not timed. During the paced load
the producer shares the service's event loop and process, so quote the absolute latencies of
``kafka_end_to_end.py`` (service in its own process) and use this script for the split only.

Usage: python benchmarks/kafka_service_profile.py [--events N] [--load N] [--output PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import functools
import io
import pstats
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

import kafka_end_to_end as bench
from streamer.config import load_settings
from streamer.kafka.local_broker import LocalKafka
from streamer.kafka.service import StreamerService

STAGES = ("fetch", "decode", "engine", "deliver", "checkpoint", "batch")


class StageTimers:
    """Wall time of each batch stage of one ``StreamerService``, recorded by wrapping its methods."""

    def __init__(self) -> None:
        self.seconds: dict[str, list[float]] = defaultdict(list)
        self.not_timed: list[str] = []

    def wrap_service(self, service: StreamerService) -> None:
        """Wrap the stages that exist before ``run`` starts: decode, engine step, deliver, checkpoint, batch."""
        service.decoder.decode = self._timed(service.decoder.decode, "decode")
        service.engine.process = self._timed(service.engine.process, "engine")
        for method, stage in (("_deliver", "deliver"), ("_checkpoint", "checkpoint"), ("_process", "batch")):
            if hasattr(service, method):
                setattr(service, method, self._timed_async(getattr(service, method), stage))
            else:
                self.not_timed.append(f"{stage} (StreamerService.{method} not found)")

    def wrap_consumer(self, service: StreamerService) -> None:
        """Wrap the fetch, whose consumer exists once the service has started."""
        service.consumer.getmany = self._timed_async(service.consumer.getmany, "fetch")

    def reset(self) -> None:
        self.seconds.clear()

    def summary(self) -> dict[str, dict[str, float]]:
        rows = {}
        for stage in STAGES:
            values = np.asarray(self.seconds.get(stage, []), np.float64) * 1000
            if values.size:
                rows[stage] = {"calls": int(values.size), "total_s": round(float(values.sum()) / 1000, 3),
                               "mean_ms": round(float(values.mean()), 3),
                               "p50_ms": round(float(np.percentile(values, 50)), 3),
                               "p99_ms": round(float(np.percentile(values, 99)), 3)}
        return rows

    def _timed(self, function, stage: str):
        @functools.wraps(function)
        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[stage].append(time.perf_counter() - started)
        return timed

    def _timed_async(self, function, stage: str):
        @functools.wraps(function)
        async def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return await function(*args, **kwargs)
            finally:
                self.seconds[stage].append(time.perf_counter() - started)
        return timed


def format_stages(title: str, rows: dict[str, dict[str, float]]) -> str:
    lines = [title, f"{'stage':<8} {'calls':>7} {'total s':>9} {'mean ms':>9} {'p50 ms':>9} {'p99 ms':>9}"]
    for stage, row in rows.items():
        lines.append(f"{stage:<8} {row['calls']:>7} {row['total_s']:>9.3f} {row['mean_ms']:>9.3f} "
                     f"{row['p50_ms']:>9.3f} {row['p99_ms']:>9.3f}")
    return "\n".join(lines)


async def profile_service(args: argparse.Namespace, bootstrap: str, work_dir: Path) -> str:
    model_path = bench.write_model(work_dir / "seed-lstm.pt")
    broker = bench.Broker(bootstrap)
    await broker.start()
    try:
        topics, input_ends, _ = await bench.fill_input(broker, args, "profile")
        settings = load_settings(model=model_path, bootstrap_servers=bootstrap, input_topics=[topics.input],
                                 output_topic=topics.output, dead_letter_topic=topics.dead_letter,
                                 group_id=topics.group, topic_partitions=bench.PARTITIONS, metrics_port=0)
        service = StreamerService(settings)
        timers = StageTimers()
        timers.wrap_service(service)
        profiler = cProfile.Profile()
        task = asyncio.create_task(service.run())
        try:
            while not service.readiness()[0]:
                if task.done():
                    await task
                await asyncio.sleep(bench.READY_POLL_S)
            timers.wrap_consumer(service)
            ready = time.perf_counter()
            profiler.enable()
            done = await _wait_committed(broker, topics, input_ends, task)
            profiler.disable()
            events = sum(input_ends.values())
            report = [f"Stages not timed: {', '.join(timers.not_timed)}"] if timers.not_timed else []
            report += [f"Throughput phase under cProfile: {events:,} events in {done - ready:.2f} s "
                      f"({events / (done - ready):,.0f} events/s with the profiler on)",
                      format_stages("Stage wall time during the throughput phase:", timers.summary())]

            timers.reset()
            pool = bench.load_pool(args, [args.load])
            sent = await bench.paced_load(broker, topics.input, pool, args.load, args.load_seconds, 0)
            await _wait_committed(broker, topics, await broker.end_offsets(topics.input), task)
            report.append(format_stages(f"Stage wall time at an offered {args.load:,} events/s for "
                                        f"{args.load_seconds:g} s ({sent['achieved_events_per_s']:,.0f} events/s "
                                        "sent):", timers.summary()))
        finally:
            service.request_stop()
            await task
    finally:
        await broker.close()

    for order in ("tottime", "cumulative"):
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats(order).print_stats(args.top)
        report.append(f"cProfile of the throughput phase, top {args.top} by {order}:\n{text.getvalue()}")
    return "\n\n".join(report)


async def _wait_committed(broker: bench.Broker, topics: bench.Topics, targets: dict[int, int],
                          task: asyncio.Task) -> float:
    deadline = time.monotonic() + bench.DRAIN_TIMEOUT_S
    while True:
        committed = await broker.committed(topics.group, topics.input)
        if all(committed.get(p, 0) >= end for p, end in targets.items()):
            return time.perf_counter()
        if task.done():
            await task
            raise RuntimeError("the service stopped before committing every input offset")
        if time.monotonic() > deadline:
            raise TimeoutError(f"committed offsets {committed} did not reach {targets}")
        await asyncio.sleep(bench.COMMIT_POLL_S)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=300_000, help="events written before the throughput phase")
    parser.add_argument("--entities", type=int, default=10_000, help="distinct entities (Kafka keys)")
    parser.add_argument("--load", type=int, default=10_000, help="offered load of the stage-timing phase, events/s")
    parser.add_argument("--load-seconds", type=float, default=10.0, help="duration of the offered load, in s")
    parser.add_argument("--top", type=int, default=25, help="functions listed per ordering")
    parser.add_argument("--bootstrap-servers", help="use this running broker instead of starting a local one")
    parser.add_argument("--output", type=Path, help="also write the report to this file")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="streamer-profile-") as temporary:
        work_dir = Path(temporary)
        broker = None
        bootstrap = args.bootstrap_servers
        if bootstrap is None:
            broker = LocalKafka(work_dir / "kafka")
            bootstrap = broker.start(timeout_s=120)
        try:
            report = asyncio.run(profile_service(args, bootstrap, work_dir))
        finally:
            if broker is not None:
                broker.stop()
    report = f"Command: python {' '.join(sys.argv)}\n\n{report}"
    print(report)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(report + "\n")
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
