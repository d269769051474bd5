"""Email records and their events: the SQL side of the API, the audit step and the reconciler."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from mailqueue.blobs import attachment_rows
from mailqueue.contracts import (
    FINAL,
    WENT_OUT,
    AttachmentRef,
    AuditEntry,
    Content,
    EmailSpec,
    EmailStatus,
    EventType,
    RetrySettings,
    SenderType,
    TemplatePin,
    TemplateRef,
    status_values,
    workflow_id_for,
)
from mailqueue.message import bare_address
from mailqueue.models import Blob, Email, EmailEvent, EmailRecipient, utcnow


def record_from_spec(spec: EmailSpec, *, idempotency_key: str | None = None, request_hash: str | None = None) -> Email:
    content = spec.content
    template = spec.template
    return Email(
        id=spec.email_id,
        workflow_id=workflow_id_for(spec.email_id),
        sender_type=spec.sender_type,
        sender_id=spec.sender_id,
        from_address=spec.from_address,
        reply_to=spec.reply_to,
        to=list(spec.to),
        cc=list(spec.cc),
        bcc=list(spec.bcc),
        subject=content.subject if content else None,
        html=content.html if content else None,
        text=content.text if content else None,
        template_name=template.name if template else None,
        template_version=template.version if template else None,
        template_data=template.data if template else None,
        locale=template.format_locale if template else None,
        template_locale=template.locale if template else None,
        template_dependencies=[asdict(p) for p in template.dependencies] if template and template.dependencies else None,
        headers=dict(spec.headers),
        priority=spec.priority,
        status=EmailStatus.QUEUED.value,
        max_attempts=spec.retry.max_attempts,
        scheduled_for=spec.send_at,
        message_id=spec.message_id,
        related_entity_type=spec.related_entity_type,
        related_entity_id=spec.related_entity_id,
        tags=list(spec.tags),
        extra_metadata=dict(spec.metadata),
        idempotency_key=idempotency_key,
        request_hash=request_hash,
        attachments=[asdict(a) for a in spec.attachments] or None,
    )


def spec_from_record(email: Email, retry: RetrySettings) -> EmailSpec:
    """The spec to deliver a recorded email again (a retry run): same id, same Message-ID."""
    template = (
        TemplateRef(
            name=email.template_name,
            version=email.template_version or 1,
            locale=email.template_locale,
            data=dict(email.template_data or {}),
            dependencies=[TemplatePin(**p) for p in email.template_dependencies or []],
            format_locale=email.locale,
        )
        if email.template_name
        else None
    )
    content = None if template else Content(subject=email.subject or "", html=email.html, text=email.text)
    return EmailSpec(
        email_id=email.id,
        message_id=email.message_id,
        from_address=email.from_address,
        to=list(email.to),
        cc=list(email.cc),
        bcc=list(email.bcc),
        reply_to=email.reply_to,
        content=content,
        template=template,
        headers=dict(email.headers),
        retry=retry,
        priority=email.priority,
        tags=list(email.tags),
        metadata=dict(email.extra_metadata),
        related_entity_type=email.related_entity_type,
        related_entity_id=email.related_entity_id,
        sender_type=SenderType(email.sender_type),
        sender_id=email.sender_id,
        attachments=[AttachmentRef(**a) for a in email.attachments or ()],
    )


def recipients_of(email: Email) -> list[EmailRecipient]:
    rows: dict[tuple[str, str], EmailRecipient] = {}
    for kind, addresses in (("to", email.to), ("cc", email.cc), ("bcc", email.bcc)):
        for address in addresses:
            bare = bare_address(address).lower()
            rows[(kind, bare)] = EmailRecipient(email_id=email.id, kind=kind, address=bare)
    return list(rows.values())


async def insert_email(session: AsyncSession, email: Email) -> None:
    """Add the record, its recipient rows and its `queued` event; the caller commits."""
    session.add(email)
    await session.flush()  # the parent row first: recipients and events reference it
    session.add_all(recipients_of(email))
    session.add_all(attachment_rows(email.id, email.attachments))  # its blobs are added (flushed) already
    session.add(queued_event(email.id, "accepted"))


def queued_event(email_id: str, detail: str) -> EmailEvent:
    return EmailEvent(
        id=str(uuid.uuid4()), email_id=email_id, event=EventType.QUEUED.value, status=EmailStatus.QUEUED.value, attempt=0, detail=detail
    )


_AUDITED_FIELDS = ("scheduled_for", "sent_at", "provider", "provider_message_id", "last_error")


class RecordClosed(Exception):
    """The record already says failed or cancelled: its workflow run has ended. An attempt still
    running then (one that outlived its run on a starved worker) must not send, nor write `sending`
    over the final status."""

    def __init__(self, email_id: str, status: str) -> None:
        super().__init__(f"email {email_id} is already {status}: this attempt outlived its workflow run and does not send")
        self.status = status


@dataclass(frozen=True)
class PriorDelivery:
    """What the record says of a delivery that already happened."""

    attempt: int
    sent_at: datetime | None
    provider: str | None
    provider_message_id: str | None


async def apply_audit(session: AsyncSession, entry: AuditEntry, *, unless_final: bool = False) -> PriorDelivery | None:
    """Record one audit step: update the record, add the event, in one transaction.

    Idempotent: the event id makes a repeated step a no-op. Plain SQL statements (two in the
    common case) because this runs for every step of every email.

    `unless_final` (the `sending` step): when the record already says `sent`, change nothing and
    return what it says, so that a send retried after the mail went out does not go out again; when
    it says failed or cancelled, change nothing and raise RecordClosed. The check rides on the same
    UPDATE, so it costs nothing when the record is not final."""
    values: dict[str, object] = {"updated_at": utcnow(), "next_attempt_at": entry.next_attempt_at}
    if entry.status is not None:
        values["status"] = entry.status.value
    if entry.attempt is not None:
        values["attempts"] = entry.attempt
    for name in _AUDITED_FIELDS:
        value = getattr(entry, name)
        if value is not None:
            values[name] = value
    if entry.content is not None:
        values.update(subject=entry.content.subject, html=entry.content.html, text=entry.content.text)
    emails, events = Email.__table__, EmailEvent.__table__  # type: ignore[attr-defined]
    conn = await session.connection()
    update = sa.update(emails).where(emails.c.id == entry.email_id)
    if unless_final:
        update = update.where(emails.c.status.not_in(status_values(FINAL)))
    updated = await conn.execute(update.values(**values))
    if updated.rowcount == 0 and unless_final:  # type: ignore[attr-defined]
        row = (
            await conn.execute(
                sa.select(emails.c.status, emails.c.attempts, emails.c.sent_at, emails.c.provider, emails.c.provider_message_id)
                .where(emails.c.id == entry.email_id)
            )
        ).first()
        if row is not None and EmailStatus(row.status) in WENT_OUT:
            await session.rollback()
            return PriorDelivery(row.attempts, row.sent_at, row.provider, row.provider_message_id)
        if row is not None and EmailStatus(row.status).is_final:
            await session.rollback()
            raise RecordClosed(entry.email_id, row.status)
    if updated.rowcount == 0:  # type: ignore[attr-defined]
        if entry.spec is None:
            raise LookupError(f"email {entry.email_id} has no record")
        email = record_from_spec(entry.spec)
        for name, value in values.items():
            setattr(email, name, value)
        session.add(email)
        await session.flush()
        session.add_all(recipients_of(email))
        if email.attachments:  # a workflow started without the API (the CLI): link the blobs that exist
            stored = set((await session.exec(select(Blob.id).where(col(Blob.id).in_([a["blob_id"] for a in email.attachments])))).all())
            session.add_all(row for row in attachment_rows(email.id, email.attachments) if row.blob_id in stored)
    try:
        await (await session.connection()).execute(
            sa.insert(events).values(
                id=entry.event_id,
                email_id=entry.email_id,
                event=entry.event.value,
                status=entry.status.value if entry.status else None,
                attempt=entry.attempt,
                detail=entry.detail,
                created_at=entry.at,
            )
        )
        await session.commit()
    except IntegrityError:
        await session.rollback()  # this step was recorded before (a retried activity)
        if await session.get(EmailEvent, entry.event_id) is None:
            raise
    return None


async def events_of(session: AsyncSession, email_id: str) -> Sequence[EmailEvent]:
    """An email's events, oldest first."""
    return (await events_of_many(session, [email_id]))[email_id]


async def events_of_many(session: AsyncSession, email_ids: Sequence[str]) -> dict[str, list[EmailEvent]]:
    """The events of each of these emails, oldest first, in one query (a list of emails with their events)."""
    found: dict[str, list[EmailEvent]] = {email_id: [] for email_id in email_ids}
    result = await session.exec(
        select(EmailEvent)
        .where(col(EmailEvent.email_id).in_(list(found)))
        .order_by(col(EmailEvent.created_at), col(EmailEvent.id))
    )
    for event in result.all():
        found[event.email_id].append(event)
    return found
