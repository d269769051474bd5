"""SQL tables: the records people query. Schema changes go through Alembic migrations."""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB
from sqlmodel import Field, SQLModel

from mailqueue.contracts import EmailStatus, SenderType


class UTCDateTime(sa.types.TypeDecorator):
    """Timezone-aware UTC datetimes on every backend (SQLite keeps no zone)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


JSONType = sa.JSON().with_variant(JSONB(), "postgresql")


def utcnow() -> datetime:
    return datetime.now(UTC)


def _ts(**kw: Any) -> Any:
    return Field(sa_type=UTCDateTime, **kw)


def _json(**kw: Any) -> Any:
    return Field(sa_type=JSONType, **kw)


class Email(SQLModel, table=True):
    __tablename__ = "emails"
    __table_args__ = (
        sa.Index("ix_emails_related_entity", "related_entity_type", "related_entity_id"),
        sa.Index("ix_emails_status_created", "status", "created_at"),
        sa.Index("ix_emails_sender_idempotency", "sender_type", "sender_id", "idempotency_key"),
        sa.Index("ix_emails_sender_created", "sender_type", "sender_id", "created_at"),
        sa.Index("ix_emails_status_updated", "status", "updated_at"),  # retention's batches, stuck emails
    )

    id: str = Field(primary_key=True, max_length=36)
    workflow_id: str = Field(max_length=64)
    sender_type: str = Field(default=SenderType.SYSTEM.value, max_length=16)
    sender_id: str | None = Field(default=None, max_length=64)
    from_address: str = Field(max_length=512)
    reply_to: str | None = Field(default=None, max_length=512)
    to: list[str] = _json(default_factory=list)
    cc: list[str] = _json(default_factory=list)
    bcc: list[str] = _json(default_factory=list)
    subject: str | None = Field(default=None, sa_type=sa.Text)
    html: str | None = Field(default=None, sa_type=sa.Text)
    text: str | None = Field(default=None, sa_type=sa.Text)
    template_name: str | None = Field(default=None, max_length=200, index=True)
    template_version: int | None = None
    template_data: dict[str, Any] | None = _json(default=None)
    locale: str | None = Field(default=None, max_length=35)  # as requested by the caller
    template_locale: str | None = Field(default=None, max_length=35)  # the variant used
    template_dependencies: list[dict[str, Any]] | None = _json(default=None)  # pinned layouts/partials
    headers: dict[str, str] = _json(default_factory=dict)
    priority: str = Field(default="normal", max_length=16)
    status: str = Field(default=EmailStatus.QUEUED.value, max_length=16)
    attempts: int = 0
    max_attempts: int = 3
    next_attempt_at: datetime | None = _ts(default=None)
    last_error: str | None = Field(default=None, sa_type=sa.Text)
    scheduled_for: datetime | None = _ts(default=None)
    sent_at: datetime | None = _ts(default=None)
    provider: str | None = Field(default=None, max_length=32)
    provider_message_id: str | None = Field(default=None, max_length=512, index=True)  # provider events find their email by it
    message_id: str = Field(max_length=512)
    related_entity_type: str | None = Field(default=None, max_length=100)
    related_entity_id: str | None = Field(default=None, max_length=200)
    tags: list[str] = _json(default_factory=list)
    # "metadata" is reserved by SQLAlchemy's declarative base, hence the attribute name.
    extra_metadata: dict[str, Any] = Field(
        default_factory=dict, sa_column=sa.Column("metadata", JSONType, nullable=False)
    )
    idempotency_key: str | None = Field(default=None, max_length=255)
    request_hash: str | None = Field(default=None, max_length=64)
    created_at: datetime = _ts(default_factory=utcnow, index=True)
    updated_at: datetime = _ts(default_factory=utcnow)
    # The files sent with it (AttachmentRef fields: blob id, name, type, size, sha256, disposition, content id).
    attachments: list[dict[str, Any]] | None = _json(default=None)


class EmailRecipient(SQLModel, table=True):
    """One row per address of an email, so "all mail to X" is an indexed lookup."""

    __tablename__ = "email_recipients"

    email_id: str = Field(
        primary_key=True, max_length=36, sa_type=sa.String(36),
        foreign_key="emails.id", ondelete="CASCADE",
    )
    kind: str = Field(primary_key=True, max_length=3)
    address: str = Field(primary_key=True, max_length=320, index=True)


class EmailEvent(SQLModel, table=True):
    """The audit trail: one row per thing that happened to an email."""

    __tablename__ = "email_events"
    __table_args__ = (sa.Index("ix_email_events_email_time", "email_id", "created_at"),)

    id: str = Field(primary_key=True, max_length=36)
    email_id: str = Field(foreign_key="emails.id", ondelete="CASCADE", max_length=36)
    event: str = Field(max_length=32, index=True)
    status: str | None = Field(default=None, max_length=16)
    attempt: int | None = None
    detail: str | None = Field(default=None, sa_type=sa.Text)
    created_at: datetime = _ts(default_factory=utcnow)


class EmailEventFeed(SQLModel, table=True):
    """The event feed's order: one row per email_events row, written by a database trigger
    (migration 0007), so no writer (ORM or plain SQL) can add an event the feed misses.

    The feed's order is (xid, seq): `seq` is taken at insert, `xid` is the inserting transaction
    (PostgreSQL; always 0 on SQLite, whose single writer commits in seq order). Readers hand out
    only rows whose transaction is older than every running one (mailqueue/events.py)."""

    __tablename__ = "email_event_feed"
    __table_args__ = (
        sa.Index("ix_email_event_feed_order", "xid", "seq"),
        sa.Index("ix_email_event_feed_email", "email_id", "xid", "seq"),
        {"sqlite_autoincrement": True},  # a deleted last row's seq is never reused: a cursor stays behind it
    )

    seq: int | None = Field(default=None, sa_column=sa.Column(
        sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True,
    ))
    xid: int = Field(default=0, sa_type=sa.BigInteger)
    event_id: str = Field(foreign_key="email_events.id", ondelete="CASCADE", max_length=36, unique=True)
    email_id: str = Field(max_length=36)


class EmailTemplate(SQLModel, table=True):
    """A named template; every change adds a version and emails pin the one they used."""

    __tablename__ = "email_templates"
    __table_args__ = (
        sa.UniqueConstraint("name", "locale", "version", name="uq_email_templates_version"),
        # One current version per name and locale, even when two saves race.
        sa.Index(
            "uq_email_templates_current", "name", "locale", unique=True,
            postgresql_where=sa.text("is_current"), sqlite_where=sa.text("is_current"),
        ),
    )

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=200, index=True)
    locale: str = Field(default="", max_length=35)
    version: int = 1
    subject: str = Field(sa_type=sa.Text)
    html: str | None = Field(default=None, sa_type=sa.Text)
    text: str | None = Field(default=None, sa_type=sa.Text)
    default_from: str | None = Field(default=None, max_length=512)
    default_from_name: str | None = Field(default=None, max_length=200)
    description: str | None = Field(default=None, sa_type=sa.Text)
    sample_data: dict[str, Any] | None = _json(default=None)
    is_active: bool = True
    is_current: bool = True
    created_by: str | None = Field(default=None, max_length=64)
    created_at: datetime = _ts(default_factory=utcnow)
    updated_at: datetime = _ts(default_factory=utcnow)  # activation changes; content never does


class Role(StrEnum):
    USER = "user"  # sees and acts on their own emails and settings
    ADMIN = "admin"  # sees all, manages users and templates


class User(SQLModel, table=True):
    """Someone who sends through mailqueue with their own API keys (and, optionally, mail settings)."""

    __tablename__ = "users"

    id: str = Field(primary_key=True, max_length=36)
    name: str = Field(max_length=200, sa_column_kwargs={"unique": True})
    email: str | None = Field(default=None, max_length=512)
    role: str = Field(default=Role.USER.value, max_length=16)
    is_active: bool = True  # False: every key of the user is refused (mailqueue.accounts.user_for_key)
    created_at: datetime = _ts(default_factory=utcnow)
    # Abuse limits, owned by admins (PATCH /v1/users/{id}); the user's own settings may only be lower.
    hourly_limit: int | None = None  # ceiling on sends started per hour; None: no ceiling
    daily_limit: int | None = None  # the same per day
    recipients_per_hour: int | None = None  # to+cc+bcc queued per hour; None: MAILQUEUE_USER_RECIPIENTS_PER_HOUR; 0: no cap
    max_priority: str | None = Field(default=None, max_length=8)  # high/normal/low; None: MAILQUEUE_USER_MAX_PRIORITY


class ApiKey(SQLModel, table=True):
    """An API key, stored as its SHA-256 (keys are 256-bit random: a slow hash adds nothing)."""

    __tablename__ = "api_keys"

    id: str = Field(primary_key=True, max_length=36)
    user_id: str = Field(foreign_key="users.id", max_length=36, index=True)
    name: str | None = Field(default=None, max_length=200)
    prefix: str = Field(max_length=16)  # the key's first characters, to tell keys apart
    key_hash: str = Field(max_length=64, sa_column_kwargs={"unique": True})
    created_at: datetime = _ts(default_factory=utcnow)
    last_used_at: datetime | None = _ts(default=None)
    revoked_at: datetime | None = _ts(default=None)


class SenderSettings(SQLModel, table=True):
    """How one user's emails leave: the driver, its settings (secrets encrypted) and the user's limits."""

    __tablename__ = "sender_settings"

    user_id: str = Field(primary_key=True, foreign_key="users.id", max_length=36)
    driver: str = Field(default="system_smtp", max_length=16)
    smtp_host: str | None = Field(default=None, max_length=255)
    smtp_port: int | None = None
    smtp_username: str | None = Field(default=None, max_length=255)
    smtp_security: str | None = Field(default=None, max_length=16)
    smtp_password_enc: str | None = Field(default=None, sa_type=sa.Text)
    api_key_enc: str | None = Field(default=None, sa_type=sa.Text)  # SendGrid/Mailgun key, SES access key id
    api_secret_enc: str | None = Field(default=None, sa_type=sa.Text)  # SES secret access key
    mailgun_domain: str | None = Field(default=None, max_length=255)
    mailgun_region: str | None = Field(default=None, max_length=8)
    ses_region: str | None = Field(default=None, max_length=32)
    default_from: str | None = Field(default=None, max_length=512)
    hourly_limit: int | None = None
    daily_limit: int | None = None
    updated_at: datetime = _ts(default_factory=utcnow)
    # Provider events in, per user (/v1/inbound/<provider>/<user id>; mailqueue/inbound.py Keys.of_sender):
    # what the user's own provider account signs its events with.
    sns_topic_arns: list[str] | None = _json(default=None)  # SES: the SNS topics whose events are theirs
    sendgrid_webhook_public_key: str | None = Field(default=None, sa_type=sa.Text)  # base64 DER (not secret)
    mailgun_webhook_signing_key_enc: str | None = Field(default=None, sa_type=sa.Text)  # a secret: encrypted


class SenderUsage(SQLModel, table=True):
    """Emails a sender started sending in one window (an hour or a day): the quota counter."""

    __tablename__ = "sender_usage"

    sender: str = Field(primary_key=True, max_length=80)  # "user:<id>"
    window: str = Field(primary_key=True, max_length=16)  # "h2026112504" or "d20261125"
    count: int = 0


class DomainStatus(StrEnum):
    PENDING = "pending"  # added; its TXT record not seen yet
    VERIFIED = "verified"  # the record was seen (or an admin vouched for it): the user may send from it


class SenderDomain(SQLModel, table=True):
    """A domain a user sends from, once they proved it is theirs with a DNS TXT record (mailqueue/domains.py).

    One row per user and domain: two users may each prove the same domain with their own token.
    Its DKIM keys are rows of dkim_keys (DkimKey), removed with it."""

    __tablename__ = "sender_domains"
    __table_args__ = (sa.UniqueConstraint("user_id", "domain", name="uq_sender_domains_user_domain"),)

    id: str = Field(primary_key=True, max_length=36)
    user_id: str = Field(foreign_key="users.id", max_length=36, index=True)
    domain: str = Field(max_length=253, index=True)  # ASCII (IDNA) and lower case: xn--bcher-kva.de, never bücher.de
    token: str = Field(max_length=64)  # published as "mailqueue-verification=<token>" at _mailqueue.<domain>
    status: str = Field(default=DomainStatus.PENDING.value, max_length=16)
    verified_at: datetime | None = _ts(default=None)
    verified_by: str | None = Field(default=None, max_length=80)  # "dns", or "admin:<who>" for an admin's override
    created_at: datetime = _ts(default_factory=utcnow)


class DkimAlgorithm(StrEnum):
    RSA = "rsa-sha256"  # RSA-2048: what every receiver verifies
    ED25519 = "ed25519-sha256"  # RFC 8463: short keys; receivers that know it check it beside the RSA one


class DkimKey(SQLModel, table=True):
    """A DKIM signing key of a sender domain (mailqueue/dkim_keys.py), published at
    `<selector>._domainkey.<domain>`. Active until a rotation retires it; a retired key stays listed
    (its record must stay in DNS while mail signed with it may still be checked)."""

    __tablename__ = "dkim_keys"
    __table_args__ = (sa.UniqueConstraint("domain_id", "selector", name="uq_dkim_keys_domain_selector"),)

    id: str = Field(primary_key=True, max_length=36)
    domain_id: str = Field(foreign_key="sender_domains.id", ondelete="CASCADE", max_length=36)
    selector: str = Field(max_length=63)  # one DNS label: mq<yyyymmdd><n>-rsa, mq<yyyymmdd><n>-ed25519
    algorithm: str = Field(max_length=16)  # DkimAlgorithm
    private_key_enc: str = Field(sa_type=sa.Text)  # encrypted with mailqueue.crypto.SecretBox; decrypted in the send step only
    public_key: str = Field(sa_type=sa.Text)  # base64, the p= of the TXT record
    published: bool | None = None  # the record was found in DNS at the last check (None: never checked)
    checked_at: datetime | None = _ts(default=None)
    created_at: datetime = _ts(default_factory=utcnow)
    retired_at: datetime | None = _ts(default=None)  # None: active (it signs)


class RateLimitCounter(SQLModel, table=True):
    """Requests one API key made in one minute: the door's rate limit (mailqueue/ratelimit.py).

    Keyed by minute first, so the old minutes go in one range delete."""

    __tablename__ = "rate_limit_counters"

    minute: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})  # minutes since the epoch
    subject: str = Field(primary_key=True, max_length=64)  # a hash of the key, never the key
    count: int = 0


class SuppressionReason(StrEnum):
    HARD_BOUNCE = "hard_bounce"  # the address does not exist (a 5xx bounce)
    COMPLAINT = "complaint"  # the recipient marked a mail as spam
    UNSUBSCRIBE = "unsubscribe"  # the recipient followed a List-Unsubscribe link
    MANUAL = "manual"  # added by hand (POST /v1/suppressions)


class Suppression(SQLModel, table=True):
    """An address one sender does not mail any more, and why (mailqueue/suppressions.py).

    Matched on `match_key` (the local part as written, the domain in lower-case ASCII), so
    Ann@Example.ORG and Ann@example.org are one entry; `address` keeps the spelling it came with."""

    __tablename__ = "suppressions"
    __table_args__ = (
        # Also the index of the send step's lookup: one sender, a few addresses.
        sa.UniqueConstraint("sender", "match_key", name="uq_suppressions_sender_match_key"),
        sa.Index("ix_suppressions_sender_created", "sender", "created_at"),
    )

    id: str = Field(primary_key=True, max_length=36)
    sender: str = Field(max_length=80)  # "system:" or "user:<id>" (mailqueue.senders.sender_key)
    address: str = Field(max_length=320)
    match_key: str = Field(max_length=320)
    reason: str = Field(max_length=16)
    source: str = Field(max_length=32)  # api, unsubscribe link (later ses, smtp-dsn, ...)
    created_at: datetime = _ts(default_factory=utcnow)


# --- Provider events in (issue 14; mailqueue/inbound.py) ---------------------------------------


class InboundToken(SQLModel, table=True):
    """A signed webhook token already accepted (Mailgun's `token`): the same one again is a replay.

    Shared by every API process. Rows older than the staleness window are purged: a token that old
    is refused as stale anyway."""

    __tablename__ = "inbound_tokens"

    digest: str = Field(primary_key=True, max_length=64)  # SHA-256 of provider and token, hex
    seen_at: datetime = _ts(default_factory=utcnow, index=True)


# --- outbound webhooks (issue 14; mailqueue/webhooks.py, README "Webhooks") ------------------


class WebhookStatus(StrEnum):
    ACTIVE = "active"  # its workflow delivers every new event
    DISABLED = "disabled"  # failed for longer than MAILQUEUE_WEBHOOK_DISABLE_AFTER_SECONDS: nothing is sent


class WebhookEndpoint(SQLModel, table=True):
    """A URL that gets its owner's email events, signed (Standard Webhooks), by a workflow of its own."""

    __tablename__ = "webhook_endpoints"
    __table_args__ = (sa.Index("ix_webhook_endpoints_owner_created", "owner", "created_at"),)

    id: str = Field(primary_key=True, max_length=36)
    owner: str = Field(max_length=80)  # "system:" or "user:<id>" (mailqueue.senders.sender_key)
    url: str = Field(max_length=2048)
    event_types: list[str] = _json(default_factory=list)  # empty: every type
    secret_enc: str = Field(sa_type=sa.Text)  # "whsec_..." encrypted with mailqueue.crypto.SecretBox
    status: str = Field(default=WebhookStatus.ACTIVE.value, max_length=16)
    disabled_reason: str | None = Field(default=None, sa_type=sa.Text)
    disabled_at: datetime | None = _ts(default=None)
    failing_since: datetime | None = _ts(default=None)  # the first failed attempt since the last success
    cursor: str = Field(default="0-0", max_length=40)  # the feed cursor of the last event delivered
    created_at: datetime = _ts(default_factory=utcnow)
    updated_at: datetime = _ts(default_factory=utcnow)


class WebhookDelivery(SQLModel, table=True):
    """One attempt to POST one event to one endpoint, whatever came of it."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (sa.Index("ix_webhook_deliveries_endpoint_created", "endpoint_id", "created_at"),)

    id: str = Field(primary_key=True, max_length=36)
    endpoint_id: str = Field(foreign_key="webhook_endpoints.id", ondelete="CASCADE", max_length=36)
    event_id: str = Field(max_length=36)  # the email event's id: the webhook-id header, the same on every attempt
    event_type: str = Field(max_length=32)
    attempt: int = 1
    status_code: int | None = None  # None: no answer (refused, timed out, destination refused)
    latency_ms: int | None = None
    error: str | None = Field(default=None, max_length=300)
    redelivery: bool = False
    created_at: datetime = _ts(default_factory=utcnow)


class BlobStorage(StrEnum):
    SQL = "sql"  # in blob_chunks, next to the records
    S3 = "s3"  # an object in MAILQUEUE_BLOB_URL's bucket, named by the blob's id


class Blob(SQLModel, table=True):
    """A stored file: an upload (POST /v1/uploads) or an attachment given inline. The bytes live in
    blob_chunks or in S3 (`storage`); workflows carry only the id, size and hash (mailqueue/blobs.py)."""

    __tablename__ = "blobs"
    __table_args__ = (sa.Index("ix_blobs_owner", "owner_type", "owner_id"),)

    id: str = Field(primary_key=True, max_length=36)
    owner_type: str = Field(max_length=16)  # the sender it belongs to: system or user (with owner_id)
    owner_id: str | None = Field(default=None, max_length=64)
    size: int = Field(sa_type=sa.BigInteger)
    sha256: str = Field(max_length=64)
    content_type: str = Field(max_length=255)  # as declared and checked, or as sniffed
    filename: str = Field(max_length=255)
    storage: str = Field(default=BlobStorage.SQL.value, max_length=8)
    created_at: datetime = _ts(default_factory=utcnow)
    # Uploads may be attached until then; inline attachments have none. Either way a blob stays while
    # an email names it (email_attachments), and goes with the last of them (retention).
    expires_at: datetime | None = _ts(default=None)


class BlobChunk(SQLModel, table=True):
    """A blob's bytes in the SQL database, in pieces of at most mailqueue.blobs.CHUNK_BYTES."""

    __tablename__ = "blob_chunks"

    blob_id: str = Field(primary_key=True, max_length=36, sa_type=sa.String(36), foreign_key="blobs.id", ondelete="CASCADE")
    seq: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})
    data: bytes = Field(sa_type=sa.LargeBinary)


class EmailAttachment(SQLModel, table=True):
    """Which blobs an email sends. The blob cannot be deleted while a row names it (no ON DELETE):
    it outlives every email that sends it, and goes only after the last of them is purged."""

    __tablename__ = "email_attachments"

    email_id: str = Field(primary_key=True, max_length=36, sa_type=sa.String(36), foreign_key="emails.id", ondelete="CASCADE")
    position: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})
    blob_id: str = Field(max_length=36, sa_type=sa.String(36), foreign_key="blobs.id", index=True)


class FeatureFlag(SQLModel, table=True):
    """A feature flag an admin has set (PUT /v1/flags/{key}). A known flag without a row has its
    default (mailqueue/flags.py FLAGS); every process evaluates a cached copy of this table."""

    __tablename__ = "feature_flags"
    __table_args__ = (sa.CheckConstraint("percentage BETWEEN 0 AND 100", name="ck_feature_flags_percentage"),)

    key: str = Field(primary_key=True, max_length=100)
    enabled: bool
    percentage: int | None = None  # a rollout: on for this share of senders (a stable hash of flag and sender)
    senders: list[str] = _json(default_factory=list)  # sender keys it is always on for ("system:", "user:<id>")
    updated_at: datetime = _ts(default_factory=utcnow)
    updated_by: str = Field(max_length=80)  # the principal's id, or "admin" (the bootstrap key): never a key


class FlagAudit(SQLModel, table=True):
    """One change of one flag: who, when, the state before and after, and why."""

    __tablename__ = "flag_audit"
    __table_args__ = (sa.Index("ix_flag_audit_key_at", "key", "at"), sa.Index("ix_flag_audit_at", "at"))

    id: str = Field(primary_key=True, max_length=36)
    key: str = Field(max_length=100)
    at: datetime = _ts(default_factory=utcnow)
    actor: str = Field(max_length=80)
    old: dict[str, Any] | None = _json(default=None)  # {enabled, percentage, senders} before (the default when never set)
    new: dict[str, Any] = _json()
    reason: str = Field(sa_type=sa.Text)


class MaintenanceRun(SQLModel, table=True):
    """One run of a maintenance job (the retention purge, mailqueue/retention.py): what it removed.
    Written by whichever worker ran it, read by /v1/stats in any API process."""

    __tablename__ = "maintenance_runs"
    __table_args__ = (sa.Index("ix_maintenance_runs_job_finished", "job", "finished_at"),)

    id: str = Field(primary_key=True, max_length=36)
    job: str = Field(max_length=32)  # "purge"
    started_at: datetime = _ts()
    finished_at: datetime = _ts()
    cutoff: datetime | None = _ts(default=None)  # purge: emails last changed before this went
    emails: int = 0
    events: int = 0
    blobs: int = 0
    batches: int = 0
