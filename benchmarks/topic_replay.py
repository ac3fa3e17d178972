"""Replay throughput of `streamer backtest --topic` through a local Apache Kafka broker.

Pre-produces synthetic events (``streamer.data.synthetic.iter_event_batches``, 8 features, keyed by entity)
to a new topic, then replays the whole topic to a JSON Lines file with the seed LSTM (8 inputs, hidden 64,
2 layers, 1 output, ``torch.manual_seed(0)``) on one torch thread. For comparison, the same events also go
through decode -> step -> encode in process, with no broker and no file.

The replay rate is events over the time of the replay loop: fetching, decoding, the engine, encoding and
writing the file. It leaves out connecting and resolving the range, which the "with setup" rate includes.

Usage: python benchmarks/topic_replay.py [--quick] [--events N] [--entities N] [--partitions N]
       [--batch-size N] [--bootstrap-servers HOST:PORT] [--profile PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import platform
import pstats
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import torch
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from streamer.backtest.topic_replay import TopicReplaySpec, run_topic_backtest
from streamer.data.synthetic import iter_event_batches
from streamer.engine import Engine
from streamer.engine.gc_pause import scheduled_collection
from streamer.io.events import EventDecoder, EventFormat
from streamer.io.outputs import encode_outputs, topic_source
from streamer.kafka.local_broker import LocalKafka
from streamer.kafka.producer import KeyPartitioner, send_records
from streamer.model import RecurrentModel, SeedNet, parse_state_dict

INPUT, HIDDEN, LAYERS, OUTPUT, WINDOW = 8, 64, 2, 1, 30
RESULTS = Path(__file__).parent / "results" / "topic_replay.json"
TARGET_EVENTS_PER_S = 150_000


def make_model() -> RecurrentModel:
    torch.manual_seed(0)
    net = SeedNet(INPUT, HIDDEN, WINDOW, OUTPUT, LAYERS).eval()
    manifest, weights = parse_state_dict(net.state_dict())
    return RecurrentModel(manifest, weights)


def make_events(n_events: int, n_entities: int) -> list[bytes]:
    return [value for batch in iter_event_batches(n_events, n_entities, INPUT, seed=0) for value in batch]


def entity_keys(values: list[bytes]) -> list[bytes]:
    # Synthetic events start with {"entity":"e-17", so the key is the text between the 11th byte and a quote.
    return [value[11:value.index(b'"', 11)] for value in values]


async def produce_topic(bootstrap: str, topic: str, partitions: int, values: list[bytes]) -> float:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, partitions, 1)])
    finally:
        await admin.close()
    partitioner = KeyPartitioner(partitions)
    keys = entity_keys(values)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5, max_batch_size=1 << 20,
                                compression_type=None)
    await producer.start()
    started = time.perf_counter()
    try:
        for start in range(0, len(values), 50_000):
            records = [(partitioner(key), key, value) for key, value in
                       zip(keys[start:start + 50_000], values[start:start + 50_000])]
            await asyncio.gather(*await send_records(producer, topic, records))
    finally:
        await producer.stop()
    return time.perf_counter() - started


def run_in_process(model: RecurrentModel, values: list[bytes], batch_size: int) -> float:
    """Events/s of decode -> step -> encode over the same events, with no broker and no file."""
    engine = Engine(model)
    decoder = EventDecoder(EventFormat(input_size=INPUT))
    keys = entity_keys(values)
    # The collector runs as in the replay: once a second, between batches.
    with scheduled_collection() as collector:
        started = time.perf_counter()
        for start in range(0, len(values), batch_size):
            chunk = values[start:start + batch_size]
            batch, _ = decoder.decode(keys[start:start + batch_size], chunk, None,
                                      np.arange(start, start + len(chunk)))
            result = engine.process(batch)
            encode_outputs(batch, result, model.fingerprint, topic_source(["events"] * len(chunk), batch))
            collector.maybe_collect()
        return len(values) / (time.perf_counter() - started)


def profile_replay(model: RecurrentModel, bootstrap: str, topic: str, output: Path, batch_size: int,
                   report_path: Path) -> None:
    """Replay the topic under cProfile and write the 30 functions with the most time of their own."""
    profiler = cProfile.Profile()
    profiler.enable()
    result = run_topic_backtest(model, TopicReplaySpec(bootstrap, (topic,)), output_path=output,
                                batch_size=batch_size, progress=False)
    profiler.disable()
    text = io.StringIO()
    text.write(f"Replay of {result.events:,} events under cProfile: {result.elapsed_s:.2f} s\n\n")
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(30)
    report_path.write_text(text.getvalue())
    print(f"wrote {report_path}")


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="100,000 events, one replay (under a minute)")
    parser.add_argument("--events", type=int, default=None, help="events to produce (default 500,000)")
    parser.add_argument("--entities", type=int, default=10_000)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=None,
                        help="records per partition per engine batch "
                             "(default: 4,096 per round split over the partitions)")
    parser.add_argument("--repeats", type=int, default=None, help="replays of the topic (default 3, quick 1)")
    parser.add_argument("--bootstrap-servers", default=None, help="use this broker instead of starting one")
    parser.add_argument("--profile", type=Path, default=None,
                        help="also replay once more under cProfile and write the top functions to this file")
    args = parser.parse_args()
    n_events = args.events or (100_000 if args.quick else 500_000)
    repeats = args.repeats or (1 if args.quick else 3)
    torch.set_num_threads(1)
    model = make_model()
    values = make_events(n_events, args.entities)

    with tempfile.TemporaryDirectory(prefix="streamer-bench-") as work:
        broker = None
        bootstrap = args.bootstrap_servers
        if bootstrap is None:
            broker = LocalKafka(Path(work) / "broker")
            bootstrap = broker.start(timeout_s=180)
        try:
            topic = f"bench-replay-{uuid.uuid4().hex[:8]}"
            produce_s = asyncio.run(produce_topic(bootstrap, topic, args.partitions, values))
            replays = []
            for repeat in range(repeats):
                output = Path(work) / f"replay-{repeat}.jsonl"
                started = time.perf_counter()
                result = run_topic_backtest(model, TopicReplaySpec(bootstrap, (topic,)), output_path=output,
                                            batch_size=args.batch_size, progress=False)
                wall_s = time.perf_counter() - started
                if result.outputs != n_events:
                    raise RuntimeError(f"expected {n_events} outputs, got {result.outputs}")
                replays.append({"events_per_s": round(result.events_per_s), "elapsed_s": round(result.elapsed_s, 2),
                                "with_setup_events_per_s": round(n_events / wall_s)})
            if args.profile is not None:
                profile_replay(model, bootstrap, topic, Path(work) / "replay-profiled.jsonl", args.batch_size,
                               args.profile)
        finally:
            if broker is not None:
                broker.stop()
    batch_size = result.batch_size
    in_process = run_in_process(model, values, batch_size * args.partitions)

    best = max(replays, key=lambda r: r["events_per_s"])
    report = {
        "machine": machine(),
        "command": "python " + " ".join([sys.argv[0], *sys.argv[1:]]),
        "model": {"input": INPUT, "hidden": HIDDEN, "layers": LAYERS, "output": OUTPUT},
        "events": n_events, "entities": args.entities, "partitions": args.partitions,
        "batch_size_per_partition": batch_size,
        "produce_events_per_s": round(n_events / produce_s),
        "replays": replays,
        "best_replay_events_per_s": best["events_per_s"],
        "in_process_events_per_s": round(in_process),
        "target_events_per_s": TARGET_EVENTS_PER_S,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=1) + "\n")

    print(f"{'run':<28}{'events/s':>12}{'seconds':>10}")
    for index, replay in enumerate(replays, start=1):
        print(f"{f'replay {index} (loop)':<28}{replay['events_per_s']:>12,}{replay['elapsed_s']:>10.2f}")
        print(f"{f'replay {index} (with setup)':<28}{replay['with_setup_events_per_s']:>12,}")
    print(f"{'in process, no broker':<28}{round(in_process):>12,}")
    print(f"{'produce (setup only)':<28}{round(n_events / produce_s):>12,}")
    verdict = "meets" if best["events_per_s"] >= TARGET_EVENTS_PER_S else "is below"
    print(f"best replay {best['events_per_s']:,} events/s {verdict} the target of {TARGET_EVENTS_PER_S:,} events/s")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
