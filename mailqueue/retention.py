"""Retention: final emails past MAILQUEUE_RETENTION_DAYS are deleted with everything that is theirs.

What goes with an email is what the schema hangs on it (ON DELETE CASCADE, migrations 0001, 0007,
0014): its events, their event feed rows, its recipient rows and its attachment rows; its rendered
body and its Idempotency-Key are columns of the email row itself. The stored files it sent go
afterwards, once no email names them (mailqueue.blobs.purge_blobs). Emails that are not final
(queued, scheduled, deferred, paused, sending, retrying) and suppressions are never touched.

The event feed keeps its order: the remaining rows keep their (xid, seq), and a seq is never given
out again (a PostgreSQL sequence; AUTOINCREMENT on SQLite), so a cursor that pointed at a deleted
row still sorts every later event after it (readers compare cursors, they never look one up).

Work goes in batches of at most `batch` emails, each its own short transaction. Two purges may run
at once (two workers' schedules, a manual run) and each counts only what it deleted itself, so their
reports add up to what went: a batch takes its rows with FOR UPDATE SKIP LOCKED (PostgreSQL; SQLite
has one writer at a time anyway), so the two take different emails without waiting for each other;
its counts are the DELETEs' own row counts, with the conditions repeated in them (purge_blobs' too);
and the file step runs one purge at a time under a transaction-scoped advisory lock.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from mailqueue.blobs import BlobStore, purge_blobs
from mailqueue.contracts import FINAL, PurgeReport, status_values
from mailqueue.models import Email, EmailEvent, MaintenanceRun, utcnow

log = logging.getLogger("mailqueue.retention")

JOB = "purge"  # maintenance_runs.job of the purge's reports
# pg_advisory_xact_lock's key for the blob step (any fixed number no other lock of ours uses):
# purge_blobs reads, then deletes (counting what its delete removed): two purges at once would pick
# the same blobs and one would find them gone; one at a time, each batch is a full one.
_BLOBS_LOCK = 0x6D71_7267  # "mqrg"


def cutoff_for(now: datetime, retention_days: int) -> datetime:
    return now - timedelta(days=retention_days)


async def purge(
    sessions: async_sessionmaker[AsyncSession],
    blobs: BlobStore,
    now: datetime,
    retention_days: int,
    batch: int,
    on_batch: Callable[[PurgeReport], object] | None = None,
) -> PurgeReport:
    """Delete the final emails whose last change (updated_at) is older than `retention_days` before
    `now`, with their rows, then the stored files no email names; record and log what went.
    `on_batch` hears the report so far after each batch (the activity heartbeats with it).
    `retention_days` 0: retention is off, nothing is deleted."""
    report = PurgeReport(started_at=utcnow())
    if retention_days > 0:
        report.cutoff = cutoff_for(now, retention_days)
        while True:
            async with sessions() as session:
                emails, events = await _purge_batch(session, report.cutoff, batch)
            if not emails:
                break
            report.emails, report.events, report.batches = report.emails + emails, report.events + events, report.batches + 1
            if on_batch is not None:
                on_batch(report)
        report.blobs = await _purge_unused_blobs(sessions, blobs, now, batch)
    report.finished_at = utcnow()
    async with sessions() as session:
        session.add(MaintenanceRun(
            id=str(uuid.uuid4()), job=JOB, started_at=report.started_at, finished_at=report.finished_at, cutoff=report.cutoff,
            emails=report.emails, events=report.events, blobs=report.blobs, batches=report.batches,
        ))
        await session.commit()
    log.info(
        "purge: %d emails, %d events, %d blobs deleted in %d batches (final emails unchanged since %s)",
        report.emails, report.events, report.blobs, report.batches, report.cutoff.isoformat() if report.cutoff else "-",
        extra={"purge": {"emails": report.emails, "events": report.events, "blobs": report.blobs, "batches": report.batches}},
    )
    return report


async def last_run(session: AsyncSession) -> MaintenanceRun | None:
    """The report of the purge that finished last (whichever worker ran it)."""
    query = select(MaintenanceRun).where(col(MaintenanceRun.job) == JOB).order_by(col(MaintenanceRun.finished_at).desc()).limit(1)
    return (await session.exec(query)).first()


async def _purge_batch(session: AsyncSession, cutoff: datetime, batch: int) -> tuple[int, int]:
    """One transaction: at most `batch` emails and their rows. Returns (emails, events) deleted."""
    emails, events = Email.__table__, EmailEvent.__table__  # type: ignore[attr-defined]
    expired = (emails.c.status.in_(status_values(FINAL)), emails.c.updated_at < cutoff)
    conn = await session.connection()
    # Locked until commit: no event can be added to them meanwhile (its foreign key waits), and a
    # purge running at the same time skips them rather than counting them too.
    ids = list((await conn.execute(
        sa.select(emails.c.id).where(*expired).limit(batch).with_for_update(skip_locked=True)
    )).scalars())
    if not ids:
        await session.commit()
        return 0, 0
    # The conditions again in both deletes, so the counts are exactly of what went. The events
    # explicitly (to count them; their feed rows go with them), the rest by the emails' cascades.
    still = sa.select(emails.c.id).where(emails.c.id.in_(ids), *expired)
    event_count = (await conn.execute(sa.delete(events).where(events.c.email_id.in_(still)))).rowcount
    email_count = (await conn.execute(sa.delete(emails).where(emails.c.id.in_(ids), *expired))).rowcount
    await session.commit()
    return email_count, event_count


async def _purge_unused_blobs(sessions: async_sessionmaker[AsyncSession], store: BlobStore, now: datetime, batch: int) -> int:
    """The files no email names any more (those of the emails just deleted, and any left over)."""
    total, refused = 0, 0
    while True:
        async with sessions() as session:
            conn = await session.connection()
            if conn.dialect.name == "postgresql":  # released by purge_blobs' commit
                await conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_BLOBS_LOCK)))
            try:
                went = await purge_blobs(session, store, now, limit=batch)
            except IntegrityError:
                # An email came to name one of them meanwhile: that one stays (the next round does not
                # pick it), the others go then. More than a few in a row is not that: let it fail.
                await session.rollback()
                refused += 1
                if refused > 3:
                    raise
                continue
        total += went
        if went < batch:
            return total
