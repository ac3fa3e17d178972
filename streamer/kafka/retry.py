"""Retrying broker calls with exponential backoff, a timeout per attempt, and a log line per retry."""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable, TypeVar

from aiokafka.errors import KafkaError

from streamer.errors import BrokerError

logger = logging.getLogger(__name__)
T = TypeVar("T")

RETRIABLE = (KafkaError, asyncio.TimeoutError, OSError, BrokerError)
STOP_CHECK_INTERVAL_S = 0.1


async def retry(operation: str, call: Callable[[], Awaitable[T]], *, timeout_s: float, max_attempts: int | None = None,
                stopping: Callable[[], bool] = lambda: False, on_retry: Callable[[str], None] | None = None,
                initial_backoff_s: float = 0.1, max_backoff_s: float = 5.0) -> T:
    """Await ``call()`` with a timeout per attempt, retrying retriable failures with backoff.

    Retries until ``max_attempts`` (None means until ``stopping()`` returns True); every retry is logged at
    WARNING with its attempt number and reported to ``on_retry``. The last error is raised as ``BrokerError``.
    ``stopping()`` is also checked during the backoff, so that a stop request ends the wait within 0.1 s.
    """
    attempt = 0
    backoff = initial_backoff_s
    while True:
        attempt += 1
        try:
            return await asyncio.wait_for(call(), timeout_s)
        except RETRIABLE as error:
            retriable = getattr(error, "retriable", True)
            limit = "unlimited" if max_attempts is None else str(max_attempts)
            if not retriable or (max_attempts is not None and attempt >= max_attempts) or stopping():
                raise BrokerError(f"{operation} failed after {attempt} attempts: {error!r}") from error
            logger.warning("%s failed (attempt %d/%s), retrying in %.1f s: %r", operation, attempt, limit, backoff,
                           error)
            if on_retry is not None:
                on_retry(operation)
            resume_at = asyncio.get_running_loop().time() + backoff
            while not stopping():
                remaining_s = resume_at - asyncio.get_running_loop().time()
                if remaining_s <= 0:
                    break
                await asyncio.sleep(min(remaining_s, STOP_CHECK_INTERVAL_S))
            if stopping():
                raise BrokerError(f"{operation} stopped after {attempt} attempts: {error!r}") from error
            backoff = min(max_backoff_s, backoff * 2)
