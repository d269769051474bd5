"""How activities fail when the database is away: one short, retryable line the workflow can read."""

from __future__ import annotations

from sqlalchemy.exc import DBAPIError
from temporalio.exceptions import ApplicationError

from mailqueue.contracts import DATABASE_ERROR


def database_error(exc: BaseException) -> ApplicationError:
    """A retryable failure that says why in one line. The workflow's local activities retry
    without limit while the database is away, and the SDK logs every failed try with its
    traceback: SQLAlchemy's would run to 12 KB each and quote the statement's parameters (the
    email itself). The driver's own first line names no password."""
    cause = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    words = (str(cause).strip().splitlines() or [""])[0][:300]
    return ApplicationError(f"database error: {type(cause).__name__}: {words}", type=DATABASE_ERROR)
