"""What the event feed answers: events with their cursors, a page of them, a stream message."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field

from mailqueue.events import FeedEvent, FeedPage

EVENT_TYPE_PATTERN = r"^[a-z_]{1,32}$"


class FeedEventOut(BaseModel):
    """One event of one email. `cursor` orders the feed: pass the last one you saw as `after`
    (or Last-Event-ID) to go on from there. Never the email's content."""

    cursor: str = Field(examples=["1234-5678"])
    email_id: str
    event: str = Field(description="queued, scheduled, deferred, sending, retrying, sent, failed, cancelled, rescheduled, …")
    status: str | None = Field(description="the email's status after the event")
    attempt: int | None
    detail: str | None
    created_at: datetime

    @classmethod
    def of(cls, e: FeedEvent) -> FeedEventOut:
        return cls(
            cursor=str(e.cursor), email_id=e.email_id, event=e.event, status=e.status, attempt=e.attempt, detail=e.detail,
            created_at=e.created_at,
        )


class FeedPageOut(BaseModel):
    events: list[FeedEventOut]
    next: str = Field(description="the cursor to ask with next (`after`): the last event's, or the one asked with")
    more: bool = Field(description="the page is full: more events may follow at once")

    @classmethod
    def of(cls, page: FeedPage) -> FeedPageOut:
        return cls(events=[FeedEventOut.of(e) for e in page.events], next=str(page.next), more=page.more)
