"""Engine outputs against offline references: full-history forward (stateful) and the seed forward (window)."""

import numpy as np
import pytest
import torch

from streamer.engine import Engine, EventBatch
from streamer.model import ModelManifest, load_model, save_bundle

TOLERANCE = 1e-5

CONFIGS = [
    # cell, input, hidden, layers, output
    ("lstm", 4, 16, 2, 1),
    ("lstm", 3, 8, 1, 2),
    ("lstm", 8, 64, 3, 1),
    ("gru", 4, 16, 2, 1),
    ("gru", 5, 7, 3, 3),
    ("rnn", 4, 16, 1, 1),
    ("rnn", 2, 32, 3, 2),
]


def make_stream(rng, n_events, n_entities, input_size, reset_rate=0.0):
    entities = [f"e{int(i)}" for i in rng.integers(0, n_entities, n_events)]
    features = rng.normal(size=(n_events, input_size)).astype(np.float32)
    resets = rng.random(n_events) < reset_rate
    return entities, features, resets


def run_engine(model, semantics, entities, features, resets, batch_sizes):
    engine = Engine(model, semantics, page_slots=8)
    predictions, start, turn = [], 0, 0
    while start < len(entities):
        size = batch_sizes[turn % len(batch_sizes)]
        stop = min(start + size, len(entities))
        batch = EventBatch.build(entities[start:stop], features[start:stop], resets=resets[start:stop],
                                 offsets=np.arange(start, stop))
        result = engine.process(batch)
        assert result.applied.all()
        predictions.append(result.predictions)
        start, turn = stop, turn + 1
    return np.concatenate(predictions), engine


def reference(net, entities, features, resets, window=None):
    """Offline: for each event, the seed net over the entity's history since its last reset from zero state."""
    history: dict[str, list[np.ndarray]] = {}
    out = []
    with torch.no_grad():
        for entity, row, reset in zip(entities, features, resets):
            if reset:
                history[entity] = []
            history.setdefault(entity, []).append(row)
            sequence = history[entity] if window is None else history[entity][-window:]
            out.append(net(torch.from_numpy(np.stack(sequence))[None])[0].numpy())
    return np.stack(out)


@pytest.mark.parametrize("cell,input_size,hidden,layers,output", CONFIGS)
@pytest.mark.parametrize("batch_sizes", [[1], [7, 3, 64], [500]])
def test_stateful_equals_full_history(seed_net_factory, cell, input_size, hidden, layers, output, batch_sizes):
    net, path = seed_net_factory(cell, input_size, hidden, layers, output, seed=layers * 10 + hidden)
    rng = np.random.default_rng(hidden)
    entities, features, resets = make_stream(rng, 240, 9, input_size)
    predictions, engine = run_engine(load_model(path), "stateful", entities, features, resets, batch_sizes)
    expected = reference(net, entities, features, resets)
    assert np.abs(predictions - expected).max() < TOLERANCE
    assert len(engine.arena) == len(set(entities))


@pytest.mark.parametrize("cell,input_size,hidden,layers,output", CONFIGS)
@pytest.mark.parametrize("seq_len", [1, 4, 30])
def test_window_equals_seed_forward(seed_net_factory, cell, input_size, hidden, layers, output, seq_len):
    net, path = seed_net_factory(cell, input_size, hidden, layers, output, seed=seq_len)
    rng = np.random.default_rng(seq_len)
    entities, features, resets = make_stream(rng, 200, 6, input_size, reset_rate=0.03)
    model = load_model(path, seq_len=seq_len)
    predictions, _ = run_engine(model, "window", entities, features, resets, [13, 1, 40])
    expected = reference(net, entities, features, resets, window=seq_len)
    assert np.abs(predictions - expected).max() < TOLERANCE


def test_window_in_chunks_equals_seed_forward(seed_net_factory, monkeypatch):
    """A wave too large for one chunk of window memory runs in chunks of rows, with the same outputs."""
    from streamer.engine import engine as engine_module

    net, path = seed_net_factory("lstm", 3, 8, 2, 1, seed=4)
    rng = np.random.default_rng(4)
    entities, features, resets = make_stream(rng, 300, 40, 3, reset_rate=0.02)
    model = load_model(path, seq_len=6)
    # 4 rows per chunk: 4 * 6 * (2 * 3 + 5 * 8) * 4 bytes.
    monkeypatch.setattr(engine_module, "WINDOW_CHUNK_BYTES", 4 * 6 * 46 * 4)
    predictions, _ = run_engine(model, "window", entities, features, resets, [64, 7])
    expected = reference(net, entities, features, resets, window=6)
    assert np.abs(predictions - expected).max() < TOLERANCE


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_reset_restarts_from_zero_state(seed_net_factory, cell):
    net, path = seed_net_factory(cell)
    rng = np.random.default_rng(5)
    entities, features, resets = make_stream(rng, 150, 4, 4, reset_rate=0.1)
    assert resets.sum() > 5
    predictions, _ = run_engine(load_model(path), "stateful", entities, features, resets, [16])
    assert np.abs(predictions - reference(net, entities, features, resets)).max() < TOLERANCE
    first_after_reset = np.flatnonzero(resets)[0]
    fresh = reference(net, [entities[first_after_reset]], features[first_after_reset:first_after_reset + 1], [True])
    assert np.abs(predictions[first_after_reset] - fresh[0]).max() < TOLERANCE


@pytest.mark.parametrize("semantics", ["stateful", "window"])
def test_outputs_independent_of_batch_split(seed_net_factory, semantics):
    _, path = seed_net_factory("lstm", layers=3)
    rng = np.random.default_rng(11)
    entities, features, resets = make_stream(rng, 400, 12, 4, reset_rate=0.02)
    model = load_model(path, seq_len=6)
    one_by_one, _ = run_engine(model, semantics, entities, features, resets, [1])
    whole, _ = run_engine(model, semantics, entities, features, resets, [400])
    mixed, _ = run_engine(model, semantics, entities, features, resets, [3, 17, 64, 1])
    assert np.abs(one_by_one - whole).max() < TOLERANCE
    assert np.abs(one_by_one - mixed).max() < TOLERANCE


def expiry_resets(entities, ts, idle_ms):
    """Where an event finds its entity expired: the largest earlier ts exceeds the entity's last ts by > idle_ms."""
    last: dict[str, int] = {}
    largest = None
    restarts = []
    for entity, time_ms in zip(entities, ts):
        restarts.append(entity in last and largest is not None and last[entity] + idle_ms < largest)
        last[entity] = time_ms if restarts[-1] or entity not in last else max(last[entity], time_ms)
        largest = time_ms if largest is None else max(largest, time_ms)
    return np.array(restarts)


@pytest.mark.parametrize("semantics", ["stateful", "window"])
def test_idle_expiry_independent_of_batch_split(seed_net_factory, semantics):
    net, path = seed_net_factory("lstm")
    rng = np.random.default_rng(8)
    entities, features, resets = make_stream(rng, 300, 10, 4, reset_rate=0.02)
    # Mostly increasing event times with some older ones, so that entities go idle and come back.
    ts = (np.arange(300) * 10 + rng.integers(-40, 40, 300)).astype(np.int64)
    idle_ms = 150
    model = load_model(path, seq_len=5)
    runs = []
    for batch_sizes in ([1], [300], [4, 29, 1, 77]):
        engine = Engine(model, semantics, idle_expiry_ms=idle_ms)
        start, turn, predictions, steps = 0, 0, [], []
        while start < len(entities):
            stop = min(start + batch_sizes[turn % len(batch_sizes)], len(entities))
            result = engine.process(EventBatch.build(entities[start:stop], features[start:stop],
                                                     resets=resets[start:stop], ts_ms=ts[start:stop],
                                                     offsets=np.arange(start, stop)))
            predictions.append(result.predictions)
            steps.append(result.steps)
            start, turn = stop, turn + 1
        runs.append((np.concatenate(predictions), np.concatenate(steps), engine.arena.expirations))
    restarts = expiry_resets(entities, ts, idle_ms)
    assert 10 < restarts.sum() < 200
    expected = reference(net, entities, features, resets | restarts, window=5 if semantics == "window" else None)
    for predictions, steps, expirations in runs:
        assert np.abs(predictions - expected).max() < TOLERANCE
        assert np.array_equal(steps, runs[0][1])
        assert expirations >= restarts.sum()


def test_idle_expiry_independent_of_partition_interleaving(seed_net_factory):
    _, path = seed_net_factory("lstm")
    model = load_model(path)
    rng = np.random.default_rng(9)
    events = []  # (partition, offset, entity, ts); partition p contains the entities "p-0" to "p-4"
    for partition in (0, 1):
        for offset in range(120):
            events.append((partition, offset, f"{partition}-{int(rng.integers(0, 5))}", offset * 10))
    features = {(p, o): rng.normal(size=4).astype(np.float32) for p, o, _, _ in events}

    def run(order, batch_size):
        engine = Engine(model, idle_expiry_ms=45)
        results = {}
        for start in range(0, len(order), batch_size):
            part = order[start:start + batch_size]
            result = engine.process(EventBatch.build([e for _, _, e, _ in part],
                                                     np.stack([features[(p, o)] for p, o, _, _ in part]),
                                                     ts_ms=[t for _, _, _, t in part],
                                                     offsets=[o for _, o, _, _ in part],
                                                     partitions=[p for p, _, _, _ in part]))
            for (p, o, _, _), prediction, step in zip(part, result.predictions, result.steps):
                results[(p, o)] = (prediction, step)
        return results

    backlog_first = run(events, 64)  # all of partition 0, then all of partition 1
    interleaved = run([event for pair in zip(events[:120], events[120:]) for event in pair], 7)
    steps = [backlog_first[key][1] for key in sorted(backlog_first)]
    assert 10 < steps.count(1) < 200
    for key, (prediction, step) in backlog_first.items():
        assert interleaved[key][1] == step
        assert np.abs(interleaved[key][0] - prediction).max() < TOLERANCE


def test_repeated_entity_in_one_batch_applied_in_order(seed_net_factory):
    net, path = seed_net_factory("lstm")
    features = np.random.default_rng(2).normal(size=(5, 4)).astype(np.float32)
    entities = ["a", "a", "b", "a", "b"]
    engine = Engine(load_model(path))
    result = engine.process(EventBatch.build(entities, features))
    assert result.waves == 3
    assert result.steps.tolist() == [1, 2, 1, 3, 2]
    expected = reference(net, entities, features, np.zeros(5, bool))
    assert np.abs(result.predictions - expected).max() < TOLERANCE


def test_older_timestamp_applied_in_arrival_order(seed_net_factory):
    net, path = seed_net_factory("lstm")
    features = np.random.default_rng(4).normal(size=(3, 4)).astype(np.float32)
    entities = ["a", "a", "a"]
    engine = Engine(load_model(path))
    steps = []
    predictions = []
    for position, ts in enumerate([3_000, 1_000, 2_000]):  # the second and third events are older
        result = engine.process(EventBatch.build(entities[position:position + 1], features[position:position + 1],
                                                 ts_ms=[ts], offsets=[position]))
        steps.append(int(result.steps[0]))
        predictions.append(result.predictions[0])

    assert steps == [1, 2, 3]
    expected = reference(net, entities, features, np.zeros(3, bool))
    assert np.abs(np.array(predictions) - expected).max() < TOLERANCE


def test_manifest_scaling_applied(seed_net_factory, tmp_path):
    net, _ = seed_net_factory("gru", input_dim=2, output_dim=1)
    manifest = ModelManifest("gru", 2, 16, 2, 1, input_mean=(10.0, -5.0), input_std=(2.0, 0.5),
                             output_mean=(100.0,), output_std=(7.0,))
    bundle = tmp_path / "scaled.pt"
    save_bundle(bundle, net.state_dict(), manifest)
    raw = np.random.default_rng(3).normal(10, 2, size=(6, 2)).astype(np.float32)
    result = Engine(load_model(bundle)).process(EventBatch.build(["x"] * 6, raw))
    scaled = (torch.from_numpy(raw) - torch.tensor([10.0, -5.0])) / torch.tensor([2.0, 0.5])
    with torch.no_grad():
        expected = net(scaled[None])[0] * 7.0 + 100.0
    assert abs(result.predictions[-1, 0] - expected.item()) < 1e-4


def test_inference_keeps_no_autograd_history(seed_net_factory):
    _, path = seed_net_factory("lstm")
    engine = Engine(load_model(path))
    engine.process(EventBatch.build(["a", "b"], np.ones((2, 4), np.float32)))
    state = engine.arena.gather("h", np.array([0, 1]))
    assert not state.requires_grad
    assert state.grad_fn is None
