"""Pausing the cyclic garbage collector while a batch allocates many short-lived containers."""

from __future__ import annotations

import gc
import time
from contextlib import contextmanager
from typing import Callable, Iterator


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


class ScheduledCollector:
    """A schedule for the cyclic collector: ``maybe_collect`` runs a full collection once ``interval_s`` has passed.

    ``on_pause`` receives the duration of each collection in seconds, for a metric.
    """

    def __init__(self, interval_s: float, on_pause: Callable[[float], None] | None = None) -> None:
        self.interval_s = interval_s
        self.on_pause = on_pause
        self._last = time.monotonic()

    def maybe_collect(self) -> None:
        now = time.monotonic()
        if now - self._last >= self.interval_s:
            gc.collect()
            self._last = time.monotonic()
            if self.on_pause is not None:
                self.on_pause(self._last - now)


@contextmanager
def scheduled_collection(interval_s: float = 1.0, on_pause: Callable[[float], None] | None = None
                         ) -> Iterator[ScheduledCollector]:
    """Take the cyclic collector off automatic triggering inside the block and let the caller schedule it.

    On entry, the young generations are collected and every object alive then (imported modules, the model,
    the clients) is frozen, so later collections do not traverse it. Without this, a full collection in the
    Kafka service took about 100 ms on the benchmark machine and could land in the middle of any batch. The
    old generation is frozen without a collection: collecting it costs about 90 ms once torch is imported,
    and any garbage in it is only kept until the block ends. Inside the block the caller runs
    ``maybe_collect`` between batches, and reference counting frees everything that is not in a cycle as
    before. On exit the frozen objects return to the collector and its previous state is restored.
    """
    gc.collect(1)
    gc.freeze()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield ScheduledCollector(interval_s, on_pause)
    finally:
        gc.unfreeze()
        if was_enabled:
            gc.enable()
