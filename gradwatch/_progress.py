"""A dependency-free progress bar for long checks (full mode on big models)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO

__all__ = ["ProgressBar", "resolve_progress"]

Progress = Callable[[int, int], None]


class ProgressBar:
    """Redraws one stderr line at most `rate` times a second: `label [####....] done/total`."""

    def __init__(
        self, label: str, *, stream: TextIO | None = None, rate: float = 5.0,
        unit: str = "evaluations",
    ) -> None:
        self.label = label
        self.unit = unit
        self.stream = stream if stream is not None else sys.stderr
        self.interval = 1.0 / rate
        self.last = 0.0
        self.drawn = False
        self.start = time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self.last < self.interval and done < total:
            return
        self.last = now
        fraction = done / total if total else 1.0
        filled = int(30 * fraction)
        elapsed = now - self.start
        self.stream.write(
            f"\r{self.label} [{'#' * filled}{'.' * (30 - filled)}] {done:,}/{total:,} "
            f"{self.unit}, {elapsed:.1f} s"
        )
        self.stream.flush()
        self.drawn = True

    def close(self) -> None:
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()


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
