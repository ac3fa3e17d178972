"""Batch planning and stepping: waves, stateful and window semantics."""

from streamer.engine.batch import EventBatch, StepResult
from streamer.engine.engine import SEMANTICS, Engine
from streamer.engine.waves import plan_waves

__all__ = ["SEMANTICS", "Engine", "EventBatch", "StepResult", "plan_waves"]
