"""GET /v1/stats: what the queue holds, what it did lately, and what looks stuck."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import APIRouter, Query
from pydantic import BaseModel, Field
from sqlmodel import col, select

from api.deps import PrincipalDep, SessionDep
from api.routes.emails import visible_to
from mailqueue.models import Email, utcnow

router = APIRouter(prefix="/v1/stats", tags=["stats"])

# Waiting on purpose: not stuck however long they wait.
WAITING = ("scheduled", "deferred")
IN_FLIGHT = ("queued", "sending", "retrying")


class StuckEmail(BaseModel):
    id: str
    status: str
    updated_at: datetime
    attempts: int
    last_error: str | None


class StatsOut(BaseModel):
    by_status: dict[str, int] = Field(description="Emails per status (the caller's own, or all for admins)")
    queue_depth: int = Field(description="Not yet ended: queued, scheduled, deferred, sending, retrying")
    retried: int = Field(description="Emails that needed more than one attempt")
    sent_last_minute: int
    sent_last_hour: int
    oldest_in_flight_seconds: float | None = Field(description="Age of the oldest queued/sending/retrying email")
    stuck_after_seconds: int
    stuck: int = Field(description="In flight with no change for longer than stuck_after_seconds")
    stuck_examples: list[StuckEmail]


@router.get("", response_model=StatsOut, summary="Counts by status, queue depth, recent throughput, stuck emails")
async def stats(
    principal: PrincipalDep,
    session: SessionDep,
    stuck_after_seconds: Annotated[int, Query(ge=1, le=7 * 86400, description="Default: 5 minutes")] = 300,
) -> StatsOut:
    mine = visible_to(principal)
    now = utcnow()
    rows = (await session.exec(select(Email.status, sa.func.count()).where(*mine).group_by(Email.status))).all()
    by_status: dict[str, int] = {status: count for status, count in rows}

    async def count(*where: Any) -> int:
        return (await session.exec(select(sa.func.count()).select_from(Email).where(*mine, *where))).one()

    stale = now - timedelta(seconds=stuck_after_seconds)
    in_flight = col(Email.status).in_(IN_FLIGHT)
    stuck_rows = (
        await session.exec(select(Email).where(*mine, in_flight, col(Email.updated_at) < stale).order_by(col(Email.updated_at)).limit(10))
    ).all()
    oldest = (await session.exec(select(sa.func.min(Email.created_at)).where(*mine, in_flight))).one()
    return StatsOut(
        by_status=by_status,
        queue_depth=sum(n for s, n in by_status.items() if s in (*IN_FLIGHT, *WAITING)),
        retried=await count(col(Email.attempts) > 1),
        sent_last_minute=await count(col(Email.status) == "sent", col(Email.sent_at) >= now - timedelta(minutes=1)),
        sent_last_hour=await count(col(Email.status) == "sent", col(Email.sent_at) >= now - timedelta(hours=1)),
        oldest_in_flight_seconds=round((now - _aware(oldest)).total_seconds(), 1) if oldest else None,
        stuck_after_seconds=stuck_after_seconds,
        stuck=await count(in_flight, col(Email.updated_at) < stale),
        stuck_examples=[StuckEmail(id=e.id, status=e.status, updated_at=e.updated_at, attempts=e.attempts, last_error=e.last_error) for e in stuck_rows],
    )


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)  # SQLite's min() returns a naive value
