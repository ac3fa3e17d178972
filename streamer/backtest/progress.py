"""A terminal progress bar for replays: events done, rate and time remaining."""

from __future__ import annotations

from typing import Callable


class EventProgress:
    """Progress bar with rate and ETA, shown only when ``enabled``. The context value advances it by a count.

    ``total`` may be None when the number of events is not known in advance.
    """

    def __init__(self, description: str, total: int | None, enabled: bool) -> None:
        self._description = description
        self._total = total
        self._enabled = enabled
        self._bar = None

    def __enter__(self) -> Callable[[int], None]:
        if not self._enabled:
            return lambda count: None
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn,
                                   TimeRemainingColumn)
        from rich.text import Text

        class RateColumn(ProgressColumn):
            def render(self, task) -> Text:
                return Text(f"{task.speed or 0:,.0f} events/s")

        self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(),
                             TimeRemainingColumn(), transient=True)
        task = self._bar.add_task(self._description, total=self._total)
        self._bar.start()
        return lambda count: self._bar.advance(task, count)

    def __exit__(self, *exc_info) -> None:
        if self._bar is not None:
            self._bar.stop()
