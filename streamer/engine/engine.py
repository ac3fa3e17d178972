"""The engine: advance many entities' recurrent state with one model call per wave."""

from __future__ import annotations

import logging
import time
from typing import Literal

import numpy as np
import torch

from streamer.engine.batch import EventBatch, StepResult
from streamer.engine.waves import plan_waves
from streamer.errors import ConfigError
from streamer.model.network import RecurrentModel
from streamer.state.arena import NO_TIME, StateArena

logger = logging.getLogger(__name__)

Semantics = Literal["stateful", "window"]
SEMANTICS = ("stateful", "window")
# Window semantics runs a wave's windows in chunks whose inputs, gates and outputs take about this many bytes.
WINDOW_CHUNK_BYTES = 256 << 20


class Engine:
    """Apply batches of events to per-entity state and return one head output per applied event.

    ``stateful`` semantics carries each entity's ``h`` (and ``c``) from event to event. ``window``
    semantics reproduces the training-time call: each output is the model over the entity's last ``seq_len``
    events from zero state, computed from a per-entity ring buffer of inputs.

    With ``idempotent`` set, an event at or below its entity's last applied offset, in the same input stream
    as that event, is a duplicate: it is neither applied nor given an output.
    """

    def __init__(self, model: RecurrentModel, semantics: Semantics = "stateful", *, capacity: int | None = None,
                 idle_expiry_ms: int | None = None, page_slots: int = 16384, idempotent: bool = True) -> None:
        if semantics not in SEMANTICS:
            raise ConfigError(f"Invalid semantics {semantics!r}: expected one of {', '.join(SEMANTICS)}")
        if semantics == "window" and not model.manifest.seq_len:
            raise ConfigError("Window semantics needs seq_len, the training window length: pass --seq-len N (a plain "
                              "state_dict carries none) or use a bundle whose manifest sets it")
        if idle_expiry_ms is not None and idle_expiry_ms <= 0:
            raise ConfigError(f"Invalid idle expiry {idle_expiry_ms} ms: expected a positive number")
        self.model = model
        self.semantics = semantics
        self.idempotent = idempotent
        self.idle_expiry_ms = idle_expiry_ms
        manifest = model.manifest
        if semantics == "stateful":
            row_shapes = {name: model.state_shape for name in model.state_names}
        else:
            row_shapes = {"window": (manifest.seq_len, manifest.input_size)}
        self.arena = StateArena(row_shapes, page_slots=page_slots, capacity=capacity, device=model.device)
        # Stream time: the largest ts applied so far in each input stream (a partition of one topic). Idle
        # expiry compares an entity with the stream time of its own stream, as partitions are read in an
        # order that depends on fetch timing, backlog and batch size.
        self.stream_time_ms: dict[int, int] = {}
        self._last_expiry_ms = NO_TIME

    def process(self, batch: EventBatch) -> StepResult:
        """Apply ``batch`` in arrival order and return predictions, step counts and the applied mask.

        Under a capacity bound, a batch with more distinct entities than the capacity is applied in
        consecutive parts that each fit, so that no part evicts an entity it still has events for.
        """
        capacity = self.arena.capacity
        if capacity is not None and len(batch) > capacity and len(set(batch.entities)) > capacity:
            return StepResult.concatenate([self._process(batch.part(start, stop))
                                           for start, stop in _parts_within(batch.entities, capacity)])
        return self._process(batch)

    def _process(self, batch: EventBatch) -> StepResult:
        n = len(batch)
        output_size = self.model.manifest.output_size
        predictions = np.full((n, output_size), np.nan, np.float32)
        steps = np.full(n, -1, np.int64)
        if n == 0:
            return StepResult(predictions, steps, np.zeros(0, bool))
        self.model.check_input_size(batch.features.shape[1])
        slots = self.arena.assign(batch.entities, batch.partitions)
        streams = batch.partitions if batch.streams is None else batch.streams
        if self.idempotent:
            # Offsets of different streams do not order their events against each other.
            applied = (batch.offsets > self.arena.last_offset[slots]) | (streams != self.arena.last_stream[slots])
        else:
            applied = np.ones(n, bool)
        every_event = bool(applied.all())
        positions = np.arange(n) if every_event else applied.nonzero()[0]
        waves = plan_waves(slots if every_event else slots[positions])
        stream_times = self._stream_times_before(batch.ts_ms, applied, streams) \
            if self.idle_expiry_ms is not None else None
        started = time.perf_counter()
        # One wave of every event, the common case, indexes with a slice, which copies no arrays.
        whole_batch = len(waves) == 1 and every_event
        step_fn = self._step_stateful if self.semantics == "stateful" else self._step_window
        with torch.inference_mode():
            for wave in waves:
                at = slice(None) if whole_batch else positions[wave]
                wave_slots = slots[at]
                resets = batch.resets[at]
                if stream_times is not None:
                    resets = resets | self._restart_expired(wave_slots, stream_times[at])
                y = step_fn(wave_slots, batch.features[at], resets)
                predictions[at] = y.cpu().numpy()
                steps[at] = self._advance_metadata(wave_slots, batch, at, resets, streams)
        inference_s = time.perf_counter() - started
        self._expire_idle()
        return StepResult(predictions, steps, applied, waves=len(waves), inference_s=inference_s)

    def _step_stateful(self, slots: np.ndarray, features: np.ndarray, resets: np.ndarray) -> torch.Tensor:
        arena = self.arena
        location = arena.locate(slots)
        state = tuple(arena.gather(name, location) for name in self.model.state_names)
        if resets.any():
            reset_rows = torch.from_numpy(np.flatnonzero(resets)).to(self.model.device)
            for tensor in state:
                tensor.index_fill_(0, reset_rows, 0.0)
        x = torch.from_numpy(features).to(self.model.device)
        new_state, y = self.model.step(x, state)
        for name, tensor in zip(self.model.state_names, new_state):
            arena.scatter(name, location, tensor)
        return y

    def _step_window(self, slots: np.ndarray, features: np.ndarray, resets: np.ndarray) -> torch.Tensor:
        manifest = self.model.manifest
        row_bytes = 4 * manifest.seq_len * (2 * manifest.input_size + 5 * manifest.hidden_size)
        chunk = max(1, WINDOW_CHUNK_BYTES // row_bytes)
        if slots.size > chunk:
            # The slots of one wave are distinct, so its rows are independent and any split gives the same outputs.
            return torch.cat([self._step_window_rows(slots[start:start + chunk], features[start:start + chunk],
                                                     resets[start:start + chunk])
                              for start in range(0, slots.size, chunk)])
        return self._step_window_rows(slots, features, resets)

    def _step_window_rows(self, slots: np.ndarray, features: np.ndarray, resets: np.ndarray) -> torch.Tensor:
        seq_len = self.model.manifest.seq_len
        ring = self.arena.gather("window", slots)
        count = np.where(resets, 0, self.arena.steps[slots])  # events in the window before this one
        rows = np.arange(slots.size)
        ring[torch.from_numpy(rows).to(ring.device), torch.from_numpy(count % seq_len).to(ring.device)] = \
            torch.from_numpy(features).to(ring.device)
        self.arena.scatter("window", slots, ring)
        lengths = np.minimum(count + 1, seq_len)
        start = np.where(count + 1 <= seq_len, 0, (count + 1) % seq_len)
        # A window not yet full starts at position 0, so the rows need only the longest window's timesteps.
        width = int(lengths.max())
        order = (start[:, None] + np.arange(width)[None, :]) % seq_len
        device = ring.device
        windows = ring[torch.from_numpy(rows).to(device)[:, None], torch.from_numpy(order).to(device)]
        return self.model.forward_windows(windows, torch.from_numpy(lengths).to(device))

    def _stream_times_before(self, ts_ms: np.ndarray, applied: np.ndarray, streams: np.ndarray) -> np.ndarray:
        """Return, for each event of a batch, the largest ``ts`` applied before it in its stream (``NO_TIME``
        if none), and advance the stream times past the batch."""
        applied_ts = np.where(applied, ts_ms, NO_TIME)
        before = np.empty_like(applied_ts)
        for stream in np.unique(streams).tolist():
            positions = np.flatnonzero(streams == stream)
            start = self.stream_time_ms.get(stream, NO_TIME)
            seen = np.maximum.accumulate(applied_ts[positions])
            before[positions[0]] = start
            before[positions[1:]] = np.maximum(seen[:-1], start)
            self.stream_time_ms[stream] = max(start, int(seen[-1]))
        return before

    def _restart_expired(self, slots: np.ndarray, stream_times: np.ndarray) -> np.ndarray:
        """Return which events find their entity expired, and forget those entities' last event times.

        An entity expires when the largest ``ts`` applied before its event in its stream exceeds its own last
        event time by more than the idle expiry. Such an event starts from zero state, as it would after
        ``_expire_idle`` had removed the entity, so outputs do not depend on where batches end.
        """
        last = self.arena.last_event_ms[slots]
        expired = (last != NO_TIME) & (last + self.idle_expiry_ms < stream_times)
        if expired.any():
            self.arena.last_event_ms[slots[expired]] = NO_TIME
            self.arena.expirations += int(np.count_nonzero(expired))
        return expired

    def _advance_metadata(self, slots: np.ndarray, batch: EventBatch, at: np.ndarray, resets: np.ndarray,
                          streams: np.ndarray) -> np.ndarray:
        arena = self.arena
        new_steps = np.where(resets, 0, arena.steps[slots]) + 1
        arena.steps[slots] = new_steps
        arena.last_offset[slots] = batch.offsets[at]
        arena.last_stream[slots] = streams[at]
        ts = batch.ts_ms[at]
        arena.last_event_ms[slots] = np.maximum(arena.last_event_ms[slots], ts)
        arena.dirty[slots] = True
        return new_steps

    def _expire_idle(self) -> None:
        """Remove idle entities from memory when event time has advanced by a tenth of the idle expiry since
        the last pass. Outputs do not depend on when this runs: see ``_restart_expired``."""
        idle_ms = self.idle_expiry_ms
        latest_ms = max(self.stream_time_ms.values(), default=NO_TIME)
        if idle_ms is None or latest_ms == NO_TIME:
            return
        if self._last_expiry_ms != NO_TIME and latest_ms - self._last_expiry_ms < max(1, idle_ms // 10):
            return
        self._last_expiry_ms = latest_ms
        expired = self.arena.expire(self.stream_time_ms, idle_ms)
        if expired:
            logger.debug("Expired %d entities idle for more than %d ms of event time", expired, idle_ms)


def _parts_within(entities: list[str], capacity: int) -> list[tuple[int, int]]:
    """Split positions into consecutive ``(start, stop)`` ranges of at most ``capacity`` distinct entities."""
    parts, seen, start = [], set(), 0
    for position, entity in enumerate(entities):
        if entity not in seen:
            if len(seen) == capacity:
                parts.append((start, position))
                seen, start = set(), position
            seen.add(entity)
    parts.append((start, len(entities)))
    return parts
