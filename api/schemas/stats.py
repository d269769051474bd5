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
