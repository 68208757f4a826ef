"""When a check is due: every N optimizer steps, or on a wall-clock schedule.

Wall-clock schedules ("30min", "2h", a cron expression) run on an APScheduler
`BackgroundScheduler` whose only job is to *mark* a check as due; the check itself always runs on
the training thread at the next step boundary. The scheduler's thread is a daemon and is shut
down at train end, so it never keeps a process alive. What `every=` may be, and how it reads, is
the record's (`gradwatch.record.layout.parse_every`: the param `gradwatch.every` holds it).

Imports: gradwatch.record (the layout: what `every=` means).
"""

from __future__ import annotations

import threading
from typing import Any

from gradwatch.record.layout import Every

__all__ = ["Schedule"]


class Schedule:
    """Decides, at each step boundary, whether a check is due."""

    def __init__(self, every: Every, *, first_step: bool) -> None:
        self.every = every
        self.first_step = first_step
        self._marked = threading.Event()
        self._scheduler: Any = None

    def start(self) -> None:
        """Start the wall-clock scheduler (no-op for step schedules, idempotent)."""
        if self.every.steps is not None or self._scheduler is not None:
            return
        from apscheduler.schedulers.background import BackgroundScheduler
        from apscheduler.triggers.cron import CronTrigger
        from apscheduler.triggers.interval import IntervalTrigger

        trigger = (
            IntervalTrigger(seconds=self.every.seconds)
            if self.every.seconds is not None
            else CronTrigger.from_crontab(str(self.every.cron))
        )
        scheduler = BackgroundScheduler(daemon=True)
        scheduler.add_job(
            self._marked.set, trigger, id="gradwatch-due", max_instances=1, coalesce=True,
            misfire_grace_time=None,
        )
        scheduler.start()
        self._scheduler = scheduler

    def __getstate__(self) -> dict[str, Any]:
        # Picklable (Lightning's ddp_spawn, notebooks): a pending mark and the scheduler
        # thread belong to this process; the copy starts its own scheduler.
        state = dict(self.__dict__)
        state["_marked"] = self._marked.is_set()
        state["_scheduler"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        marked = state.pop("_marked")
        self.__dict__.update(state)
        self._marked = threading.Event()
        if marked:
            self._marked.set()

    def shutdown(self) -> None:
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)
            self._scheduler = None

    def mark_due(self) -> None:
        """Make the next step boundary run a check (what the wall-clock job does)."""
        self._marked.set()

    def due(self, step: int, last_checked: int | None) -> bool:
        """Is a check due at `step`? Consumes a wall-clock mark."""
        if last_checked == step:
            return False  # once per optimizer step, whatever the accumulation
        if self.first_step and last_checked is None:
            return True
        if self.every.steps is not None:
            # A multiple of `every` reached or jumped over (a global step may advance by more
            # than one, e.g. two optimizers stepping per batch).
            previous = last_checked if last_checked is not None else 0
            return step // self.every.steps > previous // self.every.steps
        if self._marked.is_set():
            self._marked.clear()
            return True
        return False

    def next_due(self, last_checked: int | None) -> int:
        """The first step at which `due` can be True (0: any step, ask `due` each time).

        Example:
            >>> schedule = Schedule(Every(steps=1000), first_step=False)
            >>> schedule.next_due(None), schedule.next_due(1), schedule.next_due(2000)
            (1000, 1000, 3000)
        """
        if self.every.steps is None or (self.first_step and last_checked is None):
            return 0
        previous = last_checked if last_checked is not None else 0
        return (previous // self.every.steps + 1) * self.every.steps

    @property
    def running(self) -> bool:
        return self._scheduler is not None
