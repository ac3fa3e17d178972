"""Time per event of each stage of the in-process pipeline: decode, engine step, encode.

Same model and events as ``engine_throughput.py``. The engine stage is also split into the model step alone
(``RecurrentModel.step`` on batches of the same size, from random states) and the rest (slot assignment,
wave planning, state gather and scatter, metadata). The collector is scheduled as in the file backtest.

The last line, the floor, times only three calls on the same data: ``orjson.loads`` of every record, one
``orjson.dumps`` of each batch's output documents, and the model step. Everything else the pipeline does
(checks, columns, slots, state rows, output documents) adds to it.

Usage: python benchmarks/engine_stages.py [--events N] [--entities N] [--batch-size N]
"""

from __future__ import annotations

import argparse
import time

import orjson

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
    documents: list[list[dict]] = []
    size = args.batch_size
    with scheduled_collection() as collector:
        for start in range(0, len(values), size):
            chunk = values[start:start + size]
            began = time.perf_counter()
            batch, _ = decoder.decode([None] * len(chunk), chunk, None, np.arange(start, start + len(chunk)))
            decoded = time.perf_counter()
            result = engine.process(batch)
            stepped = time.perf_counter()
            outputs = encode_outputs(batch, result, model.fingerprint, topic_source(["events"] * len(chunk), batch))
            encoded = time.perf_counter()
            documents.append([orjson.loads(value) for _, _, value in outputs])
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

        chunks = [values[start:start + size] for start in range(0, len(values), size)]
        loads_s = _best_of(3, lambda: _each(chunks, lambda chunk: [orjson.loads(value) for value in chunk]))
        dumps_s = _best_of(3, lambda: _each(documents, orjson.dumps))

    per_event = {name: value / len(values) * 1e6 for name, value in seconds.items()}
    step_us = step_s / len(values) * 1e6
    print(f"batch {size}, {len(values):,} events over {args.entities:,} entities, µs per event:")
    print(f"  decode       {per_event['decode']:6.2f}")
    print(f"  engine       {per_event['engine']:6.2f}  (model step alone {step_us:.2f}, "
          f"the rest {per_event['engine'] - step_us:.2f})")
    print(f"  encode       {per_event['encode']:6.2f}")
    total = sum(per_event.values())
    print(f"  total        {total:6.2f}  ({1e6 / total:,.0f} events/s)")
    loads_us, dumps_us = loads_s / len(values) * 1e6, dumps_s / len(values) * 1e6
    floor = loads_us + dumps_us + step_us
    print(f"  floor        {floor:6.2f}  ({1e6 / floor:,.0f} events/s: orjson.loads per record {loads_us:.2f}, "
          f"orjson.dumps per batch {dumps_us:.2f}, model step {step_us:.2f})")


def _each(batches: list, work) -> None:
    """Call ``work`` on every batch, keeping no result, as the pipeline does."""
    for batch in batches:
        work(batch)


def _best_of(repeats: int, work) -> float:
    """Return the shortest wall time of ``repeats`` runs of ``work()``, in seconds."""
    best = float("inf")
    for _ in range(repeats):
        began = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - began)
    return best


if __name__ == "__main__":
    main()
