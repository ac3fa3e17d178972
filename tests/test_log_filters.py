"""The filters that thin out repeated Kafka client log lines and downgrade transient coordinator errors."""

from __future__ import annotations

import logging

from streamer.log_filters import DeadLetterLog, GroupCoordinatorLevels, RepeatFilter


def record(name: str, message: str, *args) -> logging.LogRecord:
    return logging.LogRecord(name, logging.ERROR, __file__, 1, message, args, None)


def test_repeats_dropped_then_counted():
    now = [0.0]
    repeat = RepeatFilter("aiokafka", interval_s=10.0, clock=lambda: now[0])

    passed = []
    for second in range(25):
        now[0] = float(second)
        entry = record("aiokafka.conn", "Unable connect to node with id %d", 1)
        if repeat.filter(entry):
            passed.append((second, entry.getMessage()))

    assert passed == [(0, "Unable connect to node with id 1"),
                      (10, "Unable connect to node with id 1 (9 identical messages in the last 10 s)"),
                      (20, "Unable connect to node with id 1 (9 identical messages in the last 10 s)")]


def test_other_messages_and_loggers_pass():
    repeat = RepeatFilter("aiokafka", interval_s=10.0, clock=lambda: 0.0)

    assert repeat.filter(record("aiokafka.conn", "node %d", 1))
    assert repeat.filter(record("aiokafka.conn", "node %d", 2))
    assert repeat.filter(record("streamer.kafka.service", "same"))
    assert repeat.filter(record("streamer.kafka.service", "same"))
    assert repeat.filter(record("aiokafkax", "same"))
    assert repeat.filter(record("aiokafkax", "same"))
    assert not repeat.filter(record("aiokafka.conn", "node %d", 1))


def test_rebalancing_heartbeat_becomes_info(caplog):
    logger = logging.getLogger("aiokafka.consumer.group_coordinator.heartbeat-test")
    logger.addFilter(GroupCoordinatorLevels())

    with caplog.at_level(logging.INFO, logger=logger.name):
        logger.warning("Heartbeat failed for group %s because it is rebalancing", "streamer")
        logger.warning("Heartbeat session expired - marking coordinator dead")
    assert [(record.levelname, record.getMessage()[:16]) for record in caplog.records] == [
        ("INFO", "Heartbeat failed"), ("WARNING", "Heartbeat sessio")]

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=logger.name):
        logger.warning("Heartbeat failed for group %s because it is rebalancing", "streamer")
    assert caplog.records == []


def test_coordinator_lookup_becomes_warning(caplog):
    logger = logging.getLogger("aiokafka.consumer.group_coordinator.test")
    logger.addFilter(GroupCoordinatorLevels())

    with caplog.at_level(logging.INFO, logger=logger.name):
        logger.error("Group Coordinator Request failed: %s", "[Error 15] GroupCoordinatorNotAvailableError")
        logger.error("Group Coordinator Request failed: %s", "[Error 29] TopicAuthorizationFailedError")

    assert [record.levelname for record in caplog.records] == ["WARNING", "ERROR"]


def clocked_dead_letter_log() -> tuple[list[float], DeadLetterLog]:
    """A dead-letter log with a 10 s interval, and the one-element list that sets its clock."""
    now = [0.0]
    return now, DeadLetterLog(logging.getLogger("streamer.test.dead_letters"), interval_s=10.0,
                              clock=lambda: now[0])


def test_dead_letters_logged_once_per_reason_and_interval(caplog):
    now, log = clocked_dead_letter_log()

    with caplog.at_level(logging.WARNING, logger="streamer.test.dead_letters"):
        for second in range(25):
            now[0] = float(second)
            log.record("invalid_json", f"events[0]@{second}", "Invalid JSON: unexpected character")
        log.record("feature_count", "events[1]@7", "Invalid feature count 3: the model has 2 inputs")

    assert [record.getMessage() for record in caplog.records] == [
        "Dead letter (invalid_json) events[0]@0: Invalid JSON: unexpected character",
        "10 dead letters (invalid_json) in the last 10 s, the latest events[0]@10: Invalid JSON: unexpected character",
        "10 dead letters (invalid_json) in the last 10 s, the latest events[0]@20: Invalid JSON: unexpected character",
        "Dead letter (feature_count) events[1]@7: Invalid feature count 3: the model has 2 inputs",
    ]


def test_dead_letters_not_logged_yet_flushed(caplog):
    now, log = clocked_dead_letter_log()

    with caplog.at_level(logging.WARNING, logger="streamer.test.dead_letters"):
        for second in range(4):
            now[0] = float(second)
            log.record("invalid_json", f"events[0]@{second}", "Invalid JSON")
            log.record("feature_count", f"events[1]@{second}", "Invalid feature count 3")
        log.flush()  # within the interval: nothing yet
        now[0] = 10.0
        log.flush()
        now[0] = 11.0
        log.record("feature_count", "events[1]@11", "Invalid feature count 3")
        log.flush()
        now[0] = 12.0
        log.flush(force=True)
        log.flush(force=True)  # nothing left

    assert [record.getMessage() for record in caplog.records] == [
        "Dead letter (invalid_json) events[0]@0: Invalid JSON",
        "Dead letter (feature_count) events[1]@0: Invalid feature count 3",
        "3 dead letters (invalid_json) in the last 10 s, the latest events[0]@3: Invalid JSON",
        "3 dead letters (feature_count) in the last 10 s, the latest events[1]@3: Invalid feature count 3",
        "1 dead letter (feature_count) in the last 2 s, the latest events[1]@11: Invalid feature count 3",
    ]
