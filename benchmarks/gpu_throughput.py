"""GPU throughput of the engine step for 1,000,000 entities at batch sizes up to 65,536.

Runs only where ``torch.cuda.is_available()``; elsewhere it prints that no GPU exists and exits with 2.
The model is the seed LSTM (8 features, hidden 64, 2 layers, 1 output). Events are pre-decoded arrays, so
this measures gather -> step -> scatter -> head on the device, the part a GPU changes. Sized to finish in
under 5 minutes on one GPU.

Usage: python benchmarks/gpu_throughput.py [--entities N] [--batch-sizes 1024,8192,65536]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from streamer.engine import Engine, EventBatch
from streamer.model import RecurrentModel, SeedNet, parse_state_dict

RESULTS = Path(__file__).parent / "results" / "gpu_throughput.json"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entities", type=int, default=1_000_000)
    parser.add_argument("--batch-sizes", default="1024,8192,32768,65536")
    parser.add_argument("--batches", type=int, default=30)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("No CUDA device on this machine; nothing measured.")
        return 2
    torch.manual_seed(0)
    net = SeedNet(8, 64, 30, 1, 2).eval()
    model = RecurrentModel(*parse_state_dict(net.state_dict()), device="cuda")
    engine = Engine(model, page_slots=1 << 20)
    names = [f"s-{i}" for i in range(args.entities)]
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    for start in range(0, args.entities, 65536):  # create every entity's state once
        chunk = names[start:start + 65536]
        engine.process(EventBatch.build(chunk, rng.normal(size=(len(chunk), 8)), offsets=np.zeros(len(chunk))))
    print(f"created {args.entities:,} entities in {time.perf_counter() - started:.1f} s")
    rows = []
    offset = 1
    for batch_size in [int(size) for size in args.batch_sizes.split(",")]:
        batches = []
        for _ in range(args.batches):
            picks = rng.integers(0, args.entities, batch_size)
            batches.append(EventBatch.build([names[i] for i in picks], rng.normal(size=(batch_size, 8)),
                                            offsets=np.arange(offset, offset + batch_size)))
            offset += batch_size
        torch.cuda.synchronize()
        started = time.perf_counter()
        for batch in batches:
            engine.process(batch)
        torch.cuda.synchronize()
        rate = batch_size * len(batches) / (time.perf_counter() - started)
        rows.append({"batch_size": batch_size, "events_per_s": round(rate)})
        print(f"batch {batch_size:>6}: {rate:>12,.0f} events/s")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"device": torch.cuda.get_device_name(0), "entities": args.entities,
                                   "command": "python " + " ".join(sys.argv), "results": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
