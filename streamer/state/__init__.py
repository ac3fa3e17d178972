"""Per-entity recurrent state: the arena, and later its changelog codec, snapshots and restore."""

from streamer.state.arena import NO_OFFSET, NO_TIME, RemovedEntity, StateArena

__all__ = ["NO_OFFSET", "NO_TIME", "RemovedEntity", "StateArena"]
