"""Partition assignment that keeps partition numbers together and in place across rebalances."""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Iterable, Mapping

import orjson
from aiokafka.cluster import ClusterMetadata
from aiokafka.coordinator.assignors.abstract import AbstractPartitionAssignor
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment, ConsumerProtocolMemberMetadata

logger = logging.getLogger(__name__)

PROTOCOL_VERSION = 0


class CopartitionedStickyAssignor(AbstractPartitionAssignor):
    """Assign partition numbers, not single partitions: a member gets partition N of every input topic.

    State is kept per entity, and the entity's events come from the same partition number of every input
    topic (co-partitioned topics: equal partition counts and the same partitioner). So partition N of each
    topic must go to one member, as the range assignor does and the round-robin assignor does not.

    The assignment is also sticky. Each member sends the partition numbers it owns in its join metadata, and
    the group leader leaves each number with its owner, up to a balanced share: the counts of two members
    differ by one at most. Only the numbers of members that left, and those needed to fill new members'
    shares, move. Fewer moved partitions mean fewer changelog restores at each rebalance.

    One instance serves one consumer, because it remembers that consumer's last assignment.
    """

    name = "streamer-copartitioned-sticky"
    version = PROTOCOL_VERSION

    def __init__(self) -> None:
        self.owned: list[int] = []

    def metadata(self, topics: Iterable[str]) -> ConsumerProtocolMemberMetadata:
        user_data = orjson.dumps({"owned": self.owned})
        return ConsumerProtocolMemberMetadata(self.version, sorted(topics), user_data)

    def on_assignment(self, assignment: ConsumerProtocolMemberAssignment) -> None:
        self.owned = sorted({partition for _, partitions in assignment.assignment for partition in partitions})

    def assign(self, cluster: ClusterMetadata, members: Mapping[str, ConsumerProtocolMemberMetadata]
               ) -> dict[str, ConsumerProtocolMemberAssignment]:
        subscriptions = {member: frozenset(metadata.subscription) for member, metadata in members.items()}
        if len(set(subscriptions.values())) > 1:
            # Members of one deployment subscribe to the same topics. During a change of the input topics they
            # may not, and the range assignor still keeps partition numbers together per topic.
            logger.warning("Members subscribe to different topics (%s); assigning each topic's partitions by "
                           "range instead", "; ".join(f"{member}: {sorted(topics)}"
                                                      for member, topics in sorted(subscriptions.items())))
            return RangePartitionAssignor.assign(cluster, members)
        topics = sorted(next(iter(subscriptions.values()), frozenset()))
        partitions = {topic: cluster.partitions_for_topic(topic) or set() for topic in topics}
        numbers = sorted(set().union(*partitions.values()))
        owned = {member: _decode_owned(metadata.user_data) for member, metadata in members.items()}
        numbers_of = assign_numbers(numbers, owned)
        return {member: ConsumerProtocolMemberAssignment(
                    self.version,
                    [(topic, sorted(set(numbers_of[member]) & partitions[topic])) for topic in topics],
                    b"")
                for member in members}


def assign_numbers(numbers: list[int], owned: Mapping[str, list[int]]) -> dict[str, list[int]]:
    """Give each member a balanced share of ``numbers``, keeping as many of the numbers it ``owned`` as it can.

    A number claimed by several members (a member that lost it while it was stalled claims it too) stays
    with the first of them in member order. Members that keep more of their numbers get the larger shares.
    """
    members = sorted(owned)
    if not members:
        return {}
    available = set(numbers)
    claims: dict[str, list[int]] = defaultdict(list)
    for member in members:
        for number in owned[member]:
            if number in available:
                available.discard(number)
                claims[member].append(number)
    base, extra = divmod(len(numbers), len(members))
    by_claims = sorted(members, key=lambda member: (-len(claims[member]), member))
    shares = {member: base + (1 if rank < extra else 0) for rank, member in enumerate(by_claims)}
    assigned = {member: sorted(claims[member])[:shares[member]] for member in members}
    retained = {number for numbers_kept in assigned.values() for number in numbers_kept}
    free = [number for number in numbers if number not in retained]
    for member in sorted(members, key=lambda member: (len(assigned[member]), member)):
        missing = shares[member] - len(assigned[member])
        assigned[member] += free[:missing]
        del free[:missing]
    return {member: sorted(assigned[member]) for member in members}


def _decode_owned(user_data: bytes) -> list[int]:
    """Return the partition numbers in a member's join metadata; none for metadata of another format."""
    try:
        owned = orjson.loads(user_data).get("owned", []) if user_data else []
    except (orjson.JSONDecodeError, AttributeError):
        return []
    return [number for number in owned if isinstance(number, int)] if isinstance(owned, list) else []
