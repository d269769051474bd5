"""Bodies of /v1/emails: an email to queue, a batch, cancel and reschedule, and the records read back."""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    field_validator,
    model_validator,
)

from api.schemas.common import Address, JsonObject, Text, header_text, normalize_address
from mailqueue.attachments import ATTACHMENT_RULES, AttachmentRefused, clean_filename, content_id_problem
from mailqueue.message import HEADERS_RULE, header_refusal
from mailqueue.models import Email, EmailEvent
from mailqueue.templating import check_locale

# The docs' examples of send_at: dates that stay valid ("Try it out" must not answer 422 for a date in
# the past or more than MAILQUEUE_SEND_AT_MAX_DAYS ahead), fixed when the API starts.
_9AM = (datetime.now(UTC) + timedelta(days=1)).replace(hour=9, minute=0, second=0, microsecond=0)
TOMORROW_9AM, DAY_AFTER_9AM = _9AM.isoformat(), (_9AM + timedelta(days=1)).isoformat()

# An Idempotency-Key (the header, or a batch item's `idempotency_key`): 1 to 255 printable ASCII characters, no spaces.
IDEMPOTENCY_KEY_PATTERN = r"^[\x21-\x7e]+$"
IDEMPOTENCY_KEY_MAX_LENGTH = 255

# RFC 5322 field names; which of them a sender may give: mailqueue/message.py (header_refusal).
HEADER_NAME = re.compile(r"^[!-9;-~]{1,76}$")


class RelatedEntity(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Text = Field(min_length=1, max_length=100, examples=["StockIssue"])
    id: Text = Field(min_length=1, max_length=200, examples=["SI-2024-0042"])


UPLOAD_ID_PATTERN = r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"


class AttachmentIn(BaseModel):
    """A file sent with the email: its bytes here (base64), or an upload's id (POST /v1/uploads)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"filename": "invoice-1042.pdf", "content_type": "application/pdf", "content": "JVBERi0xLjcK..."},
        {"filename": "logo.png", "upload_id": "0b5b7e7e-3f7e-4c1e-9a55-1f0f2c3d4e5f", "disposition": "inline", "content_id": "logo"},
    ]})

    filename: str = Field(min_length=1, max_length=1000, description="Sent without path parts or control characters; non-ASCII names are fine")
    content_type: str | None = Field(
        default=None, max_length=255,
        description="Checked against the content; omitted: from the filename's extension, then from the content",
    )
    content: str | None = Field(default=None, description="The file's bytes, base64 (standard alphabet, padded)")
    upload_id: str | None = Field(default=None, pattern=UPLOAD_ID_PATTERN, description="An upload of yours (POST /v1/uploads) instead of `content`")
    disposition: Literal["attachment", "inline"] = Field(
        default="attachment", description="inline: shown in the HTML where it says cid:<content_id> (images)",
    )
    content_id: str | None = Field(default=None, max_length=250, description="Needed when inline: the id the HTML refers to as cid:<content_id>")
    _data: bytes | None = PrivateAttr(default=None)

    @property
    def data(self) -> bytes | None:
        """`content` decoded (None for an upload)."""
        return self._data

    @field_validator("filename")
    @classmethod
    def _filename(cls, value: str) -> str:
        try:
            return clean_filename(value)
        except AttachmentRefused as exc:
            raise ValueError(str(exc)) from None

    @field_validator("content_id")
    @classmethod
    def _content_id(cls, value: str | None) -> str | None:
        problem = content_id_problem(value) if value is not None else None
        if problem is not None:
            raise ValueError(problem)
        return value

    @model_validator(mode="after")
    def _source(self) -> AttachmentIn:
        if (self.content is None) == (self.upload_id is None):
            raise ValueError(f"attachment {self.filename!r}: give either content (base64) or upload_id")
        if self.content is not None:
            try:
                self._data = base64.b64decode(self.content, validate=True)
            except (binascii.Error, ValueError):
                raise ValueError(f"attachment {self.filename!r}: content is not valid base64") from None
        if self.disposition == "inline" and not self.content_id:
            raise ValueError(f"attachment {self.filename!r}: an inline file needs a content_id (the HTML shows it as cid:<content_id>)")
        return self


class EmailRequest(BaseModel):
    """An email to queue: raw content (subject + html and/or text) or a template with data."""

    model_config = ConfigDict(
        extra="forbid",
        populate_by_name=True,
        json_schema_extra={
            "examples": [
                {
                    "to": ["Ann Smith <ann@example.com>"],
                    "subject": "Your order has shipped",
                    "html": "<p>Hi Ann, your order <b>#1042</b> is on its way.</p>",
                    "text": "Hi Ann, your order #1042 is on its way.",
                    "tags": ["orders"],
                    "related_entity": {"type": "Order", "id": "1042"},
                },
                {
                    "to": ["bob@example.com"],
                    "template": "welcome",
                    "template_data": {"name": "Bob"},
                    "send_at": TOMORROW_9AM,
                    "max_attempts": 5,
                },
            ]
        },
    )

    to: list[Address] = Field(default_factory=list, max_length=1000)
    cc: list[Address] = Field(default_factory=list, max_length=1000)
    bcc: list[Address] = Field(default_factory=list, max_length=1000)
    from_: Address | None = Field(
        default=None, alias="from",
        description="An address in one of your verified domains (/v1/domains). Defaults to default_from of "
        "/v1/settings/mail, then the template's default_from (which must be in a verified domain too)",
    )
    reply_to: Address | None = None
    subject: str | None = Field(default=None, max_length=998)
    html: Text | None = None
    text: Text | None = None
    template: Text | None = Field(default=None, min_length=1, max_length=200)
    template_data: JsonObject | None = None
    locale: str | None = Field(default=None, max_length=35, examples=["en-GB"])
    priority: Literal["high", "normal", "low"] | Annotated[int, Field(ge=1, le=10)] = Field(
        default="normal", description="high/normal/low, or 1 (highest) to 10"
    )
    send_at: AwareDatetime | None = Field(default=None, description="ISO 8601 with a time zone; omit to send now")
    max_attempts: int | None = Field(default=None, ge=1, le=20)
    headers: dict[str, str] = Field(default_factory=dict, max_length=50, description=HEADERS_RULE)
    tags: list[Annotated[Text, Field(min_length=1, max_length=64)]] = Field(default_factory=list, max_length=20)
    metadata: JsonObject = Field(default_factory=dict)
    related_entity: RelatedEntity | None = None
    category: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")] | None = Field(
        default=None, description="What kind of mail this is; `marketing` carries a one-click unsubscribe link (as `unsubscribe`)",
    )
    attachments: list[AttachmentIn] = Field(default_factory=list, max_length=100, description=ATTACHMENT_RULES)
    unsubscribe: bool = Field(
        default=False,
        description="Add List-Unsubscribe (RFC 8058 one-click) naming the recipient: the email must have exactly one "
        "recipient, in `to`. Needs MAILQUEUE_PUBLIC_URL on the server",
    )

    @property
    def wants_unsubscribe(self) -> bool:
        return self.unsubscribe or self.category == "marketing"

    @field_validator("to", "cc", "bcc")
    @classmethod
    def _addresses(cls, values: list[str]) -> list[str]:
        return [normalize_address(v) for v in values]

    @field_validator("from_", "reply_to")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        return normalize_address(value) if value is not None else None

    @field_validator("subject")
    @classmethod
    def _subject(cls, value: str | None) -> str | None:
        return header_text(value, "subject") if value is not None else None

    @field_validator("locale")
    @classmethod
    def _locale(cls, value: str | None) -> str | None:
        return check_locale(value)

    @field_validator("headers")
    @classmethod
    def _headers(cls, headers: dict[str, str]) -> dict[str, str]:
        for name, value in headers.items():
            if not HEADER_NAME.match(name):
                raise ValueError(f"header name {name!r} is not a valid field name")
            refusal = header_refusal(name)
            if refusal is not None:
                raise ValueError(refusal)
            header_text(value, f"header {name!r}")
            if len(value) > 998:
                raise ValueError(f"header {name!r} is longer than 998 characters")
        return headers

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, Any]) -> dict[str, Any]:
        if len(json.dumps(value)) > 16_384:
            raise ValueError("metadata is larger than 16 KB")
        return value

    @model_validator(mode="after")
    def _content(self) -> EmailRequest:
        if not (self.to or self.cc or self.bcc):
            raise ValueError("at least one recipient is required in to, cc or bcc")
        if self.template is not None:
            if self.html is not None or self.text is not None or self.subject is not None:
                raise ValueError("give either a template or subject/html/text, not both")
        else:
            if self.template_data is not None:
                raise ValueError("template_data needs a template")
            if not self.subject:
                raise ValueError("subject is required when no template is given")
            if self.html is None and self.text is None:
                raise ValueError("html or text is required when no template is given")
        inline = [a for a in self.attachments if a.disposition == "inline"]
        if inline and self.template is None and self.html is None:
            raise ValueError(f"attachment {inline[0].filename!r} is inline, but the email has no html to show it in; send it as an attachment")
        ids = [a.content_id.lower() for a in self.attachments if a.content_id]
        if len(ids) != len(set(ids)):
            raise ValueError("two attachments have the same content_id")
        return self


class EmailAccepted(BaseModel):
    id: str
    status: str
    workflow_id: str

    @classmethod
    def of(cls, email: Email) -> EmailAccepted:
        return cls(id=email.id, status=email.status, workflow_id=email.workflow_id)


class BatchIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    emails: list[dict[str, Any]] = Field(
        min_length=1, max_length=100,
        description="Each as the body of POST /v1/emails, plus an optional `idempotency_key`",
    )
    all_or_nothing: bool = Field(default=False, description="One invalid email: 422 and nothing queued")


class BatchItemOut(BaseModel):
    index: int
    status: int = Field(description="202 queued; 422 invalid; 413 a file over a size limit; 409 idempotency conflict; 429 over the recipients-per-hour cap; 503 not queued, send again")
    id: str | None = None
    workflow_id: str | None = None
    email_status: str | None = None
    detail: list[dict[str, Any]] | None = None


class BatchOut(BaseModel):
    items: list[BatchItemOut]
    accepted: int
    rejected: int


class CancelBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: Text | None = Field(default=None, max_length=500)


class RescheduleBody(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"send_at": DAY_AFTER_9AM}]})
    send_at: AwareDatetime


class EventOut(BaseModel):
    event: str
    status: str | None
    attempt: int | None
    detail: str | None
    at: datetime


class TemplateUsed(BaseModel):
    name: str
    version: int | None
    locale: str | None = Field(description="The variant rendered ('' or null: the default one)")
    requested_locale: str | None = Field(default=None, description="The locale the email asked for (formats dates and money)")
    dependencies: list[dict[str, Any]] = Field(default_factory=list, description="Pinned layouts and partials")


class Sender(BaseModel):
    type: str = Field(description="system (the bootstrap key) or user")
    id: str | None = Field(default=None, description="the user's id")


class AttachmentOut(BaseModel):
    filename: str
    content_type: str
    size: int
    sha256: str = Field(description="Of the bytes sent, hex")
    disposition: str
    content_id: str | None = None


# The summary's fields that are the record's columns of the same name, as they are.
_AS_RECORDED = (
    "id", "workflow_id", "status", "to", "cc", "bcc", "subject", "priority", "attempts", "max_attempts", "next_attempt_at",
    "last_error", "scheduled_for", "sent_at", "provider", "provider_message_id", "message_id", "tags", "created_at", "updated_at",
)


class EmailSummary(BaseModel):
    id: str
    workflow_id: str
    status: str
    sender: Sender
    from_: str = Field(serialization_alias="from")
    to: list[str]
    cc: list[str]
    bcc: list[str]
    subject: str | None
    template: TemplateUsed | None
    priority: str
    attempts: int
    max_attempts: int
    next_attempt_at: datetime | None
    last_error: str | None
    scheduled_for: datetime | None
    sent_at: datetime | None
    provider: str | None
    provider_message_id: str | None
    message_id: str
    related_entity: RelatedEntity | None
    tags: list[str]
    attachments: list[AttachmentOut] = Field(default_factory=list, description="The files sent with it (their bytes are not shown)")
    created_at: datetime
    updated_at: datetime

    @classmethod
    def fields_of(cls, email: Email) -> dict[str, Any]:
        return dict(
            {name: getattr(email, name) for name in _AS_RECORDED},
            sender=Sender(type=email.sender_type, id=email.sender_id),
            from_=email.from_address,
            template=TemplateUsed(
                name=email.template_name,
                version=email.template_version,
                locale=email.template_locale,
                requested_locale=email.locale,
                dependencies=email.template_dependencies or [],
            )
            if email.template_name
            else None,
            related_entity=RelatedEntity(type=email.related_entity_type, id=email.related_entity_id)
            if email.related_entity_type and email.related_entity_id
            else None,
            attachments=[AttachmentOut.model_validate(a, from_attributes=False) for a in email.attachments or ()],
        )

    @classmethod
    def of(cls, email: Email) -> EmailSummary:
        return cls(**cls.fields_of(email))


class EmailDetail(EmailSummary):
    reply_to: str | None
    html: str | None
    text: str | None
    template_data: dict[str, Any] | None
    headers: dict[str, str]
    metadata: dict[str, Any]
    events: list[EventOut]

    @classmethod
    def with_events(cls, email: Email, events: Sequence[EmailEvent]) -> EmailDetail:
        return cls(
            **cls.fields_of(email),
            **{name: getattr(email, name) for name in ("reply_to", "html", "text", "template_data", "headers")},
            metadata=email.extra_metadata,
            events=[EventOut(event=e.event, status=e.status, attempt=e.attempt, detail=e.detail, at=e.created_at) for e in events],
        )


class EmailPage(BaseModel):
    items: list[EmailSummary]
    page: int
    page_size: int
    total: int
