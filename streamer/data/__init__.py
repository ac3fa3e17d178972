"""Data sets and event generators: World Bank fertility rates and synthetic streams."""

from streamer.data.fertility import (
    FEATURE_NAMES,
    build_fertility_events,
    events_to_frame,
    is_holdout_entity,
    load_fertility_events,
    load_fertility_table,
    write_events,
)

__all__ = [
    "FEATURE_NAMES",
    "build_fertility_events",
    "events_to_frame",
    "is_holdout_entity",
    "load_fertility_events",
    "load_fertility_table",
    "write_events",
]
