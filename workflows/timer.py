"""A durable timer whose deadline can move, or that can be stopped, while it sleeps."""

from __future__ import annotations

from datetime import datetime

from temporalio import workflow


class UpdatableTimer:
    def __init__(self, deadline: datetime | None) -> None:
        self._deadline = deadline
        self._changed = False
        self._stopped = False

    @property
    def deadline(self) -> datetime | None:
        return self._deadline

    def move(self, deadline: datetime) -> None:
        self._deadline = deadline
        self._changed = True

    def stop(self) -> None:
        self._stopped = True
        self._changed = True

    async def sleep(self) -> bool:
        """Sleep until the deadline: True when it is reached, False when stopped first."""
        while not self._stopped:
            if self._deadline is None:
                return True
            remaining = (self._deadline - workflow.now()).total_seconds()
            if remaining <= 0:
                return True
            self._changed = False
            try:
                await workflow.wait_condition(lambda: self._changed, timeout=remaining)
            except TimeoutError:
                pass  # loop: the deadline may have moved while the timer fired
        return False
