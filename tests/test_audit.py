"""The audit step while the database is away: a short, retryable failure that quotes no email."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlalchemy.exc import OperationalError
from temporalio.exceptions import ApplicationError

from activities.audit import AuditActivities
from activities.failures import database_error
from mailqueue.contracts import DATABASE_ERROR
from mailqueue.contracts import AuditEntry, EventType
from mailqueue.db import create_engine, sessionmaker
from tests.helpers import UNREACHABLE_DATABASE, make_spec


def test_a_database_error_is_one_line_without_the_statement_or_its_parameters() -> None:
    secret_body = "<p>Your password reset code is 424242</p>"
    exc = OperationalError(
        "UPDATE emails SET html=%(html)s", {"html": secret_body},
        Exception('connection to server at "127.0.0.1", port 5432 failed: FATAL:  database "x" is not accepting connections\nDETAIL: more'),
    )
    err = database_error(exc)
    assert err.type == DATABASE_ERROR and not err.non_retryable
    assert "424242" not in err.message and "UPDATE" not in err.message and "\n" not in err.message
    assert err.message.startswith("database error: Exception: connection to server at")


async def test_the_audit_step_fails_short_and_retryable_while_the_database_is_away() -> None:
    engine = create_engine(UNREACHABLE_DATABASE)
    spec = make_spec(subject="Reset code 424242")
    entry = AuditEntry(email_id=spec.email_id, event_id="e1", event=EventType.QUEUED, at=datetime.now(UTC), spec=spec)
    try:
        with pytest.raises(ApplicationError) as caught:
            await AuditActivities(sessionmaker(engine)).record(entry)
    finally:
        await engine.dispose()
    err = caught.value
    assert err.type == DATABASE_ERROR and not err.non_retryable
    assert err.__cause__ is None and err.__suppress_context__  # the SDK logs this traceback on every try: ours only
    assert "424242" not in err.message and len(err.message) < 400, err.message
