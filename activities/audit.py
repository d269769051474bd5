"""Audit activity: writes the email's status and one event row per step."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession
from temporalio import activity

from activities.failures import database_error
from mailqueue.contracts import AuditEntry
from mailqueue.db import STORE_ERRORS
from mailqueue.email_store import apply_audit


class AuditActivities:
    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions

    @activity.defn(name="record_email_event")
    async def record(self, entry: AuditEntry) -> None:
        try:
            async with self._sessions() as session:
                await apply_audit(session, entry)
        except STORE_ERRORS as exc:
            raise database_error(exc) from None
