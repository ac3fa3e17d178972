"""Compare the two ways the state arena reads and writes rows, in one process: numpy views or tensor indexing.

On the CPU the arena gathers and scatters rows through numpy views of its pages. The tensor path
(``index_select`` and ``index_copy_``) is the one a GPU arena takes. Two engines get the same entities and
the same batches (entities drawn with repeats, so batches have several waves), one of them switched to the
tensor path, and ``Engine.process`` is timed in six rounds that alternate which engine goes first. Same
model as ``engine_throughput.py``.

Usage: python benchmarks/state_rows.py [--entities N] [--batch-sizes 20,1024,4096]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from engine_throughput import HIDDEN, INPUT, LAYERS, OUTPUT, WINDOW
from streamer.engine import Engine, EventBatch
from streamer.model import RecurrentModel, SeedNet, parse_state_dict

ROUNDS = 6
EVENTS_PER_ROUND = 100_000


def time_paths(model: RecurrentModel, entities: int, batch_size: int) -> dict[str, list[float]]:
    """Return the mean µs per ``Engine.process`` call of each path, one value per round."""
    rng = np.random.default_rng(0)
    names = [f"e{i}" for i in range(entities)]
    engines = {}
    for path in ("numpy", "tensor"):
        engine = Engine(model)
        engine.process(EventBatch.build(names, rng.standard_normal((entities, INPUT)),
                                        offsets=np.zeros(entities, np.int64)))
        # The arena picks the numpy path for host memory, so one engine is switched to the device path here.
        engine.arena._host = path == "numpy"
        engines[path] = engine
    per_round = max(1, EVENTS_PER_ROUND // batch_size)
    offset = 1
    batches = []
    for _ in range(ROUNDS * per_round):
        chosen = rng.integers(0, entities, batch_size)
        batches.append(EventBatch.build([names[i] for i in chosen], rng.standard_normal((batch_size, INPUT)),
                                        offsets=np.arange(offset, offset + batch_size)))
        offset += batch_size
    results: dict[str, list[float]] = {"numpy": [], "tensor": []}
    for round_index in range(ROUNDS):
        order = ("numpy", "tensor") if round_index % 2 == 0 else ("tensor", "numpy")
        for path in order:
            started = time.perf_counter()
            for batch in batches[round_index * per_round:(round_index + 1) * per_round]:
                engines[path].process(batch)
            results[path].append((time.perf_counter() - started) / per_round * 1e6)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entities", type=int, default=10_000)
    parser.add_argument("--batch-sizes", default="20,1024,4096")
    args = parser.parse_args()

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = RecurrentModel(*parse_state_dict(SeedNet(INPUT, HIDDEN, WINDOW, OUTPUT, LAYERS).eval().state_dict()))
    print(f"Engine.process, {args.entities:,} entities, µs per batch in each of {ROUNDS} rounds")
    for batch_size in (int(size) for size in args.batch_sizes.split(",")):
        results = time_paths(model, args.entities, batch_size)
        ratio = statistics.median(results["numpy"]) / statistics.median(results["tensor"])
        print(f"batch {batch_size:5d}: numpy rows {[round(value) for value in results['numpy']]}, "
              f"tensor rows {[round(value) for value in results['tensor']]}, median ratio {ratio:.3f}")


if __name__ == "__main__":
    main()
