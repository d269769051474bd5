"""Quota activity: takes one slot of the sender's hourly and daily limits, atomically, or says when to ask again.

A slot is counted when a send is about to start (a failed send still used the provider's
quota). A limit is the lower of the user's own (their mail settings) and the ceiling an admin set
on the user. The count is a conditional UPDATE (mailqueue.usage) in one transaction for both
windows, so 50 parallel sends can never pass a limit: PostgreSQL re-checks the condition on
the locked row, SQLite has one writer. Should this local activity run twice for one send (a
worker lost after the commit), the slot is counted twice: the error is on the safe side.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime

from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession
from temporalio import activity

from activities.failures import database_error
from mailqueue.config import Settings
from mailqueue.contracts import QuotaAnswer, QuotaRequest, SenderType
from mailqueue.db import STORE_ERRORS
from mailqueue.metrics import WorkerMetrics
from mailqueue.senders import resolve_sender, sender_key
from mailqueue.usage import Window, take


class QuotaActivities:
    def __init__(
        self, sessions: async_sessionmaker[AsyncSession], settings: Settings, clock: Callable[[], float] = time.time,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self._sessions = sessions
        self._metrics = metrics or WorkerMetrics()
        self._settings = settings
        self._clock = clock  # decides the windows (tests pass one they move by hand)
        self._hour = settings.quota_hour_seconds
        self._day = settings.quota_day_seconds

    @activity.defn(name="reserve_send_quota")
    async def reserve(self, req: QuotaRequest) -> QuotaAnswer:
        if req.sender_type != SenderType.USER or not req.sender_id:
            return QuotaAnswer(ok=True)
        try:
            return await self._reserve(req)
        except STORE_ERRORS as exc:
            raise database_error(exc) from None

    async def _reserve(self, req: QuotaRequest) -> QuotaAnswer:
        async with self._sessions() as session:
            route = await resolve_sender(session, self._settings, req.sender_type, req.sender_id)
            now = self._clock()
            # Real time minus the clock's: 0 with the real clock (to the microsecond).
            skew = time.time() - now
            # (label, limit, this window) for each limit the sender has: the lower of their own and
            # their admin's ceiling (resolve_sender decides that)
            limits = [
                (label, limit, Window.at(label[0], now, seconds))
                for label, seconds, limit in (("hourly", self._hour, route.hourly_limit), ("daily", self._day, route.daily_limit))
                if limit
            ]
            if not limits:
                return QuotaAnswer(ok=True)
            sender = sender_key(req.sender_type, req.sender_id)
            connection = await session.connection()
            full: list[tuple[str, int, float]] = []
            for label, limit, window in limits:
                if not await take(connection, sender, window.key, 1, limit):
                    full.append((label, limit, window.ends))
            if full:
                await session.rollback()  # a slot taken in the other window is given back
                label, limit, ends = max(full, key=lambda f: f[2])  # the window that opens last decides
                self._metrics.deferred(label)
                # Said in real time, which the workflow's durable timer runs on: with the real clock
                # the window's end itself; with another, the window's remaining length from now.
                at = datetime.fromtimestamp(round(ends + skew, 3), UTC)
                return QuotaAnswer(ok=False, retry_at=at, detail=f"{label} limit of {limit} emails reached; next try at {at.isoformat()}")
            await session.commit()
            return QuotaAnswer(ok=True)

