"""The state arena: per-entity recurrent state rows in preallocated pages, and the entity -> slot index.

Rows live in fixed-size pages of ``page_slots`` slots (fewer where the rows of so many slots would exceed
``MAX_PAGE_BYTES``). Growing adds a page and never copies existing rows,
so a growing arena does not pause processing in proportion to its size. Per-slot metadata lives in numpy
arrays that grow by doubling (a few bytes per slot).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from operator import itemgetter

import numpy as np
import torch

from streamer.errors import StateError

logger = logging.getLogger(__name__)

NO_TIME = np.iinfo(np.int64).min  # last event time of an entity that has seen no timestamped event
NO_OFFSET = -1  # last applied offset of an entity that has applied no event
NO_STREAM = -1  # input stream of an entity that has applied no event
MAX_PAGE_BYTES = 64 << 20  # state rows of one page at most, in bytes


@dataclass(frozen=True)
class RemovedEntity:
    """An entity dropped from the arena, with why: ``evicted``, ``expired`` or ``revoked``."""

    entity: str
    partition: int
    reason: str


# State dtypes that numpy can view without a copy.
_HOST_DTYPES = (torch.float32, torch.float64, torch.float16)


@dataclass(frozen=True)
class Location:
    """Page rows of a sequence of slots: ``(page, rows in the page, positions in the sequence or None for all)``.

    Rows and positions are numpy arrays for pages in host memory and index tensors on the device otherwise.
    """

    size: int
    parts: list[tuple[int, np.ndarray | torch.Tensor, np.ndarray | torch.Tensor | None]]


class StateArena:
    """Preallocated state rows for many entities.

    ``row_shapes`` maps each state name to the shape of one entity's row, for example
    ``{"h": (num_layers, hidden_size), "c": (num_layers, hidden_size)}``. ``capacity`` bounds the number of
    entities; when a new entity arrives at the bound, the least recently used entities not touched by the
    current batch are evicted.
    """

    def __init__(self, row_shapes: dict[str, tuple[int, ...]], *, page_slots: int = 16384,
                 capacity: int | None = None, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, max_page_bytes: int = MAX_PAGE_BYTES) -> None:
        if page_slots < 1:
            raise StateError(f"Invalid page_slots={page_slots}: expected a positive integer")
        if capacity is not None and capacity < 1:
            raise StateError(f"Invalid capacity={capacity}: expected a positive integer or None")
        self.row_shapes = dict(row_shapes)
        row_bytes = sum(math.prod(shape) for shape in self.row_shapes.values()) * dtype.itemsize
        # Large rows (long windows) get fewer slots per page, so that the first entity does not allocate
        # gigabytes for 16,384 rows.
        self.page_slots = max(1, min(page_slots, max_page_bytes // max(1, row_bytes)))
        self.capacity = capacity
        self.device = torch.device(device)
        self.dtype = dtype
        self._pages: list[dict[str, torch.Tensor]] = []
        # Pages in host memory are also viewed as numpy arrays over the same memory, because numpy's row
        # scatter took a fifth of the time of index_copy_ on the CPU (1,024 rows of 128 floats, measured).
        self._host = self.device.type == "cpu" and dtype in _HOST_DTYPES
        self._arrays: list[dict[str, np.ndarray]] = []
        self._index: dict[str, int] = {}
        self._entity_of: list[str | None] = []
        self._free: list[int] = []
        self._metadata_size = 0
        self.steps = np.zeros(0, np.int64)
        self.last_offset = np.zeros(0, np.int64)
        # The input stream (a partition of one topic) of the last applied event, whose offsets last_offset
        # can be compared with; NO_STREAM before the first.
        self.last_stream = np.zeros(0, np.int64)
        self.last_event_ms = np.zeros(0, np.int64)
        self.last_used = np.zeros(0, np.int64)
        self.partition = np.zeros(0, np.int32)
        self.occupied = np.zeros(0, bool)
        self.dirty = np.zeros(0, bool)
        self._clock = 0
        self.removed: list[RemovedEntity] = []
        self.evictions = 0
        self.expirations = 0

    # -- index -------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, entity: str) -> bool:
        return entity in self._index

    def slot_of(self, entity: str) -> int | None:
        return self._index.get(entity)

    def entity_of(self, slot: int) -> str:
        entity = self._entity_of[slot]
        if entity is None:
            raise StateError(f"Slot {slot} is free")
        return entity

    def entities(self) -> list[str]:
        return list(self._index)

    @property
    def allocated_slots(self) -> int:
        return len(self._pages) * self.page_slots

    def nbytes(self) -> int:
        """Bytes of the state pages and per-slot metadata (the Python index is not counted)."""
        pages = sum(t.numel() * t.element_size() for page in self._pages for t in page.values())
        metadata = sum(a.nbytes for a in (self.steps, self.last_offset, self.last_stream, self.last_event_ms,
                                          self.last_used,
                                          self.partition, self.occupied, self.dirty))
        return pages + metadata

    def assign(self, entities: list[str], partitions: np.ndarray | None = None) -> np.ndarray:
        """Return the slot of each entity, giving new entities zeroed slots; marks all of them used now.

        ``partitions`` (same length) records which input partition each entity's events come from.
        """
        self._clock += 1
        index = self._index
        if not entities:
            return np.zeros(0, np.int64)
        try:
            # One C-level lookup for the whole batch when every entity is known, the common case.
            slots = np.array(itemgetter(*entities)(index) if len(entities) != 1 else [index[entities[0]]],
                             np.int64).reshape(len(entities))
        except KeyError:
            slots = np.fromiter((index.get(entity, -1) for entity in entities), np.int64, len(entities))
        missing = np.flatnonzero(slots < 0)
        if missing.size:
            self.last_used[slots[slots >= 0]] = self._clock
            new_slots: list[int] = []
            for position in missing:
                entity = entities[position]
                slot = index.get(entity)
                if slot is None:
                    slot = self._new_slot()
                    index[entity] = slot
                    self._entity_of[slot] = entity
                    self.occupied[slot] = True
                    self.last_used[slot] = self._clock
                    new_slots.append(slot)
                slots[position] = slot
            self._reset_slots(np.asarray(new_slots, np.int64))
        self.last_used[slots] = self._clock
        if partitions is not None:
            self.partition[slots] = partitions
        return slots

    def _new_slot(self) -> int:
        if self.capacity is not None and len(self._index) >= self.capacity:
            self._evict_least_recently_used()
        if self._free:
            return self._free.pop()
        slot = len(self._entity_of)
        if slot >= self.allocated_slots:
            self._add_page()
        if slot >= self._metadata_size:
            self._grow_metadata(max(self.page_slots, 2 * self._metadata_size))
        self._entity_of.append(None)
        return slot

    def _add_page(self) -> None:
        page = {name: torch.zeros(self.page_slots, *shape, dtype=self.dtype, device=self.device)
                for name, shape in self.row_shapes.items()}
        self._pages.append(page)
        if self._host:
            self._arrays.append({name: tensor.numpy() for name, tensor in page.items()})
        logger.debug("State arena grew to %d pages (%d slots)", len(self._pages), self.allocated_slots)

    def _grow_metadata(self, size: int) -> None:
        def grown(array: np.ndarray, fill) -> np.ndarray:
            out = np.full(size, fill, array.dtype)
            out[: array.size] = array
            return out

        self.steps = grown(self.steps, 0)
        self.last_offset = grown(self.last_offset, NO_OFFSET)
        self.last_stream = grown(self.last_stream, NO_STREAM)
        self.last_event_ms = grown(self.last_event_ms, NO_TIME)
        self.last_used = grown(self.last_used, 0)
        self.partition = grown(self.partition, -1)
        self.occupied = grown(self.occupied, False)
        self.dirty = grown(self.dirty, False)
        self._metadata_size = size

    def _evict_least_recently_used(self) -> None:
        """Evict about 1 % of the capacity (at least one entity), oldest first, sparing the current batch."""
        candidates = np.flatnonzero(self.occupied & (self.last_used < self._clock))
        if candidates.size == 0:
            raise StateError(
                f"State capacity {self.capacity} is smaller than the number of distinct entities in one batch; "
                "raise the capacity or lower the batch size"
            )
        count = min(candidates.size, max(1, self.capacity // 100))
        oldest = candidates[np.argpartition(self.last_used[candidates], count - 1)[:count]]
        self._remove(oldest, "evicted")
        self.evictions += int(oldest.size)

    # -- rows --------------------------------------------------------------------------------------------

    def locate(self, slots: np.ndarray) -> Location:
        """Find the page rows of ``slots``, for several ``gather`` and ``scatter`` calls on the same slots."""
        if len(self._pages) <= 1:
            return Location(slots.size, [(0, self._index_rows(slots), None)])
        pages = slots // self.page_slots
        rows = slots - pages * self.page_slots
        if slots.size == 0 or pages.min() == pages.max():
            page = int(pages[0]) if slots.size else 0
            return Location(slots.size, [(page, self._index_rows(rows), None)])
        parts = []
        for page in np.unique(pages):
            positions = np.flatnonzero(pages == page)
            parts.append((int(page), self._index_rows(rows[positions]), self._index_rows(positions)))
        return Location(slots.size, parts)

    def _index_rows(self, rows: np.ndarray) -> np.ndarray | torch.Tensor:
        return rows if self._host else torch.from_numpy(rows).to(self.device)

    def gather(self, name: str, slots: np.ndarray | Location) -> torch.Tensor:
        """Copy the rows of ``slots`` into a new (len(slots), *row_shape) tensor."""
        location = slots if isinstance(slots, Location) else self.locate(slots)
        parts = location.parts
        if not self._pages:
            return torch.empty(0, *self.row_shapes[name], dtype=self.dtype, device=self.device)
        if self._host:
            if len(parts) == 1 and parts[0][2] is None:
                page, rows, _ = parts[0]
                return torch.from_numpy(self._arrays[page][name].take(rows, axis=0))
            out = np.empty((location.size, *self.row_shapes[name]), self._arrays[0][name].dtype)
            for page, rows, positions in parts:
                out[positions] = self._arrays[page][name].take(rows, axis=0)
            return torch.from_numpy(out)
        if len(parts) == 1 and parts[0][2] is None:
            page, rows, _ = parts[0]
            return self._pages[page][name].index_select(0, rows)
        out = torch.empty(location.size, *self.row_shapes[name], dtype=self.dtype, device=self.device)
        for page, rows, positions in parts:
            out.index_copy_(0, positions, self._pages[page][name].index_select(0, rows))
        return out

    def scatter(self, name: str, slots: np.ndarray | Location, values: torch.Tensor) -> None:
        """Write ``values`` (len(slots), *row_shape) into the rows of ``slots``."""
        location = slots if isinstance(slots, Location) else self.locate(slots)
        if location.size == 0:
            return  # an arena without pages has no rows to write, and nothing is to be written
        if self._host:
            source = values.detach().to("cpu", self.dtype).numpy()
            for page, rows, positions in location.parts:
                self._arrays[page][name][rows] = source if positions is None else source[positions]
            return
        for page, rows, positions in location.parts:
            source = values if positions is None else values.index_select(0, positions)
            self._pages[page][name].index_copy_(0, rows, source.to(self.dtype))

    def _reset_slots(self, slots: np.ndarray) -> None:
        if slots.size == 0:
            return
        # Zeroing in place needs no temporary tensor as large as the rows, which would raise the peak memory.
        location = self.locate(slots)
        for name in self.row_shapes:
            for page, rows, _ in location.parts:
                if self._host:
                    self._arrays[page][name][rows] = 0.0
                else:
                    self._pages[page][name].index_fill_(0, rows, 0.0)
        self.steps[slots] = 0
        self.last_offset[slots] = NO_OFFSET
        self.last_stream[slots] = NO_STREAM
        self.last_event_ms[slots] = NO_TIME
        self.dirty[slots] = False

    # -- removal -----------------------------------------------------------------------------------------

    def _remove(self, slots: np.ndarray, reason: str) -> None:
        for slot in slots.tolist():
            entity = self._entity_of[slot]
            if entity is None:
                continue
            del self._index[entity]
            self._entity_of[slot] = None
            self._free.append(slot)
            self.removed.append(RemovedEntity(entity, int(self.partition[slot]), reason))
        self.occupied[slots] = False
        self.dirty[slots] = False

    def expire(self, stream_time_ms: dict[int, int], idle_ms: int) -> int:
        """Remove entities whose last event time is more than ``idle_ms`` before the time of the stream of
        their last applied event (``stream_time_ms``: stream -> time); return the count."""
        size = len(self._entity_of)
        seen = self.last_event_ms[:size]
        streams = self.last_stream[:size]
        cutoff = np.full(size, NO_TIME, np.int64)  # nothing is older than NO_TIME
        for stream, time_ms in stream_time_ms.items():
            if time_ms != NO_TIME:
                cutoff[streams == stream] = time_ms - idle_ms
        idle = np.flatnonzero(self.occupied[:size] & (seen != NO_TIME) & (seen < cutoff))
        self._remove(idle, "expired")
        self.expirations += int(idle.size)
        return int(idle.size)

    def remove_partitions(self, partitions: set[int] | list[int]) -> int:
        """Drop every entity whose events come from one of ``partitions``; return the count."""
        used = self.occupied[: len(self._entity_of)]
        slots = np.flatnonzero(used & np.isin(self.partition[: len(self._entity_of)], list(partitions)))
        self._remove(slots, "revoked")
        return int(slots.size)

    def drain_removed(self) -> list[RemovedEntity]:
        """Return and forget the entities removed since the last call."""
        removed, self.removed = self.removed, []
        return removed

    def occupied_slots(self, partition: int | None = None) -> np.ndarray:
        used = self.occupied[: len(self._entity_of)]
        if partition is not None:
            used = used & (self.partition[: len(self._entity_of)] == partition)
        return np.flatnonzero(used)

    # -- durable state -----------------------------------------------------------------------------------

    def dirty_slots(self) -> np.ndarray:
        """Slots changed since their state was last written to the changelog."""
        size = len(self._entity_of)
        return np.flatnonzero(self.dirty[:size] & self.occupied[:size])

    def export_rows(self, slots: np.ndarray) -> np.ndarray:
        """Copy the rows of ``slots`` into a CPU float32 array of shape (len(slots), floats per entity)."""
        parts = [self.gather(name, slots).reshape(slots.size, int(np.prod(shape)))
                 for name, shape in self.row_shapes.items()]
        return torch.cat(parts, 1).detach().to("cpu", torch.float32).numpy()

    def load(self, entities: list[str], partition: int, steps: np.ndarray, last_offsets: np.ndarray,
             last_event_ms: np.ndarray, rows: dict[str, np.ndarray]) -> np.ndarray:
        """Insert or overwrite restored entities of one partition; they start clean (not dirty)."""
        slots = self.assign(entities, np.full(len(entities), partition, np.int32))
        for name, values in rows.items():
            self.scatter(name, slots, torch.from_numpy(np.ascontiguousarray(values)).to(self.device))
        self.steps[slots] = steps
        self.last_offset[slots] = last_offsets
        self.last_stream[slots] = partition  # a changelog serves one input topic, whose stream is the partition
        self.last_event_ms[slots] = last_event_ms
        self.dirty[slots] = False
        return slots

    def remove_entities(self, entities: list[str], reason: str = "deleted") -> int:
        """Remove the given entities if present; return how many were removed. Nothing is reported."""
        slots = np.asarray([slot for slot in map(self._index.get, entities) if slot is not None], np.int64)
        before = len(self.removed)
        self._remove(slots, reason)
        del self.removed[before:]
        return int(slots.size)
