"""Batch planning: split a batch into waves so that each entity appears at most once per wave."""

from __future__ import annotations

import numpy as np

# Batches up to this size are checked for distinct entities with a set before sorting.
SET_CHECK_MAX_EVENTS = 256


def plan_waves(slots: np.ndarray) -> list[np.ndarray]:
    """Return the event positions of each wave, in order.

    Wave k contains every entity's k-th event of the batch, so the events of one entity are applied in arrival
    order while all entities of a wave advance in one model call. Positions inside a wave are ascending.
    """
    n = slots.size
    if n == 0:
        return []
    # A small batch of distinct entities, the common case, is one wave. A set finds that faster than sorting.
    if n <= SET_CHECK_MAX_EVENTS and len(set(slots.tolist())) == n:
        return [np.arange(n)]
    order = np.argsort(slots, kind="stable")
    sorted_slots = slots[order]
    starts = np.empty(n, bool)
    starts[0] = True
    np.not_equal(sorted_slots[1:], sorted_slots[:-1], out=starts[1:])
    if starts.all():
        return [np.arange(n)]
    positions = np.arange(n)
    group_start = np.maximum.accumulate(np.where(starts, positions, 0))
    rank = np.empty(n, np.int64)
    rank[order] = positions - group_start
    by_rank = np.argsort(rank, kind="stable")
    bounds = np.cumsum(np.bincount(rank))[:-1]
    return np.split(by_rank, bounds)
