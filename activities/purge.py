"""Purge activity: one retention run (mailqueue/retention.py), started daily by the purge Schedule."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession
from temporalio import activity

from mailqueue.blobs import BlobStore
from mailqueue.contracts import PurgeReport, PurgeRequest
from mailqueue.retention import purge


class PurgeActivities:
    def __init__(self, sessions: async_sessionmaker[AsyncSession], blobs: BlobStore) -> None:
        self._sessions = sessions
        self._blobs = blobs

    @activity.defn(name="purge_emails")
    async def purge(self, req: PurgeRequest) -> PurgeReport:
        # Each batch is committed on its own: a run that is cut short and retried starts over with
        # what is left, and deletes nothing twice.
        return await purge(
            self._sessions, self._blobs, datetime.now(UTC), req.retention_days, req.batch,
            on_batch=lambda report: activity.heartbeat(report.emails),
        )
