import numpy as np
import pytest
import torch

from streamer.engine import Engine, EventBatch
from streamer.errors import StateError
from streamer.model import load_model
from streamer.state import NO_OFFSET, StateArena


def make_arena(**options) -> StateArena:
    return StateArena({"h": (2, 3), "c": (2, 3)}, page_slots=4, **options)


def test_new_entities_get_zeroed_distinct_slots():
    arena = make_arena()
    slots = arena.assign(["a", "b", "a", "c"])
    assert slots[0] == slots[2]
    assert len(set(slots.tolist())) == 3
    assert len(arena) == 3
    assert torch.count_nonzero(arena.gather("h", slots)) == 0
    assert (arena.last_offset[slots] == NO_OFFSET).all()


def test_growth_adds_pages_and_keeps_rows():
    arena = make_arena()
    first = arena.assign([f"e{i}" for i in range(3)])
    arena.scatter("h", first, torch.arange(18, dtype=torch.float32).reshape(3, 2, 3))
    pages_before = arena.allocated_slots
    more = arena.assign([f"e{i}" for i in range(3, 50)])
    assert arena.allocated_slots > pages_before
    assert arena.allocated_slots == 52  # 13 pages of 4 slots for 50 entities
    assert torch.equal(arena.gather("h", first), torch.arange(18, dtype=torch.float32).reshape(3, 2, 3))
    values = torch.randn(more.size, 2, 3)
    arena.scatter("h", more, values)
    assert torch.equal(arena.gather("h", more), values)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_host_rows_match_tensor_rows(dtype):
    """Check that rows read and written through numpy equal those of the tensor path.

    bfloat16 has no numpy dtype, so an arena of it takes the tensor path (the one used on a GPU) on the CPU.
    """
    host = make_arena(dtype=dtype)
    tensor_path = make_arena(dtype=torch.bfloat16)
    assert host._host and not tensor_path._host
    rng = np.random.default_rng(3)
    entities = [f"e{i}" for i in range(23)]
    for step in range(6):
        chosen = [entities[i] for i in rng.choice(len(entities), 9, replace=False)]
        slots = host.assign(chosen)
        assert np.array_equal(slots, tensor_path.assign(chosen))
        assert torch.equal(host.gather("h", slots).to(torch.bfloat16), tensor_path.gather("h", slots))
        # The values are exact in bfloat16, so both paths store the same numbers.
        values = torch.from_numpy(rng.integers(-8, 8, (slots.size, 2, 3))).to(torch.float32) / 4
        host.scatter("h", slots, values)
        tensor_path.scatter("h", slots, values)
        assert host.gather("h", slots).dtype == dtype
        assert torch.equal(host.gather("h", slots), values.to(dtype))
        if step == 3:
            host.remove_entities(chosen[:4])
            tensor_path.remove_entities(chosen[:4])
    occupied = host.occupied_slots()
    assert np.array_equal(occupied, tensor_path.occupied_slots())
    assert len(host._pages) > 1  # the slots span several pages
    assert torch.equal(host.gather("h", occupied).to(torch.bfloat16), tensor_path.gather("h", occupied))
    assert torch.equal(host.gather("c", occupied).to(torch.bfloat16), tensor_path.gather("c", occupied))


def test_capacity_evicts_least_recently_used():
    arena = make_arena(capacity=100)
    arena.assign([f"old{i}" for i in range(50)])
    arena.assign([f"new{i}" for i in range(50)])
    arena.assign([f"old{i}" for i in range(25, 50)])  # touch the newer half of the old entities again
    arena.assign(["extra"])
    assert len(arena) <= 100
    assert arena.evictions == 1
    removed = arena.drain_removed()
    assert [r.reason for r in removed] == ["evicted"]
    assert removed[0].entity.startswith("old")
    assert int(removed[0].entity[3:]) < 25
    assert "extra" in arena


def test_capacity_smaller_than_batch_raises():
    arena = make_arena(capacity=2)
    with pytest.raises(StateError, match="capacity 2"):
        arena.assign(["a", "b", "c"])


def test_batch_wider_than_capacity_split(seed_net_factory):
    _, path = seed_net_factory()
    model = load_model(path)
    entities = ["a", "b", "a", "c", "d", "b", "e", "f", "a", "g"]
    features = np.random.default_rng(3).normal(size=(len(entities), 4)).astype(np.float32)
    bounded = Engine(model, capacity=3)
    result = bounded.process(EventBatch.build(entities, features))
    # Parts of at most three distinct entities: a b a c | d b e | f a g
    expected = Engine(model, capacity=3)
    parts = [expected.process(EventBatch.build(entities[start:stop], features[start:stop],
                                               offsets=np.arange(start, stop)))
             for start, stop in ((0, 4), (4, 7), (7, 10))]
    assert result.applied.all()
    assert result.steps.tolist() == np.concatenate([part.steps for part in parts]).tolist()
    assert result.steps[:4].tolist() == [1, 1, 2, 1]
    assert np.array_equal(result.predictions, np.concatenate([part.predictions for part in parts]))
    assert len(bounded.arena) <= 3
    assert bounded.arena.evictions == expected.arena.evictions > 0


def test_evicted_slot_reused_from_zero():
    arena = make_arena(capacity=1)
    slot = arena.assign(["a"])
    arena.scatter("h", slot, torch.ones(1, 2, 3))
    arena.steps[slot] = 7
    reused = arena.assign(["b"])
    assert reused[0] == slot[0]
    assert torch.count_nonzero(arena.gather("h", reused)) == 0
    assert arena.steps[reused[0]] == 0


def test_expiry_in_event_time(seed_net_factory):
    _, path = seed_net_factory()
    engine = Engine(load_model(path), idle_expiry_ms=1000)
    features = np.zeros((2, 4), np.float32)
    engine.process(EventBatch.build(["a", "b"], features, ts_ms=[0, 0]))
    engine.process(EventBatch.build(["b", "b"], features, ts_ms=[900, 1500], offsets=[2, 3]))
    assert "a" not in engine.arena
    assert "b" in engine.arena
    assert engine.arena.expirations == 1
    result = engine.process(EventBatch.build(["a"], features[:1], ts_ms=[1600], offsets=[4]))
    assert result.steps.tolist() == [1]  # a came back from zero state


def test_remove_partitions():
    arena = make_arena()
    arena.assign(["a", "b", "c"], np.array([0, 1, 1], np.int32))
    assert arena.remove_partitions({1}) == 2
    assert arena.entities() == ["a"]
    assert {r.reason for r in arena.drain_removed()} == {"revoked"}


def test_duplicate_offsets_not_applied(seed_net_factory):
    _, path = seed_net_factory()
    engine = Engine(load_model(path))
    features = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
    first = engine.process(EventBatch.build(["a", "a", "b"], features, offsets=[10, 11, 12]))
    h_before = engine.arena.gather("h", np.array([engine.arena.slot_of("a")])).clone()
    again = engine.process(EventBatch.build(["a", "a", "b"], features, offsets=[10, 11, 12]))
    assert first.applied.all()
    assert not again.applied.any()
    assert again.duplicates == 3
    assert torch.equal(engine.arena.gather("h", np.array([engine.arena.slot_of("a")])), h_before)
    assert engine.arena.steps[engine.arena.slot_of("a")] == 2


def test_offsets_of_other_streams_are_not_duplicates(seed_net_factory):
    _, path = seed_net_factory()
    engine = Engine(load_model(path))
    features = np.random.default_rng(1).normal(size=(6, 4)).astype(np.float32)
    # Entity a's events arrive from partition 0 (offsets 40, 41) and partition 1 (offsets 3, 4): keyless
    # records spread over partitions, or the key of a topic whose partitions were added.
    first = engine.process(EventBatch.build(["a", "a"], features[:2], offsets=[40, 41], partitions=[0, 0]))
    other = engine.process(EventBatch.build(["a", "a"], features[2:4], offsets=[3, 4], partitions=[1, 1]))
    again = engine.process(EventBatch.build(["a"], features[4:5], offsets=[4], partitions=[1]))
    # Two topics with the same partition number: the streams column distinguishes them.
    topics = EventBatch.build(["a"], features[5:6], offsets=[4], partitions=[1])
    topics.streams = np.array([(1 << 32) | 1], np.int64)
    second_topic = engine.process(topics)

    assert first.applied.all()
    assert other.applied.all()
    assert other.steps.tolist() == [3, 4]
    assert again.duplicates == 1
    assert second_topic.applied.all()
    assert second_topic.steps.tolist() == [5]


def test_state_memory_close_to_raw_bytes():
    arena = StateArena({"h": (2, 64), "c": (2, 64)}, page_slots=16384)
    arena.assign([f"e{i}" for i in range(100_000)])
    raw = 100_000 * 2 * 2 * 64 * 4
    assert arena.nbytes() < 1.3 * raw


def test_assign_empty_and_single():
    arena = make_arena()
    assert arena.assign([]).tolist() == []
    assert arena.assign(["solo"]).tolist() == [0]
    assert arena.assign(["solo"]).tolist() == [0]


def test_export_and_load_round_trip():
    arena = make_arena()
    slots = arena.assign(["a", "b"], np.array([3, 3], np.int32))
    arena.scatter("h", slots, torch.randn(2, 2, 3))
    arena.scatter("c", slots, torch.randn(2, 2, 3))
    arena.steps[slots] = [4, 9]
    arena.dirty[slots] = True
    assert arena.dirty_slots().tolist() == sorted(slots.tolist())
    rows = arena.export_rows(slots)
    assert rows.shape == (2, 12)
    other = make_arena()
    split = {"h": rows[:, :6].reshape(2, 2, 3), "c": rows[:, 6:].reshape(2, 2, 3)}
    loaded = other.load(["a", "b"], 3, np.array([4, 9]), np.array([10, 11]), np.array([5, 6]), split)
    assert torch.equal(other.gather("h", loaded), arena.gather("h", slots))
    assert torch.equal(other.gather("c", loaded), arena.gather("c", slots))
    assert other.steps[loaded].tolist() == [4, 9]
    assert other.last_offset[loaded].tolist() == [10, 11]
    assert other.partition[loaded].tolist() == [3, 3]
    assert other.dirty_slots().tolist() == []
    assert other.remove_entities(["a", "zzz"]) == 1
    assert "a" not in other
    assert other.drain_removed() == []


def test_export_of_no_slots_is_empty():
    arena = make_arena()
    arena.assign(["a"])
    assert arena.export_rows(np.zeros(0, np.int64)).shape == (0, 12)


def test_loading_no_entities_into_an_empty_arena():
    # A partition whose snapshot or changelog contains no entity loads nothing, even before the first page exists.
    arena = make_arena()
    empty = np.zeros(0, np.int64)
    slots = arena.load([], 0, empty, empty, empty, {"h": np.zeros((0, 2, 3), np.float32),
                                                     "c": np.zeros((0, 2, 3), np.float32)})
    assert slots.size == 0
    assert len(arena) == 0


def test_pages_of_long_rows_hold_fewer_slots():
    """A window of 100,000 timesteps of 3 inputs takes 1.2 MB per slot: a page has 55 slots, not 16,384."""
    arena = StateArena({"window": (100_000, 3)}, page_slots=16384)
    arena.assign(["a", "b"])

    assert arena.page_slots == (64 << 20) // (100_000 * 3 * 4)
    assert arena.nbytes() <= 64 << 20
    assert StateArena({"h": (2, 64), "c": (2, 64)}, page_slots=16384).page_slots == 16384
