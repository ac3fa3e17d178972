"""Pausing the cyclic garbage collector while a batch allocates many short-lived containers."""

from __future__ import annotations

import gc
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def paused_gc() -> Iterator[None]:
    """Disable the cyclic collector inside the block and restore its previous state afterwards.

    Decoding or encoding a batch creates thousands of dicts and lists that reference counting frees. With
    the collector on, those allocations trigger repeated young-generation scans, which cost about as much
    as the JSON parsing itself in ``benchmarks/engine_throughput.py``. Collection still happens after the
    block, because the allocation counters keep counting while the collector is disabled.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()



@contextmanager
def long_lived_frozen() -> Iterator[None]:
    """Collect garbage, then keep every object alive now out of the cyclic collector's reach inside the block.

    Imported modules, the model and the clients live as long as a run. Without this, every full collection
    traverses them: about 100 ms per collection in the Kafka service on the benchmark machine, which stalls
    the event loop and costs throughput. Objects created inside the block are collected as usual, and the
    frozen ones return to the collector at the end.
    """
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
