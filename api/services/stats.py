"""What the queue holds, what it did lately, and what looks stuck: per caller (admins: everyone)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from collections import Counter
from typing import Any

import sqlalchemy as sa
from sqlmodel import col, select

from api.schemas.stats import StatsOut, StuckEmail
from api.schemas.stats import LastPurge
from mailqueue import retention
from api.services.context import Context
from api.services.emails import visible_to
from mailqueue.contracts import IN_FLIGHT, WAITING, WENT_OUT, EventType, status_values
from mailqueue.models import Email, EmailEvent, utcnow

# An email in flight with no change for this long is stuck (/v1/stats' default, and /metrics').
STUCK_AFTER_SECONDS = 300


async def sends_per_minute(ctx: Context, minutes: int = 60, now: datetime | None = None) -> list[int]:
    """How many `sent` events each of the last `minutes` minutes saw (the caller's emails), oldest first."""
    now = now or utcnow()
    start = now.replace(second=0, microsecond=0) - timedelta(minutes=minutes - 1)
    query = (
        select(EmailEvent.created_at)
        .join(Email, col(Email.id) == col(EmailEvent.email_id))
        .where(*visible_to(ctx.principal), col(EmailEvent.event) == EventType.SENT.value, col(EmailEvent.created_at) >= start)
    )
    seen: Counter[int] = Counter()
    for at in (await ctx.session.exec(query)).all():
        at = at if at.tzinfo else at.replace(tzinfo=start.tzinfo)
        seen[int((at - start).total_seconds() // 60)] += 1
    return [seen.get(i, 0) for i in range(minutes)]


async def stats(ctx: Context, stuck_after_seconds: int) -> StatsOut:
    session = ctx.session
    mine = visible_to(ctx.principal)
    now = utcnow()
    rows = (await session.exec(select(Email.status, sa.func.count()).where(*mine).group_by(Email.status))).all()
    by_status: dict[str, int] = {status: count for status, count in rows}

    async def count(*where: Any) -> int:
        return (await session.exec(select(sa.func.count()).select_from(Email).where(*mine, *where))).one()

    stale = now - timedelta(seconds=stuck_after_seconds)
    in_flight = col(Email.status).in_(status_values(IN_FLIGHT))
    stuck_rows = (
        await session.exec(select(Email).where(*mine, in_flight, col(Email.updated_at) < stale).order_by(col(Email.updated_at)).limit(10))
    ).all()
    oldest = (await session.exec(select(sa.func.min(Email.created_at)).where(*mine, in_flight))).one()
    sent = col(Email.status).in_(status_values(WENT_OUT))  # delivered, bounced, complained went out too
    return StatsOut(
        by_status=by_status,
        queue_depth=sum(n for s, n in by_status.items() if s in IN_FLIGHT | WAITING),
        retried=await count(col(Email.attempts) > 1),
        sent_last_minute=await count(sent, col(Email.sent_at) >= now - timedelta(minutes=1)),
        sent_last_hour=await count(sent, col(Email.sent_at) >= now - timedelta(hours=1)),
        oldest_in_flight_seconds=round((now - _aware(oldest)).total_seconds(), 1) if oldest else None,
        stuck_after_seconds=stuck_after_seconds,
        stuck=await count(in_flight, col(Email.updated_at) < stale),
        stuck_examples=[StuckEmail(id=e.id, status=e.status, updated_at=e.updated_at, attempts=e.attempts, last_error=e.last_error) for e in stuck_rows],
        last_purge=await _last_purge(ctx),
    )


async def _last_purge(ctx: Context) -> LastPurge | None:
    """Retention's last run: counts over every sender, so for admins only."""
    if not ctx.principal.is_admin:
        return None
    run = await retention.last_run(ctx.session)
    if run is None:
        return None
    return LastPurge(
        finished_at=run.finished_at, cutoff=run.cutoff, emails=run.emails, events=run.events, blobs=run.blobs, batches=run.batches,
    )


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)  # SQLite's min() returns a naive value
