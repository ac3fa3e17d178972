"""Topic backtests against a real broker: determinism, equality with the live service, no side effects, ranges."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from streamer.backtest.runner import backtest_topic
from streamer.backtest.topic_replay import ROUND_EVENTS, TopicReplaySpec, parse_range_bound, run_topic_backtest
from streamer.engine import Engine
from streamer.errors import ConfigError
from streamer.io.files import read_outputs
from streamer.kafka.console_tools import console_produce
from streamer.metrics import StreamerMetrics
from streamer.model import load_model
from tests.service.service_helpers import ServiceProcess, create_topics, produce, read_topic

pytestmark = pytest.mark.kafka

START_TS = 1_733_300_000_000


def make_events(n_events: int, n_entities: int, seed: int = 0) -> list[tuple[bytes, bytes]]:
    """Keyed events with features, a target and every tenth entity's fifth event a reset."""
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(n_events, 4)).round(4).tolist()
    events = []
    for i in range(n_events):
        entity = f"e{i % n_entities}"
        document = {"ts": START_TS + i, "features": features[i], "target": round(features[i][0] * 0.5, 4)}
        if i % n_entities == 0 and i // n_entities == 5:
            document["reset"] = True
        events.append((entity.encode(), orjson.dumps(document)))
    return events


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def model_path(seed_net_factory) -> Path:
    return seed_net_factory(input_dim=4, hidden_dim=16, layers=2, seq_len=5)[1]


@pytest.fixture
def events_topic(kafka_bootstrap) -> str:
    """A 3-partition topic with 600 keyed events over 25 entities and one invalid record."""
    topic = unique("replay-in")
    asyncio.run(create_topics(kafka_bootstrap, {topic: 3}))
    asyncio.run(produce(kafka_bootstrap, topic, make_events(600, 25) + [(b"e3", b"{not json")]))
    return topic


def sources(path: Path) -> list[tuple[int, int]]:
    return [(output["source"]["partition"], output["source"]["offset"]) for output in read_outputs(path)]


async def end_offsets_of_all_topics(bootstrap: str) -> dict[TopicPartition, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        # The group coordinator writes to __consumer_offsets for any group on the broker, including expiring
        # groups of earlier tests. So groups and committed offsets are checked on their own instead.
        topics = [topic for topic in await admin.list_topics() if topic != "__consumer_offsets"]
        described = await admin.describe_topics(topics)
    finally:
        await admin.close()
    partitions = [TopicPartition(item["topic"], p["partition"]) for item in described for p in item["partitions"]]
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        return await consumer.end_offsets(partitions)
    finally:
        await consumer.stop()


async def groups_and_offsets(bootstrap: str) -> dict[str, dict]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        groups = sorted(group[0] for group in await admin.list_consumer_groups())
        return {group: {tp: meta.offset for tp, meta in (await admin.list_consumer_group_offsets(group)).items()}
                for group in groups}
    finally:
        await admin.close()


def replay(bootstrap: str, model_path: Path, topics: tuple[str, ...], output: Path, start: str = "earliest",
           end: str = "latest", **options):
    spec = TopicReplaySpec(bootstrap, topics, parse_range_bound(start, "--from"), parse_range_bound(end, "--to"))
    return run_topic_backtest(load_model(model_path, seq_len=5), spec, output_path=output, progress=False,
                              **options)


def test_replay_twice_identical_bytes(kafka_bootstrap, events_topic, model_path, tmp_path):
    first = replay(kafka_bootstrap, model_path, (events_topic,), tmp_path / "first.jsonl", batch_size=16)
    second = replay(kafka_bootstrap, model_path, (events_topic,), tmp_path / "second.jsonl", batch_size=16)

    assert first.events == 601
    assert first.outputs == 600
    assert first.dead_letters == 1
    assert (tmp_path / "first.jsonl").read_bytes() == (tmp_path / "second.jsonl").read_bytes()
    assert (tmp_path / "first.dead-letter.jsonl").read_bytes() == (tmp_path / "second.dead-letter.jsonl").read_bytes()


def test_failed_replay_leaves_earlier_outputs(kafka_bootstrap, events_topic, model_path, tmp_path, monkeypatch):
    output = tmp_path / "out.jsonl"
    replay(kafka_bootstrap, model_path, (events_topic,), output, batch_size=16)
    outputs, letters = output.read_bytes(), (tmp_path / "out.dead-letter.jsonl").read_bytes()
    calls = []
    original = Engine.process

    def process_then_fail(self, batch):
        calls.append(len(batch))
        if len(calls) > 2:
            raise RuntimeError("interrupted")
        return original(self, batch)

    monkeypatch.setattr(Engine, "process", process_then_fail)
    with pytest.raises(RuntimeError, match="interrupted"):
        replay(kafka_bootstrap, model_path, (events_topic,), output, batch_size=16)

    assert output.read_bytes() == outputs
    assert (tmp_path / "out.dead-letter.jsonl").read_bytes() == letters
    assert [path.name for path in tmp_path.iterdir() if path.name.endswith(".partial")] == []


def test_replay_order_is_round_robin_by_partition(kafka_bootstrap, events_topic, model_path, tmp_path):
    result = replay(kafka_bootstrap, model_path, (events_topic,), tmp_path / "out.jsonl", batch_size=16)
    sizes = {r.partition: r.size for r in result.ranges}
    expected = []
    for round_start in range(0, max(sizes.values()), 16):
        for partition in sorted(sizes):
            expected.extend((partition, offset) for offset in range(round_start, min(round_start + 16,
                                                                                      sizes[partition])))
    dead = orjson.loads((tmp_path / "out.dead-letter.jsonl").read_bytes())["source"]
    expected.remove((dead["partition"], dead["offset"]))

    assert sources(tmp_path / "out.jsonl") == expected


def test_default_round_splits_across_partitions(kafka_bootstrap, events_topic, model_path, tmp_path):
    result = replay(kafka_bootstrap, model_path, (events_topic,), tmp_path / "out.jsonl")

    assert len(result.ranges) > 1
    assert result.batch_size == ROUND_EVENTS // len(result.ranges)
    assert result.as_dict()["batch_size"] == result.batch_size
    assert result.outputs == 600


def test_replay_equals_live_service_without_side_effects(kafka_bootstrap, events_topic, model_path, tmp_path):
    group = unique("replay-live-group")
    live_output = unique("replay-live-out")
    service = ServiceProcess(tmp_path, model=model_path, bootstrap_servers=kafka_bootstrap, topic_partitions=3,
                             input_topics=events_topic, output_topic=live_output,
                             dead_letter_topic=unique("replay-live-dlq"), group_id=group)
    try:
        service.wait_ready()
        live = asyncio.run(read_topic(kafka_bootstrap, live_output, 600))
    finally:
        assert service.stop() == 0, service.log()
    groups_before = asyncio.run(groups_and_offsets(kafka_bootstrap))
    ends_before = asyncio.run(end_offsets_of_all_topics(kafka_bootstrap))

    replay(kafka_bootstrap, model_path, (events_topic,), tmp_path / "replay.jsonl")
    replay_topic = unique("replay-out")
    to_topic = run_topic_backtest(load_model(model_path), TopicReplaySpec(kafka_bootstrap, (events_topic,)),
                                  output_topic=replay_topic, dead_letter_path=tmp_path / "dead.jsonl",
                                  keep_topic_outputs=True, progress=False)

    groups_after = asyncio.run(groups_and_offsets(kafka_bootstrap))
    ends_after = asyncio.run(end_offsets_of_all_topics(kafka_bootstrap))
    assert groups_after == groups_before
    assert group in groups_after
    changed = {tp.topic for tp in ends_after if ends_after[tp] != ends_before.get(tp, 0)}
    assert changed == {replay_topic}

    assert len(live) == 600
    live_by_source = {(o["source"]["partition"], o["source"]["offset"]): o for o in map(orjson.loads,
                                                                                          (r.value for r in live))}
    replayed = read_outputs(tmp_path / "replay.jsonl")
    assert len(replayed) == 600
    for output in replayed:
        expected = live_by_source[(output["source"]["partition"], output["source"]["offset"])]
        assert output["entity"] == expected["entity"]
        assert output["step"] == expected["step"]
        assert output["source"] == expected["source"]
        assert abs(output["prediction"][0] - expected["prediction"][0]) < 1e-6
    produced = asyncio.run(read_topic(kafka_bootstrap, replay_topic, 600))
    assert len(produced) == 600
    assert sorted(orjson.loads(r.value)["source"]["offset"] for r in produced) == \
        sorted(o["source"]["offset"] for o in replayed)
    assert to_topic.outputs == 600
    partition_of_live = {orjson.loads(r.value)["source"]["offset"] + 1000 * orjson.loads(r.value)["source"][
        "partition"]: r.partition for r in live}
    partition_of_replay = {orjson.loads(r.value)["source"]["offset"] + 1000 * orjson.loads(r.value)["source"][
        "partition"]: r.partition for r in produced}
    assert partition_of_replay == partition_of_live


def test_time_range_replays_exact_offsets(kafka_bootstrap, model_path, tmp_path):
    topic = unique("replay-time")
    asyncio.run(create_topics(kafka_bootstrap, {topic: 2}))

    async def produce_with_timestamps() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
        await producer.start()
        try:
            for i, (key, value) in enumerate(make_events(40, 4)):
                await producer.send_and_wait(topic, value, key=key, partition=i % 2,
                                             timestamp_ms=START_TS + 1000 * i)
        finally:
            await producer.stop()

    asyncio.run(produce_with_timestamps())
    # Event i is at offset i // 2 of partition i % 2, stamped START_TS + 1000 * i. The range [10 s, 20 s)
    # contains events 10 to 19.
    start_iso = "2024-12-04T08:13:30+00:00"
    assert parse_range_bound(start_iso).timestamp_ms == START_TS + 10_000
    replay(kafka_bootstrap, model_path, (topic,), tmp_path / "out.jsonl", start=start_iso,
           end=str(START_TS + 20_000))

    assert sorted(sources(tmp_path / "out.jsonl")) == sorted((i % 2, i // 2) for i in range(10, 20))


def test_time_after_last_record_resolves_to_end(kafka_bootstrap, events_topic, model_path, tmp_path):
    result = replay(kafka_bootstrap, model_path, (events_topic,), tmp_path / "out.jsonl",
                    start="2200-01-01T00:00:00Z")

    assert result.events == 0
    assert all(r.start == r.end for r in result.ranges)


def test_explicit_offsets(kafka_bootstrap, events_topic, model_path, tmp_path):
    result = replay(kafka_bootstrap, model_path, (events_topic,), tmp_path / "out.jsonl", start="0:3,1:5",
                    end=f"0:8,1:6,{events_topic}:2:4")

    expected = [(0, offset) for offset in range(3, 8)] + [(1, 5)] + [(2, offset) for offset in range(4)]
    assert sorted(sources(tmp_path / "out.jsonl")) == expected
    assert [(r.partition, r.start, r.end) for r in result.ranges] == [(0, 3, 8), (1, 5, 6), (2, 0, 4)]


def test_invalid_ranges_raise(kafka_bootstrap, events_topic, model_path, tmp_path):
    cases = [
        (dict(start="0:8", end="0:3"), "after --to"),
        (dict(start="0:100000"), "end offset"),
        (dict(start="7:0"), "not found"),
        (dict(start=str(START_TS + 500), end=str(START_TS + 100)), "expected --from before --to"),
    ]
    for options, message in cases:
        with pytest.raises(ConfigError, match=message):
            replay(kafka_bootstrap, model_path, (events_topic,), tmp_path / "out.jsonl", **options)
    with pytest.raises(ConfigError, match="not found"):
        replay(kafka_bootstrap, model_path, (unique("missing"),), tmp_path / "out.jsonl")
    with pytest.raises(ConfigError, match="Ambiguous"):
        replay(kafka_bootstrap, model_path, (events_topic, unique("other")), tmp_path / "out.jsonl", start="0:1")
    with pytest.raises(ConfigError, match="expected earliest, latest"):
        parse_range_bound("yesterday")


def test_initial_state_of_group_without_changelog(kafka_bootstrap, events_topic, model_path, tmp_path):
    spec = TopicReplaySpec(kafka_bootstrap, (events_topic,))
    started = time.monotonic()

    with pytest.raises(ConfigError, match="Changelog topic .* not found"):
        run_topic_backtest(load_model(model_path), spec, output_path=tmp_path / "out.jsonl", progress=False,
                           initial_state=f"changelog:{unique('no-such-group')}")

    assert time.monotonic() - started < 20


def test_output_topic_rules(kafka_bootstrap, events_topic, model_path, tmp_path):
    model = load_model(model_path)
    spec = TopicReplaySpec(kafka_bootstrap, (events_topic,))
    with pytest.raises(ConfigError, match="also an input topic"):
        run_topic_backtest(model, spec, output_topic=events_topic, dead_letter_path=tmp_path / "d.jsonl")

    output_topic = unique("replay-out")
    options = dict(output_topic=output_topic, dead_letter_path=tmp_path / "d.jsonl", progress=False)
    assert run_topic_backtest(model, spec, **options).outputs == 600
    with pytest.raises(ConfigError, match="already contains 600 records"):
        run_topic_backtest(model, spec, **options)
    assert run_topic_backtest(model, spec, allow_existing_output=True, **options).outputs == 600


def test_next_value_targets(kafka_bootstrap, events_topic, model_path, tmp_path):
    replay(kafka_bootstrap, model_path, (events_topic,), tmp_path / "out.jsonl", target_feature=1)

    outputs = read_outputs(tmp_path / "out.jsonl")
    events = {}
    for key, value in make_events(600, 25):
        events.setdefault(key.decode(), []).append(orjson.loads(value))
    by_entity: dict[str, list[dict]] = {}
    for output in outputs:
        by_entity.setdefault(output["entity"], []).append(output)
    assert len(outputs) == 600
    for entity, entity_events in events.items():
        got = sorted(by_entity[entity], key=lambda o: o["source"]["offset"])
        for position, output in enumerate(got):
            following = entity_events[position + 1] if position + 1 < len(entity_events) else None
            if following is None or following.get("reset"):
                assert "target" not in output, (entity, position)
            else:
                assert output["target"] == following["features"][1], (entity, position)


def test_cli_topic_backtest_with_window_report(kafka_bootstrap, events_topic, model_path, tmp_path):
    report_dir = tmp_path / "report"
    command = [sys.executable, "-m", "streamer", "backtest", "--model", str(model_path), "--topic", events_topic,
               "--bootstrap-servers", kafka_bootstrap, "--output", str(tmp_path / "out.jsonl"), "--seq-len", "5",
               "--compare-window", "--report-dir", str(report_dir), "--target", "next-value:0"]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300)

    assert completed.returncode == 0, completed.stderr
    assert "report:" in completed.stdout
    for name in ("report.html", "summary.json", "divergence.jsonl", "divergence_by_step.csv",
                 "divergence_by_entity.csv", "divergence.png", "mae_over_time.png"):
        assert (report_dir / name).is_file(), name
    summary = orjson.loads((report_dir / "summary.json").read_bytes())
    assert summary["divergence"]["matched"] == 600
    assert summary["scored_records"] == 600 - 25 - 1  # each entity's last event, and the event before a reset
    assert (tmp_path / "out.window.jsonl").is_file()
    table = summary["run"]["accuracy_by_step"]
    stateful, window = table["runs"]["stateful"], table["runs"]["window"]
    assert table["seq_len"] == 5
    assert stateful["all"]["n"] == window["all"]["n"] == summary["scored_records"]
    assert stateful["partial_windows"]["n"] + stateful["full_windows"]["n"] == stateful["all"]["n"]
    # Both semantics compute the same outputs while the window contains an entity's whole history.
    assert stateful["partial_windows"]["mae"] == pytest.approx(window["partial_windows"]["mae"], abs=1e-5)
    assert "MAE by semantics" in completed.stdout


def test_cli_warns_of_an_empty_range(kafka_bootstrap, events_topic, model_path, tmp_path):
    command = [sys.executable, "-m", "streamer", "backtest", "--model", str(model_path), "--topic", events_topic,
               "--bootstrap-servers", kafka_bootstrap, "--from", "2001-01-01T00:00:00Z",
               "--to", "2001-01-02T00:00:00Z", "--output", str(tmp_path / "out.jsonl")]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=120)

    assert completed.returncode == 0, completed.stderr
    assert "warning: the range holds no records" in completed.stderr, completed.stdout


def test_cli_rejects_output_topic_equal_to_input(kafka_bootstrap, events_topic, model_path, tmp_path):
    command = [sys.executable, "-m", "streamer", "backtest", "--model", str(model_path), "--topic", events_topic,
               "--bootstrap-servers", kafka_bootstrap, "--output-topic", events_topic]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=tmp_path)

    assert completed.returncode == 2
    assert "also an input topic" in completed.stderr
    assert not (tmp_path / f"{events_topic}-report").exists()


def test_replay_continues_from_live_changelog_state(kafka_bootstrap, model_path, seed_net_factory, tmp_path,
                                                    caplog):
    """A replay that starts from a live group's changelog state gives the outputs live processing gives."""
    topic, group = unique("continue-in"), unique("continue-group")
    asyncio.run(create_topics(kafka_bootstrap, {topic: 3}))
    events = make_events(600, 25)
    asyncio.run(produce(kafka_bootstrap, topic, events[:300]))
    settings = dict(model=model_path, bootstrap_servers=kafka_bootstrap, topic_partitions=3, changelog="true",
                    input_topics=topic, output_topic=unique("continue-out"), dead_letter_topic=unique("dlq"),
                    group_id=group)
    first = ServiceProcess(tmp_path, **settings)
    first.wait_ready()
    assert len(asyncio.run(read_topic(kafka_bootstrap, settings["output_topic"], 300))) == 300
    assert first.stop() == 0, first.log()

    asyncio.run(produce(kafka_bootstrap, topic, events[300:]))
    end_of_first = asyncio.run(_committed(kafka_bootstrap, group, topic))
    start = ",".join(f"{partition}:{offset}" for partition, offset in sorted(end_of_first.items()))
    spec = TopicReplaySpec(kafka_bootstrap, (topic,), parse_range_bound(start, "--from"),
                           parse_range_bound("latest", "--to"))
    # The live group's model file, with a window length the group ran without: stateful state ignores it.
    replayed = run_topic_backtest(load_model(model_path, seq_len=7), spec, output_path=tmp_path / "continued.jsonl",
                                  progress=False, initial_state=f"changelog:{group}")
    assert replayed.outputs == 300
    # Another model's replay starts from zero state and logs a warning.
    other_model = load_model(seed_net_factory(input_dim=4, hidden_dim=16, layers=2, seed=5)[1])
    with caplog.at_level("WARNING", logger="streamer.backtest.topic_replay"):
        run_topic_backtest(other_model, spec, output_path=tmp_path / "other.jsonl", progress=False,
                           initial_state=f"changelog:{group}")
    assert any("made by another model" in record.getMessage() for record in caplog.records)
    assert {output["step"] for output in read_outputs(tmp_path / "other.jsonl") if output["entity"] == "e0"} \
        == set(range(1, 13))

    second = ServiceProcess(tmp_path, **settings)
    try:
        second.wait_ready()
        live = asyncio.run(read_topic(kafka_bootstrap, settings["output_topic"], 600))
    finally:
        assert second.stop() == 0, second.log()
    live_by_source = {(o["source"]["partition"], o["source"]["offset"]): o
                      for o in (orjson.loads(r.value) for r in live)}
    for output in read_outputs(tmp_path / "continued.jsonl"):
        expected = live_by_source[(output["source"]["partition"], output["source"]["offset"])]
        assert output["step"] == expected["step"]
        assert abs(output["prediction"][0] - expected["prediction"][0]) < 1e-6
    assert asyncio.run(_committed(kafka_bootstrap, group, topic)) != end_of_first  # only the live group moved it


async def _committed(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    return {tp.partition: meta.offset for tp, meta in offsets.items() if tp.topic == topic}


def test_replay_of_compressed_batches(kafka_bootstrap, events_topic, model_path, tmp_path):
    compressed = unique("replay-zstd")
    asyncio.run(create_topics(kafka_bootstrap, {compressed: 3}))
    events = make_events(600, 25) + [(b"e3", b"{not json")]
    console_produce(kafka_bootstrap, compressed, events, compression="zstd")
    plain = replay(kafka_bootstrap, model_path, (events_topic,), tmp_path / "plain.jsonl")
    result = replay(kafka_bootstrap, model_path, (compressed,), tmp_path / "zstd.jsonl")
    assert (result.outputs, result.dead_letters) == (plain.outputs, plain.dead_letters)
    by_entity_step = {(o["entity"], o["step"]): o["prediction"] for o in read_outputs(tmp_path / "plain.jsonl")}
    replayed = {(o["entity"], o["step"]): o["prediction"] for o in read_outputs(tmp_path / "zstd.jsonl")}
    assert replayed == by_entity_step


def test_replay_exports_metrics(kafka_bootstrap, events_topic, model_path, tmp_path):
    metrics = StreamerMetrics()
    spec = TopicReplaySpec(kafka_bootstrap, (events_topic,))

    backtest_topic(model_path, spec, output_path=tmp_path / "out.jsonl", progress=False, metrics=metrics)

    def sample(name, **labels):
        return metrics.registry.get_sample_value(name, labels)

    assert sample("streamer_events_consumed_total", topic=events_topic) == 601
    assert sample("streamer_events_dead_lettered_total", reason="invalid_json") == 1
    assert sample("streamer_state_entities") == 25
    assert sample("streamer_batch_events_count") >= 1
    build = [s for s in metrics.registry.collect() if s.name == "streamer_build_info"][0].samples[0].labels
    assert (build["mode"], build["model_fingerprint"]) == ("replay", load_model(model_path).fingerprint)


def test_metrics_port_needs_a_topic(model_path, tmp_path):
    events = tmp_path / "events.jsonl"
    events.write_text('{"entity": "a", "features": [1, 2, 3, 4]}\n')
    completed = subprocess.run([sys.executable, "-m", "streamer", "backtest", "--model", str(model_path), "--input",
                                str(events), "--output", str(tmp_path / "out.jsonl"), "--metrics-port", "0"],
                               capture_output=True, text=True, timeout=120)
    assert completed.returncode == 2
    assert "Invalid --metrics-port for a file backtest" in completed.stderr
