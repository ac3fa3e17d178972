"""Keeping long-lived objects out of full collections during a run."""

from __future__ import annotations

import gc

from streamer.engine.gc_pause import long_lived_frozen, paused_gc


def test_long_lived_frozen_freezes_then_releases():
    gc.unfreeze()
    kept = [[index] for index in range(1000)]

    with long_lived_frozen():
        frozen = gc.get_freeze_count()

    assert frozen >= len(kept)
    assert gc.get_freeze_count() == 0


def test_paused_gc_restores_the_previous_state():
    assert gc.isenabled()
    with paused_gc():
        assert not gc.isenabled()
    assert gc.isenabled()
