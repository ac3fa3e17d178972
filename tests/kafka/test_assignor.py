"""The co-partitioned sticky assignor: partition numbers kept together, balanced, and moved only when needed."""

from __future__ import annotations

import itertools

import pytest
from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment

from streamer.kafka.assignor import CopartitionedStickyAssignor, assign_numbers


class Cluster:
    """The part of aiokafka's ClusterMetadata that assignors read."""

    def __init__(self, counts: dict[str, int]) -> None:
        self.counts = counts

    def partitions_for_topic(self, topic: str) -> set[int] | None:
        return set(range(self.counts[topic])) if topic in self.counts else None


def join(assignors: dict[str, CopartitionedStickyAssignor], cluster: Cluster, topics: list[str]
         ) -> dict[str, dict[str, list[int]]]:
    """Run one rebalance as aiokafka does: metadata from every member, assignment by the leader, delivery."""
    metadata = {member: assignor.metadata(topics) for member, assignor in assignors.items()}
    leader = assignors[min(assignors)]
    assignments = leader.assign(cluster, metadata)
    for member, assignment in assignments.items():
        encoded = assignment.encode()
        assignors[member].on_assignment(ConsumerProtocolMemberAssignment.decode(encoded))
    return {member: {topic: partitions for topic, partitions in assignment.assignment}
            for member, assignment in assignments.items()}


def moved(before: dict[str, dict[str, list[int]]], after: dict[str, dict[str, list[int]]]) -> int:
    owner_before = {(topic, p): member for member, topics in before.items() for topic, ps in topics.items() for p in ps}
    owner_after = {(topic, p): member for member, topics in after.items() for topic, ps in topics.items() for p in ps}
    return sum(1 for tp, member in owner_after.items() if owner_before.get(tp) not in (None, member))


def test_topics_assigned_together():
    cluster = Cluster({"a": 6, "b": 6})
    assignors = {f"m{i}": CopartitionedStickyAssignor() for i in range(4)}

    result = join(assignors, cluster, ["a", "b"])

    for member, topics in result.items():
        assert topics["a"] == topics["b"], member
    every = sorted(p for topics in result.values() for p in topics["a"])
    assert every == list(range(6))
    assert sorted(len(topics["a"]) for topics in result.values()) == [1, 1, 2, 2]


def test_topic_with_fewer_partitions():
    cluster = Cluster({"a": 4, "b": 2})
    assignors = {f"m{i}": CopartitionedStickyAssignor() for i in range(2)}

    result = join(assignors, cluster, ["a", "b"])

    for topics in result.values():
        assert set(topics["b"]) == set(topics["a"]) & {0, 1}
    assert sorted(p for topics in result.values() for p in topics["b"]) == [0, 1]


def test_member_leaving_moves_only_its_partitions():
    cluster = Cluster({"events": 4})
    assignors = {f"m{i}": CopartitionedStickyAssignor() for i in range(3)}
    before = join(assignors, cluster, ["events"])
    leaving = next(member for member, topics in before.items() if len(topics["events"]) == 1)
    del assignors[leaving]

    after = join(assignors, cluster, ["events"])

    assert moved(before, after) == 1  # the one partition of the member that left
    assert sorted(len(topics["events"]) for topics in after.values()) == [2, 2]
    assert sorted(p for topics in after.values() for p in topics["events"]) == [0, 1, 2, 3]


def test_member_joining_takes_only_its_share():
    cluster = Cluster({"events": 12})
    assignors = {f"m{i}": CopartitionedStickyAssignor() for i in range(3)}
    before = join(assignors, cluster, ["events"])
    assignors["m9"] = CopartitionedStickyAssignor()

    after = join(assignors, cluster, ["events"])

    assert len(after["m9"]["events"]) == 3
    assert moved(before, after) == 3  # the new member's share, and nothing else
    for member in ("m0", "m1", "m2"):
        assert set(after[member]["events"]) <= set(before[member]["events"])
        assert len(after[member]["events"]) == 3


def test_round_robin_would_split_partition_numbers():
    """The reason for this assignor: aiokafka's default gives partition 0 of two topics to two members."""
    from aiokafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor

    cluster = Cluster({"a": 3, "b": 3})
    metadata = {f"m{i}": RoundRobinPartitionAssignor.metadata(["a", "b"]) for i in range(2)}

    result = RoundRobinPartitionAssignor.assign(cluster, metadata)

    split = [dict(assignment.assignment) for assignment in result.values()]
    assert any(topics.get("a", []) != topics.get("b", []) for topics in split)


@pytest.mark.parametrize("partitions, members", list(itertools.product([1, 3, 8, 13], [1, 2, 3, 5, 9])))
def test_assignment_complete_and_balanced(partitions, members):
    numbers = list(range(partitions))
    owned = {f"m{i}": numbers[i::3] for i in range(members)}  # claims that overlap and leave gaps

    result = assign_numbers(numbers, owned)

    flat = sorted(number for assigned in result.values() for number in assigned)
    assert flat == numbers
    sizes = [len(assigned) for assigned in result.values()]
    assert max(sizes) - min(sizes) <= 1


def test_contested_number_stays_with_one_member():
    result = assign_numbers([0, 1, 2, 3], {"a": [0, 1], "b": [1, 2], "c": []})

    assert result["a"][:1] == [0]
    assert 2 in result["b"]
    assert sorted(n for assigned in result.values() for n in assigned) == [0, 1, 2, 3]


def test_foreign_user_data_ignored():
    from aiokafka.coordinator.protocol import ConsumerProtocolMemberMetadata

    assignor = CopartitionedStickyAssignor()
    metadata = {"a": ConsumerProtocolMemberMetadata(0, ["events"], b"\x00\x01binary"),
                "b": ConsumerProtocolMemberMetadata(0, ["events"], b'{"owned": "all"}')}

    result = assignor.assign(Cluster({"events": 2}), metadata)

    assert sorted(p for assignment in result.values() for _, ps in assignment.assignment for p in ps) == [0, 1]


def test_different_subscriptions_fall_back_to_range(caplog):
    from aiokafka.coordinator.protocol import ConsumerProtocolMemberMetadata

    assignor = CopartitionedStickyAssignor()
    metadata = {"a": ConsumerProtocolMemberMetadata(0, ["x", "y"], b""),
                "b": ConsumerProtocolMemberMetadata(0, ["x"], b"")}

    result = assignor.assign(Cluster({"x": 2, "y": 2}), metadata)

    assert "subscribe to different topics" in caplog.text
    assigned = {member: dict(assignment.assignment) for member, assignment in result.items()}
    assert sorted(assigned["a"].get("x", []) + assigned["b"].get("x", [])) == [0, 1]
    assert assigned["a"]["y"] == [0, 1]
