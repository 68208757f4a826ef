"""A dependency-free progress bar for long loops: a check in full mode, the demo's training.

In a terminal the bar is one line redrawn with ``\\r``. Anywhere else (a CI log, a pipe, a file)
every ``\\r`` redraw would stay in the log as a fragment, so the bar writes plain lines instead,
a few per loop. Elapsed time counts from the bar's creation: one bar serves the whole loop.

Imports: nothing else of gradwatch.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO

__all__ = ["ProgressBar", "resolve_progress"]

Progress = Callable[[int, int], None]
Clock = Callable[[], float]

#: characters in the bar between the brackets
_WIDTH = 30


def _is_terminal(stream: TextIO) -> bool:
    """Whether `stream` is an interactive terminal, where a ``\\r`` redraw replaces a line."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


class ProgressBar:
    """`label [####....] done/total unit, elapsed` on `stream` (default stderr).

    In a terminal one line is redrawn, at most `rate` times a second. Elsewhere a plain line is
    written each time another 1/`lines` of the total is done, so a loop of any length leaves at
    most `lines` progress lines in a log. `note` writes a line of its own (a check's result)
    in both cases. `clock` (default `time.monotonic`) is passed in so tests can drive it.

    Example:
        >>> import io
        >>> log = io.StringIO()  # not a terminal: plain lines, no carriage returns
        >>> bar = ProgressBar("training", stream=log, unit="steps", lines=2, clock=lambda: 0.0)
        >>> for step in range(1, 101):
        ...     bar(step, 100)
        >>> print(log.getvalue(), end="")
        training [###############...............] 50/100 steps, 0.0 s
        training [##############################] 100/100 steps, 0.0 s
    """

    def __init__(
        self, label: str, *, stream: TextIO | None = None, rate: float = 5.0,
        unit: str = "evaluations", lines: int = 10, clock: Clock = time.monotonic,
    ) -> None:
        self.label = label
        self.unit = unit
        self.stream = stream if stream is not None else sys.stderr
        self.terminal = _is_terminal(self.stream)
        self.interval = 1.0 / rate
        self.lines = max(1, lines)
        self.clock = clock
        self.start = clock()
        self.last = -math.inf  # the first call draws at once
        self.reported = 0  # outside a terminal: the last 1/`lines` fraction written
        self.width = 0  # the length of the drawn line, to blank what a shorter one leaves
        self.open = False  # a drawn line waits for its newline

    @property
    def elapsed(self) -> float:
        """Seconds since the bar was created: the whole loop's time, not the last stretch's."""
        return self.clock() - self.start

    def __call__(self, done: int, total: int) -> None:
        if self.terminal:
            self._redraw(done, total)
        else:
            self._line(done, total)

    def note(self, text: str) -> None:
        """Write `text` as lines of their own; in a terminal the bar comes back below them."""
        self._end_line()
        self.stream.write(text if text.endswith("\n") else text + "\n")
        self.stream.flush()
        self.last = -math.inf  # redraw the bar on the next call, not a rate interval later

    def close(self) -> None:
        self._end_line()

    def _redraw(self, done: int, total: int) -> None:
        now = self.clock()
        if now - self.last < self.interval and done < total:
            return
        self.last = now
        text = self._text(done, total, now)
        self.stream.write("\r" + text.ljust(self.width))
        self.stream.flush()
        self.width = len(text)
        self.open = True

    def _line(self, done: int, total: int) -> None:
        # a line at each 1/`lines` of the total: the count written is bounded, whatever `total`
        reached = done * self.lines // total if total else self.lines
        if reached <= self.reported:
            return
        self.reported = reached
        self.stream.write(self._text(done, total, self.clock()) + "\n")
        self.stream.flush()

    def _text(self, done: int, total: int, now: float) -> str:
        fraction = min(1.0, done / total) if total else 1.0
        filled = int(_WIDTH * fraction)
        return (f"{self.label} [{'#' * filled}{'.' * (_WIDTH - filled)}] {done:,}/{total:,} "
                f"{self.unit}, {now - self.start:.1f} s")

    def _end_line(self) -> None:
        if self.open:
            self.stream.write("\n")
            self.stream.flush()
            self.open = False
            self.width = 0


@contextmanager
def resolve_progress(progress: bool | Progress | None, label: str) -> Iterator[Progress | None]:
    """`True` → a ProgressBar on stderr, a callable → itself, falsy → None."""
    if progress is True:
        bar = ProgressBar(label)
        try:
            yield bar
        finally:
            bar.close()
    elif callable(progress):
        yield progress
    else:
        yield None
