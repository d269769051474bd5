"""Bodies of /v1/webhooks: endpoints (the secret only when made or rotated) and their delivery attempts."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from mailqueue.contracts import EventType
from mailqueue.models import WebhookDelivery, WebhookEndpoint
from mailqueue.webhooks import MAX_URL


class WebhookIn(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"url": "https://example.com/hooks/mail", "event_types": ["sent", "bounced"]}]},
    )
    url: str = Field(min_length=1, max_length=MAX_URL, description="http(s) URL that gets a signed POST per event")
    event_types: list[EventType] = Field(
        default_factory=list, max_length=len(EventType), description="Only these event types (empty: all of them)",
    )


class WebhookOut(BaseModel):
    id: str
    url: str
    event_types: list[str] = Field(description="The event types it gets (empty: all)")
    owner: str = Field(description="Whose events: system: (the bootstrap key's: all) or user:<id>")
    status: str = Field(description="active, or disabled (failed for longer than the disable window: nothing is sent)")
    disabled_reason: str | None = Field(description="Why it was disabled")
    disabled_at: datetime | None
    failing_since: datetime | None = Field(description="The first failed attempt since the last delivery (None: not failing)")
    cursor: str = Field(description="The feed cursor of the last event delivered (as in /v1/events)")
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, row: WebhookEndpoint) -> WebhookOut:
        return cls(
            id=row.id, url=row.url, event_types=list(row.event_types or []), owner=row.owner, status=row.status,
            disabled_reason=row.disabled_reason, disabled_at=row.disabled_at, failing_since=row.failing_since,
            cursor=row.cursor, created_at=row.created_at, updated_at=row.updated_at,
        )


class WebhookCreated(WebhookOut):
    secret: str = Field(description="The signing secret (whsec_...): shown this once, never again")


class WebhookSecret(BaseModel):
    id: str
    secret: str = Field(description="The new signing secret (whsec_...): shown this once; the old one signs nothing from now on")


class WebhookPage(BaseModel):
    items: list[WebhookOut]
    page: int
    page_size: int
    total: int


class DeliveryOut(BaseModel):
    id: str
    event_id: str = Field(description="The email event's id: the webhook-id header, the same on every attempt")
    event_type: str
    attempt: int = Field(description="Which attempt at this event (redeliveries count on their own)")
    status_code: int | None = Field(description="The endpoint's HTTP status (None: no answer)")
    latency_ms: int | None
    error: str | None = Field(description="What went wrong when there was no 2xx answer")
    redelivery: bool
    created_at: datetime

    @classmethod
    def of(cls, row: WebhookDelivery) -> DeliveryOut:
        return cls(
            id=row.id, event_id=row.event_id, event_type=row.event_type, attempt=row.attempt, status_code=row.status_code,
            latency_ms=row.latency_ms, error=row.error, redelivery=row.redelivery, created_at=row.created_at,
        )


class DeliveryPage(BaseModel):
    items: list[DeliveryOut]
    page: int
    page_size: int
    total: int


class RedeliveryAccepted(BaseModel):
    delivery_id: str
    event_id: str
    workflow_id: str = Field(description="The Temporal workflow that sends it (its attempts appear in the deliveries)")
