"""Request and response bodies of the HTTP API, with field-level validation."""

from __future__ import annotations

import json
import re
from datetime import datetime
from email.utils import formataddr
from typing import Annotated, Any, Literal

from email_validator import EmailNotValidError, validate_email
from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field, field_validator, model_validator

from mailqueue.templating import check_locale

# RFC 5322 field names; these are set by mailqueue itself and cannot be overridden.
_HEADER_NAME = re.compile(r"^[!-9;-~]{1,76}$")
_RESERVED_HEADERS = {
    "from", "to", "cc", "bcc", "reply-to", "subject", "date", "message-id", "sender",
    "mime-version", "content-type", "content-transfer-encoding", "return-path", "received",
}
# Template versions are PostgreSQL integers: a larger one can never exist, and must not reach a query.
MAX_VERSION = 2**31 - 1


def storable(value: str, what: str = "the value") -> str:
    """PostgreSQL text holds neither NUL nor lone surrogates (not UTF-8): refused here as a 422, not at the database."""
    if "\x00" in value:
        raise ValueError(f"{what} must not contain NUL characters")
    try:
        value.encode()
    except UnicodeEncodeError:
        raise ValueError(f"{what} must be valid Unicode (no unpaired surrogates)") from None
    return value


def storable_json(value: Any) -> Any:
    """The same for every key and string inside a JSON value (stored as JSONB)."""
    if isinstance(value, str):
        storable(value, "a string in this object")
    elif isinstance(value, dict):
        for key, item in value.items():
            storable(key, "a key in this object")
            storable_json(item)
    elif isinstance(value, list):
        for item in value:
            storable_json(item)
    return value


Text = Annotated[str, AfterValidator(storable)]
JsonObject = Annotated[dict[str, Any], AfterValidator(storable_json)]


def _no_line_breaks(value: str, what: str) -> str:
    if "\r" in value or "\n" in value:
        raise ValueError(f"{what} must not contain CR or LF characters")
    return storable(value, what)


_NAMED_ADDRESS = re.compile(r"^\s*(?P<name>[^<>]*?)\s*<(?P<addr>[^<>]*)>\s*$")


def normalize_address(value: str) -> str:
    """Validate one address ("ann@example.com" or "Ann <ann@example.com>") and normalize it."""
    _no_line_breaks(value, "an address")
    named = _NAMED_ADDRESS.match(value)
    if named:
        name, addr = named["name"].strip().strip('"').strip(), named["addr"].strip()
    elif "<" in value or ">" in value:
        raise ValueError(f"{value!r} is not of the form 'Name <address>'")
    else:
        name, addr = "", value.strip()
    if "," in addr or ";" in addr:
        raise ValueError(f"{value!r} is not one email address; give each address as its own list item")
    try:
        addr = validate_email(addr, check_deliverability=False).normalized
    except EmailNotValidError as exc:
        raise ValueError(f"{value!r} is not a valid email address: {exc}") from None
    return formataddr((name, addr)) if name else addr


Address = Annotated[str, Field(max_length=512, examples=["Ann Smith <ann@example.com>"])]


class RelatedEntity(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Text = Field(min_length=1, max_length=100, examples=["StockIssue"])
    id: Text = Field(min_length=1, max_length=200, examples=["SI-2024-0042"])


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
                    "send_at": "2030-01-01T09:00:00+00:00",
                    "max_attempts": 5,
                },
            ]
        },
    )

    to: list[Address] = Field(default_factory=list, max_length=1000)
    cc: list[Address] = Field(default_factory=list, max_length=1000)
    bcc: list[Address] = Field(default_factory=list, max_length=1000)
    from_: Address | None = Field(default=None, alias="from", description="Defaults to the template's or the system's sender")
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
    headers: dict[str, str] = Field(default_factory=dict, max_length=50)
    tags: list[Annotated[Text, Field(min_length=1, max_length=64)]] = Field(default_factory=list, max_length=20)
    metadata: JsonObject = Field(default_factory=dict)
    related_entity: RelatedEntity | None = None

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
        return _no_line_breaks(value, "subject") if value is not None else None

    @field_validator("locale")
    @classmethod
    def _locale(cls, value: str | None) -> str | None:
        return check_locale(value)

    @field_validator("headers")
    @classmethod
    def _headers(cls, headers: dict[str, str]) -> dict[str, str]:
        for name, value in headers.items():
            if not _HEADER_NAME.match(name):
                raise ValueError(f"header name {name!r} is not a valid field name")
            if name.lower() in _RESERVED_HEADERS:
                raise ValueError(f"header {name!r} is set by mailqueue and cannot be given")
            _no_line_breaks(value, f"header {name!r}")
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
        return self


class EmailAccepted(BaseModel):
    id: str
    status: str
    workflow_id: str


class BatchIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    emails: list[dict[str, Any]] = Field(
        min_length=1, max_length=100,
        description="Each as the body of POST /v1/emails, plus an optional `idempotency_key`",
    )
    all_or_nothing: bool = Field(default=False, description="One invalid email: 422 and nothing queued")


class BatchItemOut(BaseModel):
    index: int
    status: int = Field(description="202 queued; 422 invalid; 409 idempotency conflict; 503 not queued, send again")
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
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"send_at": "2030-01-01T09:00:00Z"}]})
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
    created_at: datetime
    updated_at: datetime


class EmailDetail(EmailSummary):
    reply_to: str | None
    html: str | None
    text: str | None
    template_data: dict[str, Any] | None
    headers: dict[str, str]
    metadata: dict[str, Any]
    events: list[EventOut]


class EmailPage(BaseModel):
    items: list[EmailSummary]
    page: int
    page_size: int
    total: int


class TemplateBody(BaseModel):
    """A template version's content. Names starting with `_` are layouts and partials (no subject needed)."""

    model_config = ConfigDict(extra="forbid")

    locale: str = Field(default="", max_length=35, description="'' is the default variant; 'de', 'pt-BR', ...")
    subject: Text | None = Field(default=None, max_length=2000)
    html: Text | None = Field(default=None, max_length=1_000_000)
    text: Text | None = Field(default=None, max_length=1_000_000)
    default_from: Address | None = None
    default_from_name: str | None = Field(default=None, max_length=200)
    description: Text | None = Field(default=None, max_length=2000)
    sample_data: JsonObject | None = Field(default=None, description="Data for previews; checked to render on save")

    @field_validator("default_from")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        return normalize_address(value) if value is not None else None

    @field_validator("default_from_name")
    @classmethod
    def _from_name(cls, value: str | None) -> str | None:
        if value is not None:
            _no_line_breaks(value, "default_from_name")
        return value

    @field_validator("locale")
    @classmethod
    def _locale(cls, value: str) -> str:
        return check_locale(value)

    def check_parts(self, name: str) -> None:
        if self.html is None and self.text is None:
            raise ValueError("a template needs html or text")
        if not name.startswith("_") and not (self.subject or "").strip():
            raise ValueError("subject is required (only layouts and partials, named '_...', go without one)")


class TemplateIn(TemplateBody):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "name": "welcome",
                    "subject": "Welcome, {{ name }}",
                    "html": '{% extends "_Layout" %}{% block content %}<p>Hello {{ name }}!</p>{% endblock %}',
                    "sample_data": {"name": "Ann"},
                }
            ]
        },
    )
    name: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.-]+$")

    @model_validator(mode="after")
    def _body(self) -> TemplateIn:
        self.check_parts(self.name)
        return self


class TemplateOut(BaseModel):
    name: str
    locale: str
    version: int
    subject: str
    html: str | None
    text: str | None
    default_from: str | None
    default_from_name: str | None
    description: str | None
    sample_data: dict[str, Any] | None
    is_active: bool
    is_current: bool
    created_by: str | None
    created_at: datetime
    updated_at: datetime


class TemplatePinOut(BaseModel):
    name: str
    locale: str
    version: int


class PreviewIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    data: JsonObject | None = Field(default=None, description="Template data; the stored sample data when absent")
    locale: str | None = Field(default=None, max_length=35)
    version: int | None = Field(default=None, ge=1, le=MAX_VERSION, description="A stored version; the current one when absent")

    @field_validator("locale")
    @classmethod
    def _locale(cls, value: str | None) -> str | None:
        return check_locale(value)


class PreviewOut(BaseModel):
    subject: str
    html: str | None
    text: str | None
    template: TemplatePinOut
    dependencies: list[TemplatePinOut]
    data_source: str = Field(description="'request' or 'sample_data'")


class ReloadOut(BaseModel):
    directory: str
    created: list[TemplatePinOut]
    unchanged: list[TemplatePinOut]
