"""In-process throughput of decode -> step -> encode, against the naive per-event window forward.

Model: the seed LSTM with 8 features, hidden 64, 2 layers, 1 output. One torch thread. Stateful semantics
at several batch sizes, the naive approach (the seed Net over the entity's last 30 events from zero state,
once per event, batch 1) in the same run, and resident memory for 1,000,000 entities in a child process.

Usage: python benchmarks/engine_throughput.py [--events N] [--entities N] [--memory-entities N]
"""

from __future__ import annotations

import argparse
import collections
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orjson
import torch

from streamer.engine import Engine
from streamer.engine.gc_pause import scheduled_collection
from streamer.io.events import EventDecoder, EventFormat
from streamer.io.outputs import encode_outputs, topic_source
from streamer.model import RecurrentModel, SeedNet, parse_state_dict

INPUT, HIDDEN, LAYERS, OUTPUT, WINDOW = 8, 64, 2, 1, 30
RESULTS = Path(__file__).parent / "results" / "engine_throughput.json"


def make_values(n_events: int, n_entities: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    entities = rng.integers(0, n_entities, n_events)
    features = rng.normal(size=(n_events, INPUT)).round(5).tolist()
    return [orjson.dumps({"entity": f"s-{entities[i]}", "ts": 1_733_000_000_000 + i, "features": features[i]})
            for i in range(n_events)]


def run_streamer(model: RecurrentModel, values: list[bytes], batch_size: int) -> float:
    engine = Engine(model)
    decoder = EventDecoder(EventFormat(input_size=INPUT))
    keys = [None] * batch_size
    produced = 0
    # The collector runs as in the file backtest and the service: once a second, between batches.
    with scheduled_collection() as collector:
        started = time.perf_counter()
        for start in range(0, len(values), batch_size):
            chunk = values[start:start + batch_size]
            batch, _ = decoder.decode(keys[:len(chunk)], chunk, None, np.arange(start, start + len(chunk)))
            result = engine.process(batch)
            produced += len(encode_outputs(batch, result, model.fingerprint,
                                           topic_source(["events"] * len(chunk), batch)))
            collector.maybe_collect()
        elapsed = time.perf_counter() - started
    if produced != len(values):
        raise RuntimeError(f"expected {len(values)} outputs, got {produced}")
    return len(values) / elapsed


def run_naive(net: SeedNet, values: list[bytes]) -> float:
    """Measure the seed's serving call: per event, decode, re-run the last 30 events from zero state, encode."""
    history: dict[str, collections.deque] = collections.defaultdict(lambda: collections.deque(maxlen=WINDOW))
    # The same collector schedule as streamer's loop, so the ratio compares the processing only.
    with scheduled_collection() as collector, torch.inference_mode():
        started = time.perf_counter()
        for index, value in enumerate(values):
            event = orjson.loads(value)
            window = history[event["entity"]]
            window.append(event["features"])
            prediction = net(torch.tensor([list(window)], dtype=torch.float32))[0].tolist()
            orjson.dumps({"entity": event["entity"], "ts": event["ts"], "prediction": prediction})
            if index % 64 == 0:
                collector.maybe_collect()
        return len(values) / (time.perf_counter() - started)


def measure_memory(n_entities: int) -> dict:
    """Run in a child process: RSS growth from creating ``n_entities`` states in the arena."""
    code = f"""
import resource, json, numpy as np, torch
from streamer.state import StateArena
def rss(): return int(open('/proc/self/statm').read().split()[1]) * resource.getpagesize()
names = [f"s-{{i}}" for i in range({n_entities})]
before = rss()
arena = StateArena({{"h": ({LAYERS}, {HIDDEN}), "c": ({LAYERS}, {HIDDEN})}})
for start in range(0, {n_entities}, 65536):
    arena.assign(names[start:start + 65536])
after = rss()
print(json.dumps({{"rss_growth_bytes": after - before, "arena_bytes": arena.nbytes(), "entities": len(arena)}}))
"""
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    result = json.loads(out)
    raw = n_entities * 2 * LAYERS * HIDDEN * 4
    result["raw_h_c_bytes"] = raw
    result["arena_over_raw"] = result["arena_bytes"] / raw
    result["rss_over_raw"] = result["rss_growth_bytes"] / raw
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--entities", type=int, default=10_000)
    parser.add_argument("--naive-events", type=int, default=3_000)
    parser.add_argument("--memory-entities", type=int, default=1_000_000)
    parser.add_argument("--batch-sizes", default="1,16,64,256,1024,4096")
    args = parser.parse_args()

    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = SeedNet(INPUT, HIDDEN, WINDOW, OUTPUT, LAYERS).eval()
    manifest, weights = parse_state_dict(net.state_dict())
    model = RecurrentModel(manifest, weights)
    values = make_values(args.events, args.entities)

    naive = run_naive(net, values[: args.naive_events])
    rows = []
    for batch_size in [int(size) for size in args.batch_sizes.split(",")]:
        count = min(len(values), max(20_000, batch_size * 50)) if batch_size < 64 else len(values)
        rate = run_streamer(model, values[:count], batch_size)
        rows.append({"batch_size": batch_size, "events": count, "events_per_s": round(rate),
                     "ratio_to_naive": round(rate / naive, 1)})
        print(f"batch {batch_size:>5}: {rate:>10,.0f} events/s  ({rate / naive:,.1f}x naive)", flush=True)
    print(f"naive (window {WINDOW}, batch 1): {naive:,.0f} events/s")
    memory = measure_memory(args.memory_entities)
    print(f"memory for {args.memory_entities:,} entities: arena {memory['arena_over_raw']:.3f}x raw h+c, "
          f"RSS growth {memory['rss_over_raw']:.3f}x raw ({memory['rss_growth_bytes'] / 2**20:,.0f} MiB)")
    report = {
        "machine": {"cpu": _cpu_name(), "cores": __import__("os").cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__, "torch_threads": torch.get_num_threads()},
        "command": "python " + " ".join(sys.argv),
        "model": {"input": INPUT, "hidden": HIDDEN, "layers": LAYERS, "output": OUTPUT},
        "naive_events_per_s": round(naive),
        "streamer": rows,
        "memory": memory,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {RESULTS}")


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


if __name__ == "__main__":
    main()
