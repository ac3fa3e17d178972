"""Logging filters, and a log of dead letters limited to one line per reason and interval."""

from __future__ import annotations

import logging
import time
from typing import Callable


class RepeatFilter(logging.Filter):
    """Pass a message of the loggers under ``prefix`` once per ``interval_s``; a later one counts the dropped copies.

    Meant for handlers: a filter on a logger does not see the records of its child loggers. Messages are
    compared after formatting their arguments; records of other loggers always pass.
    """

    def __init__(self, prefix: str, interval_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.prefix = prefix
        self.interval_s = interval_s
        self._clock = clock
        self._last: dict[tuple[str, int, str], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name != self.prefix and not record.name.startswith(self.prefix + "."):
            return True
        key = (record.name, record.levelno, record.getMessage())
        now = self._clock()
        previous = self._last.get(key)
        if previous is not None and now - previous[0] < self.interval_s:
            self._last[key] = (previous[0], previous[1] + 1)
            return False
        dropped = previous[1] if previous is not None else 0
        if dropped:
            record.msg = f"{record.getMessage()} ({dropped} identical messages in the last {now - previous[0]:.0f} s)"
            record.args = None
        if len(self._last) > 10_000:
            self._last.clear()
        self._last[key] = (now, 0)
        return True


class GroupCoordinatorLevels(logging.Filter):
    """Lower the level of aiokafka's group coordinator messages about conditions it handles on its own.

    - A failed coordinator lookup (GroupCoordinatorNotAvailable) becomes a warning instead of an error. A broker
      that has just started returns it until its offsets topic is ready, and aiokafka retries, so the first join
      of a group on a new broker usually logs one.
    - A heartbeat refused because the group is rebalancing becomes info instead of a warning, and passes only
      where the logger is enabled for info. Every member logs it at every rebalance, and the service logs the
      revocation and assignment that follow. The Java client logs the same condition at info.

    Meant for the ``aiokafka.consumer.group_coordinator`` logger itself.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.ERROR and "GroupCoordinatorNotAvailable" in record.getMessage():
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        elif record.levelno == logging.WARNING and record.getMessage().endswith("because it is rebalancing"):
            record.levelno, record.levelname = logging.INFO, "INFO"
            return logging.getLogger(record.name).isEnabledFor(logging.INFO)
        return True


class DeadLetterLog:
    """Log dead letters as warnings, at most one line per reason every ``interval_s``.

    A reason's first dead letter is logged at once, with where it came from and its error message. A later
    one is logged once ``interval_s`` has passed since that reason's last line, with the count since then.
    ``flush`` logs the counts of dead letters not logged yet, so that no dead letter goes unmentioned.
    """

    def __init__(self, logger: logging.Logger, interval_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._logger = logger
        self.interval_s = interval_s
        self._clock = clock
        self._last: dict[str, float] = {}
        self._unlogged: dict[str, int] = {}
        self._latest: dict[str, tuple[str, str]] = {}  # source and message of each reason's latest unlogged one

    def record(self, reason: str, source: str, message: str) -> None:
        """Note one dead letter of ``reason`` from ``source`` (such as ``topic[partition]@offset``)."""
        now = self._clock()
        last = self._last.get(reason)
        if last is None:
            self._last[reason] = now
            self._logger.warning("Dead letter (%s) %s: %s", reason, source, message)
            return
        self._unlogged[reason] = self._unlogged.get(reason, 0) + 1
        self._latest[reason] = (source, message)
        if now - last >= self.interval_s:
            self._log_unlogged(reason, now)

    def flush(self, force: bool = False) -> None:
        """Log the dead letters not logged yet: of every reason if ``force``, else of those past the interval."""
        if not self._unlogged:
            return
        now = self._clock()
        for reason in list(self._unlogged):
            if force or now - self._last[reason] >= self.interval_s:
                self._log_unlogged(reason, now)

    def _log_unlogged(self, reason: str, now: float) -> None:
        count = self._unlogged.pop(reason)
        source, message = self._latest.pop(reason)
        self._logger.warning("%d %s (%s) in the last %.0f s, the latest %s: %s", count,
                             "dead letter" if count == 1 else "dead letters", reason, now - self._last[reason],
                             source, message)
        self._last[reason] = now
