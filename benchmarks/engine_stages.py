"""Time per event of each stage of the in-process pipeline: decode, engine step, encode.

Same model and events as ``engine_throughput.py``. The engine stage is also split into the model step alone
(``RecurrentModel.step`` on batches of the same size, from random states) and the rest (slot assignment,
wave planning, state gather and scatter, metadata). The collector is scheduled as in the file backtest.

Usage: python benchmarks/engine_stages.py [--events N] [--entities N] [--batch-size N]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from engine_throughput import HIDDEN, INPUT, LAYERS, OUTPUT, WINDOW, make_values
from streamer.engine import Engine
from streamer.engine.gc_pause import scheduled_collection
from streamer.io.events import EventDecoder, EventFormat
from streamer.io.outputs import encode_outputs, topic_source
from streamer.model import RecurrentModel, SeedNet, parse_state_dict


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--entities", type=int, default=10_000)
    parser.add_argument("--batch-size", type=int, default=1024)
    args = parser.parse_args()

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = RecurrentModel(*parse_state_dict(SeedNet(INPUT, HIDDEN, WINDOW, OUTPUT, LAYERS).eval().state_dict()))
    values = make_values(args.events, args.entities)
    decoder = EventDecoder(EventFormat(input_size=INPUT))
    engine = Engine(model)
    seconds = {"decode": 0.0, "engine": 0.0, "encode": 0.0}
    size = args.batch_size
    with scheduled_collection() as collector:
        for start in range(0, len(values), size):
            chunk = values[start:start + size]
            began = time.perf_counter()
            batch, _ = decoder.decode([None] * len(chunk), chunk, None, np.arange(start, start + len(chunk)))
            decoded = time.perf_counter()
            result = engine.process(batch)
            stepped = time.perf_counter()
            encode_outputs(batch, result, model.fingerprint, topic_source(["events"] * len(chunk), batch))
            encoded = time.perf_counter()
            seconds["decode"] += decoded - began
            seconds["engine"] += stepped - decoded
            seconds["encode"] += encoded - stepped
            collector.maybe_collect()

        x = torch.randn(size, INPUT)
        state = tuple(torch.randn(size, LAYERS, HIDDEN) for _ in model.state_names)
        repeats = max(1, len(values) // size)
        with torch.inference_mode():
            began = time.perf_counter()
            for _ in range(repeats):
                model.step(x, state)
            step_s = (time.perf_counter() - began) / (repeats * size) * len(values)

    per_event = {name: value / len(values) * 1e6 for name, value in seconds.items()}
    step_us = step_s / len(values) * 1e6
    print(f"batch {size}, {len(values):,} events over {args.entities:,} entities, µs per event:")
    print(f"  decode       {per_event['decode']:6.2f}")
    print(f"  engine       {per_event['engine']:6.2f}  (model step alone {step_us:.2f}, "
          f"the rest {per_event['engine'] - step_us:.2f})")
    print(f"  encode       {per_event['encode']:6.2f}")
    total = sum(per_event.values())
    print(f"  total        {total:6.2f}  ({1e6 / total:,.0f} events/s)")


if __name__ == "__main__":
    main()
