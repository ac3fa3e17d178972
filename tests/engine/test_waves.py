import numpy as np

from streamer.engine import plan_waves


def test_distinct_slots_form_one_wave():
    waves = plan_waves(np.array([4, 1, 9]))
    assert [wave.tolist() for wave in waves] == [[0, 1, 2]]


def test_repeated_slots_split_in_arrival_order():
    waves = plan_waves(np.array([5, 5, 2, 5, 2, 7]))
    assert [wave.tolist() for wave in waves] == [[0, 2, 5], [1, 4], [3]]


def test_each_entity_once_per_wave():
    slots = np.random.default_rng(0).integers(0, 20, 1000)
    waves = plan_waves(slots)
    assert sum(wave.size for wave in waves) == 1000
    for wave in waves:
        assert np.unique(slots[wave]).size == wave.size
    assert len(waves) == np.bincount(slots).max()


def test_empty_batch_has_no_waves():
    assert plan_waves(np.zeros(0, np.int64)) == []


def reference_waves(slots: np.ndarray) -> list[list[int]]:
    """Return the waves by counting events per slot in arrival order: wave k contains each entity's k-th event."""
    seen: dict[int, int] = {}
    waves: list[list[int]] = []
    for position, slot in enumerate(slots.tolist()):
        rank = seen.get(slot, 0)
        seen[slot] = rank + 1
        if rank == len(waves):
            waves.append([])
        waves[rank].append(position)
    return waves


def test_matches_reference_around_set_check_bound():
    rng = np.random.default_rng(1)
    # Sizes on both sides of the bound, with distinct slots and with repeats.
    for size in (1, 2, 255, 256, 257, 600):
        for distinct in (True, False):
            slots = rng.permutation(10 * size)[:size] if distinct else rng.integers(0, max(1, size // 3), size)

            waves = plan_waves(slots)

            assert [wave.tolist() for wave in waves] == reference_waves(slots)
