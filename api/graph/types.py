"""GraphQL's types: what REST's bodies say, in GraphQL's terms (camelCase, enums, Relay connections).

Inputs are turned into REST's own pydantic bodies (api/schemas), so every rule about what an email,
a setting or a filter may hold is checked in one place for both doors. Outputs are built from the
same records, through the same `fields_of`/`of` functions that REST's answers use."""

from __future__ import annotations

import base64
import binascii
import dataclasses
from datetime import datetime
from enum import Enum
from typing import Annotated, Any

import strawberry
from strawberry.experimental.pydantic import input as pydantic_input
from strawberry.experimental.pydantic import type as pydantic_type
from strawberry.scalars import JSON
from strawberry.types import Info

from api.graph.context import GraphContext
from api.schemas.emails import EmailSummary
from api.schemas.emails import AttachmentOut
from api.schemas.emails import RelatedEntity as RelatedEntityOut
from api.schemas.emails import Sender as SenderOut
from api.schemas.emails import TemplateUsed as TemplateUsedOut
from api.schemas.settings import MailSettingsIn, MailSettingsOut
from api.schemas.stats import StatsOut
from api.schemas.stats import StuckEmail as StuckEmailOut
from api.schemas.stats import LastPurge as LastPurgeOut
from api.schemas.templates import PreviewOut, ReloadOut, TemplateOut, TemplatePinOut
from api.services.emails import EmailsAfter
from mailqueue.contracts import EmailStatus as EmailStatusEnum
from mailqueue.models import Email as EmailRecord
from mailqueue.models import EmailEvent as EventRecord
from mailqueue.models import EmailTemplate
from mailqueue.drivers.base import SenderDriver as SenderDriverEnum
from mailqueue.config import SmtpSecurity as SmtpSecurityEnum

EmailStatus = strawberry.enum(EmailStatusEnum, description="Where an email is: queued, scheduled, ... sent, delivered, bounced")
SenderDriver = strawberry.enum(SenderDriverEnum, description="How a user's emails leave")
SmtpSecurity = strawberry.enum(SmtpSecurityEnum)


def _unset_none(value: Any) -> bool:
    return value is None or value is strawberry.UNSET


def as_body(value: Any, renames: dict[str, str] | None = None) -> Any:
    """An input object as REST's JSON body: snake_case names, absent (and null) fields left out."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = {}
        for f in dataclasses.fields(value):
            item = getattr(value, f.name)
            if _unset_none(item):
                continue
            out[(renames or {}).get(f.name, f.name)] = as_body(item)
        return out
    if isinstance(value, list):
        return [as_body(v) for v in value]
    if isinstance(value, Enum):
        return value.value
    return value


# --- emails ------------------------------------------------------------------------------


@strawberry.type(description="One step in an email's life (oldest first in `events`)")
class EmailEvent:
    event: str
    status: str | None
    attempt: int | None
    detail: str | None
    at: datetime

    @classmethod
    def of(cls, e: EventRecord) -> EmailEvent:
        return cls(event=e.event, status=e.status, attempt=e.attempt, detail=e.detail, at=e.created_at)


@pydantic_type(model=SenderOut, all_fields=True)
class Sender:
    id: strawberry.ID | None


@pydantic_type(model=TemplateUsedOut, all_fields=True)
class TemplateUsed:
    dependencies: JSON


@pydantic_type(model=RelatedEntityOut, all_fields=True)
class RelatedEntity:
    pass


@pydantic_type(model=AttachmentOut, all_fields=True, description="A file sent with an email (its bytes are not shown)")
class Attachment:
    pass


@pydantic_type(model=EmailSummary, all_fields=True, description="An email and where it is; `events` is its history")
class Email:
    id: strawberry.ID
    status: EmailStatus  # type: ignore[valid-type]
    from_: str = strawberry.field(name="from")
    # What REST's EmailDetail adds to the summary (its events come from the field below).
    reply_to: str | None = None
    html: str | None = None
    text: str | None = None
    template_data: JSON | None = None
    headers: JSON = strawberry.field(default_factory=dict)
    metadata: JSON = strawberry.field(default_factory=dict)

    @strawberry.field(description="Its events, oldest first (batched across a list of emails: one query)")
    async def events(self, info: Info[GraphContext, Any]) -> list[EmailEvent]:
        return [EmailEvent.of(e) for e in await info.context.loaders.events.load(str(self.id))]


def email_of(email: EmailRecord) -> Email:
    """An email as REST's EmailDetail shows it, field for field."""
    return Email.from_pydantic(EmailSummary.of(email), extra={
        "reply_to": email.reply_to, "html": email.html, "text": email.text, "template_data": email.template_data,
        "headers": email.headers, "metadata": email.extra_metadata,
    })


@strawberry.type(description="An email's status in brief (GetEmailStatus)")
class EmailStatusInfo:
    id: strawberry.ID
    status: EmailStatus  # type: ignore[valid-type]
    attempts: int
    last_error: str | None
    scheduled_for: datetime | None
    sent_at: datetime | None
    updated_at: datetime

    @classmethod
    def of(cls, email: EmailRecord) -> EmailStatusInfo:
        return cls(id=email.id, status=EmailStatusEnum(email.status), attempts=email.attempts, last_error=email.last_error,
                   scheduled_for=email.scheduled_for, sent_at=email.sent_at, updated_at=email.updated_at)


@strawberry.type(description="An email accepted: queued (or scheduled) as a durable workflow")
class EmailAccepted:
    id: strawberry.ID
    status: EmailStatus  # type: ignore[valid-type]
    workflow_id: str

    @classmethod
    def of(cls, email: EmailRecord) -> EmailAccepted:
        return cls(id=email.id, status=EmailStatusEnum(email.status), workflow_id=email.workflow_id)


@strawberry.input
class RelatedEntityInput:
    type: str
    id: str


@strawberry.input(description="A file to send: `content` (base64) or an upload's id (POST /v1/uploads), as in REST")
class AttachmentInput:
    filename: str
    content_type: str | None = None
    content: str | None = strawberry.field(default=None, description="The bytes, base64")
    upload_id: str | None = None
    disposition: str | None = strawberry.field(default=None, description="attachment (the default) or inline (cid:<contentId> in the HTML)")
    content_id: str | None = None


@strawberry.input(description="What every email may carry besides its content")
class EmailFields:
    to: list[str] | None = None
    cc: list[str] | None = None
    bcc: list[str] | None = None
    from_: str | None = strawberry.field(default=None, name="from", description="An address in one of your verified domains")
    reply_to: str | None = None
    priority: str | None = strawberry.field(default=None, description="high, normal, low, or 1 (highest) to 10")
    send_at: datetime | None = strawberry.field(default=None, description="ISO 8601 with a time zone; omit to send now")
    max_attempts: int | None = None
    headers: JSON | None = None
    tags: list[str] | None = None
    metadata: JSON | None = None
    related_entity: RelatedEntityInput | None = None
    category: str | None = strawberry.field(default=None, description="`marketing` carries a one-click unsubscribe link")
    unsubscribe: bool | None = None
    attachments: list[AttachmentInput] | None = None
    idempotency_key: str | None = strawberry.field(
        default=None, description="Same key and input: same answer, one email. Same key, other input: CONFLICT",
    )


@strawberry.input(description="An email with its own content (SendEmail)")
class SendEmailInput(EmailFields):
    subject: str | None = None
    html: str | None = None
    text: str | None = None


@strawberry.input(description="An email made from a stored template (SendTemplatedEmail)")
class SendTemplatedEmailInput(EmailFields):
    template: str | None = None
    template_data: JSON | None = None
    locale: str | None = None


@strawberry.input(one_of=True, description="One email of a batch: give `email` or `templated`")
class BatchEmailInput:
    email: SendEmailInput | None = strawberry.UNSET
    templated: SendTemplatedEmailInput | None = strawberry.UNSET

    def chosen(self) -> EmailFields:
        return self.email if not _unset_none(self.email) else self.templated  # type: ignore[return-value]


def email_body(value: EmailFields) -> tuple[dict[str, Any], str | None]:
    """(REST's body of POST /v1/emails, the Idempotency-Key)."""
    body = as_body(value, {"from_": "from"})
    return body, body.pop("idempotency_key", None)


@strawberry.type
class FieldError:
    path: list[str]
    message: str


@strawberry.type(description="One email of a batch: `code` is what REST answers for it (202 queued, 422, 409, 429, 503)")
class BatchItem:
    index: int
    code: int
    id: strawberry.ID | None
    workflow_id: str | None
    status: EmailStatus | None  # type: ignore[valid-type]
    errors: list[FieldError]


@strawberry.type
class BatchResult:
    items: list[BatchItem]
    accepted: int
    rejected: int


@strawberry.input(description="The filters of GET /v1/emails; all given must hold")
class EmailFilter:
    statuses: list[EmailStatus] | None = None  # type: ignore[valid-type]
    recipient: str | None = strawberry.field(default=None, description="Any of to/cc/bcc")
    template: str | None = None
    related_entity_type: str | None = None
    related_entity_id: str | None = None
    tag: str | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None


@strawberry.type
class PageInfo:
    has_next_page: bool
    has_previous_page: bool
    start_cursor: str | None
    end_cursor: str | None


@strawberry.type
class EmailEdge:
    cursor: str
    node: Email


@strawberry.type(description="Emails newest first, a page at a time (Relay): pass pageInfo.endCursor as `after`")
class EmailConnection:
    edges: list[EmailEdge]
    page_info: PageInfo
    total_count: int


def email_cursor(email: EmailRecord) -> str:
    return base64.urlsafe_b64encode(f"{email.created_at.isoformat()}|{email.id}".encode()).decode()


def parse_email_cursor(text: str) -> EmailsAfter:
    """ValueError for anything `email_cursor` never made."""
    try:
        when, _, email_id = base64.urlsafe_b64decode(text.encode()).decode().partition("|")
        return EmailsAfter(created_at=datetime.fromisoformat(when), id=email_id)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise ValueError("not a cursor of this list (pass pageInfo.endCursor as it was given)") from None


# --- the event feed ------------------------------------------------------------------------------


@strawberry.enum
class ChangeKind(Enum):
    SUBSCRIBED = "subscribed"
    CHANGED = "changed"


@strawberry.type(description=(
    "The first message of every subscription is SUBSCRIBED: changes before it are not replayed (after a reconnect, "
    "query `email`/`emailHistory` for what happened meanwhile). Then one CHANGED per status change, in commit order."
))
class EmailStatusChange:
    kind: ChangeKind
    email_id: strawberry.ID | None
    status: EmailStatus | None  # type: ignore[valid-type]
    event: str | None
    attempt: int | None
    detail: str | None
    at: datetime
    cursor: str | None = strawberry.field(description="The event's place in the feed (GET /v1/events?after=)")


# --- settings, templates, stats: REST's own bodies, field for field -------------------------------


@pydantic_type(model=MailSettingsOut, all_fields=True, description="A user's sender settings: secrets are never shown, only whether one is set")
class MailSettings:
    user_id: strawberry.ID


@pydantic_input(model=MailSettingsIn, all_fields=True, description="Replaces the settings (as PUT /v1/settings/mail). Secrets are write-only: omit or null keeps one")
class MailSettingsInput:
    pass


@pydantic_type(model=TemplatePinOut, all_fields=True)
class TemplatePin:
    pass


@pydantic_type(model=ReloadOut, all_fields=True, description="What loading the templates folder did")
class TemplatesReloaded:
    pass


@pydantic_type(model=TemplateOut, all_fields=True, description="A stored template version")
class Template:
    sample_data: JSON | None


def template_of(row: EmailTemplate) -> Template:
    return Template.from_pydantic(TemplateOut.model_validate(row, from_attributes=True))


@pydantic_type(model=PreviewOut, all_fields=True, description="A template rendered as an email would be")
class TemplatePreview:
    pass


@strawberry.type
class StatusCount:
    status: EmailStatus  # type: ignore[valid-type]
    count: int


@pydantic_type(model=StuckEmailOut, all_fields=True)
class StuckEmail:
    id: strawberry.ID


@pydantic_type(model=LastPurgeOut, all_fields=True, description="The last retention purge: what it deleted")
class LastPurge:
    pass


@pydantic_type(model=StatsOut, all_fields=True, description="What the queue holds, what it did lately, what looks stuck (yours; admins: everyone's)")
class Stats:
    by_status: list[StatusCount]


def stats_of(out: StatsOut) -> Stats:
    stats = Stats.from_pydantic(out)
    stats.by_status = [StatusCount(status=EmailStatusEnum(s), count=n) for s, n in sorted(out.by_status.items())]
    return stats


Id = Annotated[strawberry.ID, strawberry.argument(description="The email's id")]
