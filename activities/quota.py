"""Quota activity: takes one slot of the sender's hourly and daily limits, atomically, or says when to ask again.

A slot is counted when a send is about to start (a failed send still used the provider's
quota). The count is a conditional UPDATE (`count < limit`) in one transaction for both
windows, so 50 parallel sends can never pass a limit: PostgreSQL re-checks the condition on
the locked row, SQLite has one writer. Should this local activity run twice for one send (a
worker lost after the commit), the slot is counted twice: the error is on the safe side.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection, async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession
from temporalio import activity

from activities.audit import database_error
from activities.render import STORE_ERRORS
from mailqueue.config import Settings
from mailqueue.contracts import QuotaAnswer, QuotaRequest
from mailqueue.models import SenderSettings, SenderUsage
from mailqueue.senders import sender_key

_usage = SenderUsage.__table__  # type: ignore[attr-defined]


class QuotaActivities:
    def __init__(
        self, sessions: async_sessionmaker[AsyncSession], settings: Settings, clock: Callable[[], float] = time.time
    ) -> None:
        self._sessions = sessions
        self._clock = clock
        self._hour = settings.quota_hour_seconds
        self._day = settings.quota_day_seconds

    @activity.defn(name="reserve_send_quota")
    async def reserve(self, req: QuotaRequest) -> QuotaAnswer:
        if req.sender_type != "user" or not req.sender_id:
            return QuotaAnswer(ok=True)
        try:
            return await self._reserve(req)
        except STORE_ERRORS as exc:
            raise database_error(exc) from None

    async def _reserve(self, req: QuotaRequest) -> QuotaAnswer:
        async with self._sessions() as session:
            row = await session.get(SenderSettings, req.sender_id)
            now = self._clock()
            # (label, limit, this window's key, when it ends) for each limit the sender has
            limits = [
                (label, limit, f"{label[0]}{int(now // seconds)}", (now // seconds + 1) * seconds)
                for label, seconds, limit in (("hourly", self._hour, row and row.hourly_limit), ("daily", self._day, row and row.daily_limit))
                if limit
            ]
            if not limits:
                return QuotaAnswer(ok=True)
            sender = sender_key(req.sender_type, req.sender_id)
            connection = await session.connection()
            for _, _, window, _ in limits:
                await _ensure_row(connection, sender, window)
            full: list[tuple[str, int, float]] = []
            for label, limit, window, ends in limits:
                taken = await connection.execute(
                    sa.update(_usage)
                    .where(_usage.c.sender == sender, _usage.c.window == window, _usage.c.count < limit)
                    .values(count=_usage.c.count + 1)
                )
                if taken.rowcount != 1:
                    full.append((label, limit, ends))
            if full:
                await session.rollback()  # a slot taken in the other window is given back
                label, limit, retry_at = max(full, key=lambda f: f[2])  # the window that opens last decides
                at = datetime.fromtimestamp(retry_at, UTC)
                return QuotaAnswer(ok=False, retry_at=at, detail=f"{label} limit of {limit} emails reached; next try at {at.isoformat()}")
            await session.commit()
            return QuotaAnswer(ok=True)


async def _ensure_row(connection: AsyncConnection, sender: str, window: str) -> None:
    """Create the window's counter if it is not there (two sends at once: one insert wins, quietly)."""
    insert = pg_insert if connection.dialect.name == "postgresql" else sqlite_insert
    await connection.execute(insert(_usage).values(sender=sender, window=window, count=0).on_conflict_do_nothing())
