"""Audit activity: writes the email's status and one event row per step."""

from __future__ import annotations

from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.render import STORE_ERRORS
from mailqueue.contracts import AuditEntry
from mailqueue.store import apply_audit

DATABASE_ERROR = "DatabaseError"


def database_error(exc: BaseException) -> ApplicationError:
    """A retryable failure that says why in one line. The workflow's local activities retry
    without limit while the database is away, and the SDK logs every failed try with its
    traceback: SQLAlchemy's would run to 12 KB each and quote the statement's parameters (the
    email itself). The driver's own first line names no password."""
    cause = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    words = (str(cause).strip().splitlines() or [""])[0][:300]
    return ApplicationError(f"database error: {type(cause).__name__}: {words}", type=DATABASE_ERROR)


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
