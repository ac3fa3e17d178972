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
