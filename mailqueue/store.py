"""Reading and writing email records: the SQL side of the API and of the activities."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from mailqueue.contracts import AuditEntry, Content, EmailSpec, RetrySettings, TemplateRef, workflow_id_for
from mailqueue.message import bare_address
from mailqueue.models import Email, EmailEvent, EmailRecipient, EmailTemplate, utcnow


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
        locale=template.locale if template else None,
        headers=dict(spec.headers),
        priority=spec.priority,
        status="queued",
        max_attempts=spec.retry.max_attempts,
        scheduled_for=spec.send_at,
        message_id=spec.message_id,
        related_entity_type=spec.related_entity_type,
        related_entity_id=spec.related_entity_id,
        tags=list(spec.tags),
        extra_metadata=dict(spec.metadata),
        idempotency_key=idempotency_key,
        request_hash=request_hash,
    )


def spec_from_record(email: Email, retry: RetrySettings) -> EmailSpec:
    """The spec to deliver a recorded email again (a retry run): same id, same Message-ID."""
    template = (
        TemplateRef(
            name=email.template_name,
            version=email.template_version or 1,
            locale=email.locale,
            data=dict(email.template_data or {}),
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
        sender_type=email.sender_type,
        sender_id=email.sender_id,
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
    session.add(queued_event(email.id, "accepted"))


def queued_event(email_id: str, detail: str) -> EmailEvent:
    return EmailEvent(
        id=str(uuid.uuid4()), email_id=email_id, event="queued", status="queued", attempt=0, detail=detail
    )


_AUDITED_FIELDS = ("scheduled_for", "sent_at", "provider", "provider_message_id", "last_error")


async def apply_audit(session: AsyncSession, entry: AuditEntry) -> None:
    """Record one audit step: update the record, add the event, in one transaction.

    Idempotent: the event id makes a repeated step a no-op. Plain SQL statements (two in the
    common case) because this runs for every step of every email."""
    values: dict[str, object] = {"updated_at": utcnow(), "next_attempt_at": entry.next_attempt_at}
    if entry.status is not None:
        values["status"] = entry.status.value
    if entry.attempt is not None:
        values["attempts"] = entry.attempt
    for name in _AUDITED_FIELDS:
        value = getattr(entry, name)
        if value is not None:
            values[name] = value
    emails, events = Email.__table__, EmailEvent.__table__  # type: ignore[attr-defined]
    conn = await session.connection()
    updated = await conn.execute(sa.update(emails).where(emails.c.id == entry.email_id).values(**values))
    if updated.rowcount == 0:  # type: ignore[attr-defined]
        if entry.spec is None:
            raise LookupError(f"email {entry.email_id} has no record")
        email = record_from_spec(entry.spec)
        for name, value in values.items():
            setattr(email, name, value)
        session.add(email)
        await session.flush()
        session.add_all(recipients_of(email))
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


async def events_of(session: AsyncSession, email_id: str) -> Sequence[EmailEvent]:
    result = await session.exec(
        select(EmailEvent)
        .where(EmailEvent.email_id == email_id)
        .order_by(col(EmailEvent.created_at), col(EmailEvent.id))
    )
    return result.all()


async def current_template(session: AsyncSession, name: str, locale: str | None = None) -> EmailTemplate | None:
    """The active, current version of a template, preferring the locale's variant."""
    locales = [loc for loc in (locale, (locale or "").split("-")[0], "") if loc is not None]
    for loc in dict.fromkeys(locales):
        row = (
            await session.exec(
                select(EmailTemplate).where(
                    EmailTemplate.name == name,
                    EmailTemplate.locale == loc,
                    col(EmailTemplate.is_current).is_(True),
                )
            )
        ).first()
        if row is not None:
            return row if row.is_active else None
    return None


async def template_version(session: AsyncSession, name: str, locale: str | None, version: int) -> EmailTemplate | None:
    result = await session.exec(
        select(EmailTemplate).where(
            EmailTemplate.name == name,
            EmailTemplate.locale == (locale or ""),
            EmailTemplate.version == version,
        )
    )
    return result.first()


async def save_template_version(session: AsyncSession, template: EmailTemplate) -> EmailTemplate:
    """Store a new version of `template.name`/`locale`; the previous one stays, no longer current."""
    latest = (
        await session.exec(
            select(sa.func.max(EmailTemplate.version)).where(
                EmailTemplate.name == template.name, EmailTemplate.locale == template.locale
            )
        )
    ).one()
    await (await session.connection()).execute(
        sa.update(EmailTemplate)
        .where(col(EmailTemplate.name) == template.name, col(EmailTemplate.locale) == template.locale)
        .values(is_current=False)
    )
    template.version = (latest or 0) + 1
    template.is_current = True
    session.add(template)
    await session.commit()
    await session.refresh(template)
    return template
