"""Bodies of /v1/stats."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field


class StuckEmail(BaseModel):
    id: str
    status: str
    updated_at: datetime
    attempts: int
    last_error: str | None


class LastPurge(BaseModel):
    finished_at: datetime
    cutoff: datetime | None = Field(description="Final emails last changed before this were deleted (null: retention off)")
    emails: int
    events: int
    blobs: int = Field(description="Stored attachment files no email named any more")
    batches: int


class StatsOut(BaseModel):
    by_status: dict[str, int] = Field(description="Emails per status (the caller's own, or all for admins)")
    queue_depth: int = Field(description="Not yet ended: queued, scheduled, deferred, paused, sending, retrying")
    retried: int = Field(description="Emails that needed more than one attempt")
    sent_last_minute: int
    sent_last_hour: int
    oldest_in_flight_seconds: float | None = Field(description="Age of the oldest queued/sending/retrying email")
    stuck_after_seconds: int
    stuck: int = Field(description="In flight with no change for longer than stuck_after_seconds")
    stuck_examples: list[StuckEmail]
    last_purge: LastPurge | None = Field(
        default=None, description="The last retention purge (README \"Retention\"): admins only; null before the first run",
    )
