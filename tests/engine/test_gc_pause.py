"""Keeping long-lived objects out of full collections during a run."""

from __future__ import annotations

import gc
import weakref

from streamer.engine.gc_pause import paused_gc, scheduled_collection


def test_scheduled_collection_freezes_then_releases():
    gc.unfreeze()
    alive_before = [[index] for index in range(1000)]

    with scheduled_collection(interval_s=0.0) as collector:
        frozen = gc.get_freeze_count()
        enabled_inside = gc.isenabled()
        cycle: list = []
        cycle.append(cycle)
        reference = weakref.ref(_Node(cycle))
        collector.maybe_collect()
        collected_inside = reference() is None

    assert frozen >= len(alive_before)
    assert not enabled_inside
    assert collected_inside
    assert gc.get_freeze_count() == 0
    assert gc.isenabled()


class _Node:
    """An object in a reference cycle, which only the cyclic collector frees."""

    def __init__(self, payload: list) -> None:
        self.payload = payload
        self.me = self


def test_paused_gc_restores_the_previous_state():
    assert gc.isenabled()
    with paused_gc():
        assert not gc.isenabled()
    assert gc.isenabled()


def test_scheduled_collection_reports_each_pause():
    pauses: list[float] = []
    with scheduled_collection(interval_s=0.0, on_pause=pauses.append) as collector:
        collector.maybe_collect()
        collector.maybe_collect()
    assert len(pauses) == 2
    assert all(0.0 <= pause < 5.0 for pause in pauses)


def test_scheduled_collection_waits_for_the_interval():
    pauses: list[float] = []
    with scheduled_collection(interval_s=3600.0, on_pause=pauses.append) as collector:
        collector.maybe_collect()
    assert pauses == []
