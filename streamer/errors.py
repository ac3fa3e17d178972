"""The exception hierarchy: one root, typed subclasses, each with a reason code.

Reason codes are stable identifiers used in dead-letter headers and metric labels, so callers branch on
``error.reason`` and never on message text.
"""

from __future__ import annotations


class StreamerError(Exception):
    """Root of every error raised by streamer.

    ``reason`` is a short stable code; ``retriable`` tells a caller whether the same call may succeed later.
    """

    reason: str = "error"
    retriable: bool = False

    def __init__(self, message: str, *, reason: str | None = None, retriable: bool | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason
        if retriable is not None:
            self.retriable = retriable


class ConfigError(StreamerError, ValueError):
    """Invalid settings: a flag, an environment variable or a settings file."""

    reason = "invalid_config"


class ModelError(StreamerError, ValueError):
    """A model file or manifest that cannot be served."""

    reason = "invalid_model"


class InvalidEventError(StreamerError, ValueError):
    """An input record that cannot become an event; it goes to the dead-letter output, never into state."""

    reason = "invalid_event"


class StateError(StreamerError, RuntimeError):
    """A state record or snapshot that cannot be restored, or an arena invariant that does not hold."""

    reason = "invalid_state"


class BrokerError(StreamerError, RuntimeError):
    """A Kafka operation that failed or timed out."""

    reason = "broker_error"
    retriable = True


class FencedError(BrokerError):
    """This instance's transactional producer was fenced by a newer one with the same transactional id."""

    reason = "producer_fenced"
    retriable = False


# Reason codes of InvalidEventError, one per kind of bad input.
RECORD_TOO_LARGE = "record_too_large"
INVALID_UTF8 = "invalid_utf8"
INVALID_JSON = "invalid_json"
NOT_AN_OBJECT = "not_an_object"
MISSING_ENTITY = "missing_entity"
INVALID_ENTITY = "invalid_entity"
MISSING_FEATURES = "missing_features"
INVALID_FEATURES = "invalid_features"
FEATURE_COUNT = "feature_count"
NON_FINITE_FEATURE = "non_finite_feature"
INVALID_TIMESTAMP = "invalid_timestamp"
INVALID_RESET = "invalid_reset"
INVALID_TARGET = "invalid_target"
INVALID_CSV_ROW = "invalid_csv_row"

INVALID_EVENT_REASONS = (
    RECORD_TOO_LARGE,
    INVALID_UTF8,
    INVALID_JSON,
    NOT_AN_OBJECT,
    MISSING_ENTITY,
    INVALID_ENTITY,
    MISSING_FEATURES,
    INVALID_FEATURES,
    FEATURE_COUNT,
    NON_FINITE_FEATURE,
    INVALID_TIMESTAMP,
    INVALID_RESET,
    INVALID_TARGET,
    INVALID_CSV_ROW,
)
