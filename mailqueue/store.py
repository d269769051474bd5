"""Reading and writing email records: the SQL side of the API and of the activities."""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass
from datetime import datetime
from collections import OrderedDict
from collections.abc import Iterable, Sequence

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from mailqueue.contracts import AuditEntry, Content, EmailSpec, EmailStatus, RetrySettings, TemplatePin, TemplateRef, workflow_id_for
from mailqueue.errors import TemplateError
from mailqueue.message import bare_address
from mailqueue.models import Email, EmailEvent, EmailRecipient, EmailTemplate, utcnow
from mailqueue.templating import TemplateEngine, TemplateSource


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


@dataclass(frozen=True)
class PriorDelivery:
    """What the record says of a delivery that already happened."""

    attempt: int
    sent_at: datetime | None
    provider: str | None
    provider_message_id: str | None


async def apply_audit(session: AsyncSession, entry: AuditEntry, *, unless_sent: bool = False) -> PriorDelivery | None:
    """Record one audit step: update the record, add the event, in one transaction.

    Idempotent: the event id makes a repeated step a no-op. Plain SQL statements (two in the
    common case) because this runs for every step of every email.

    `unless_sent` (the `sending` step): when the record already says `sent`, change nothing and
    return what it says, so that a send retried after the mail went out does not go out again.
    The check rides on the same UPDATE, so it costs nothing when the record is not sent."""
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
    if unless_sent:
        update = update.where(emails.c.status != EmailStatus.SENT.value)
    updated = await conn.execute(update.values(**values))
    if updated.rowcount == 0 and unless_sent:  # type: ignore[attr-defined]
        row = (
            await conn.execute(
                sa.select(emails.c.status, emails.c.attempts, emails.c.sent_at, emails.c.provider, emails.c.provider_message_id)
                .where(emails.c.id == entry.email_id)
            )
        ).first()
        if row is not None and row.status == EmailStatus.SENT.value:
            await session.rollback()
            return PriorDelivery(row.attempts, row.sent_at, row.provider, row.provider_message_id)
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
    return None


async def events_of(session: AsyncSession, email_id: str) -> Sequence[EmailEvent]:
    result = await session.exec(
        select(EmailEvent)
        .where(EmailEvent.email_id == email_id)
        .order_by(col(EmailEvent.created_at), col(EmailEvent.id))
    )
    return result.all()


def locale_chain(locale: str | None) -> list[str]:
    """`pt-BR` → pt-BR, pt, then the default variant ''."""
    chain = [locale or "", (locale or "").split("-")[0], ""]
    return list(dict.fromkeys(chain))


def source_of(row: EmailTemplate) -> TemplateSource:
    return TemplateSource(
        name=row.name, version=row.version, locale=row.locale, subject=row.subject, html=row.html, text=row.text
    )


def pin_of(src: TemplateSource) -> TemplatePin:
    return TemplatePin(name=src.name, version=src.version, locale=src.locale)


async def current_templates(session: AsyncSession, names: Iterable[str], locale: str | None) -> dict[str, EmailTemplate]:
    """The active current version of each name, in the best variant for `locale` (see `locale_chain`)."""
    names = set(names)
    if not names:
        return {}
    chain = locale_chain(locale)
    rows = (
        await session.exec(
            select(EmailTemplate).where(
                col(EmailTemplate.name).in_(names),
                col(EmailTemplate.locale).in_(chain),
                col(EmailTemplate.is_current).is_(True),
                col(EmailTemplate.is_active).is_(True),
            )
        )
    ).all()
    best: dict[str, EmailTemplate] = {}
    for row in rows:
        held = best.get(row.name)
        if held is None or chain.index(row.locale) < chain.index(held.locale):
            best[row.name] = row
    return best


async def current_template(session: AsyncSession, name: str, locale: str | None = None) -> EmailTemplate | None:
    """The active, current version of a template, preferring the locale's variant."""
    return (await current_templates(session, [name], locale)).get(name)


async def template_version(session: AsyncSession, name: str, locale: str | None, version: int) -> EmailTemplate | None:
    result = await session.exec(
        select(EmailTemplate).where(
            EmailTemplate.name == name,
            EmailTemplate.locale == (locale or ""),
            EmailTemplate.version == version,
        )
    )
    return result.first()


async def template_versions(session: AsyncSession, name: str, locale: str | None) -> Sequence[EmailTemplate]:
    result = await session.exec(
        select(EmailTemplate)
        .where(EmailTemplate.name == name, EmailTemplate.locale == (locale or ""))
        .order_by(col(EmailTemplate.version).desc())
    )
    return result.all()


class SourceCache:
    """Template versions never change, so a version read once is kept (bounded, least recently used first out)."""

    def __init__(self, size: int = 2048) -> None:
        self._items: OrderedDict[tuple[str, str, int], TemplateSource] = OrderedDict()
        self._size = size

    def get(self, key: tuple[str, str, int]) -> TemplateSource | None:
        src = self._items.get(key)
        if src is not None:
            self._items.move_to_end(key)
        return src

    def put(self, src: TemplateSource) -> TemplateSource:
        key = (src.name, src.locale, src.version)
        self._items[key] = src
        self._items.move_to_end(key)
        if len(self._items) > self._size:
            self._items.popitem(last=False)
        return src


async def pinned_source(session: AsyncSession, pin: TemplatePin, cache: SourceCache | None = None) -> TemplateSource | None:
    key = (pin.name, pin.locale or "", pin.version)
    if cache is not None and (src := cache.get(key)) is not None:
        return src
    row = await template_version(session, pin.name, pin.locale, pin.version)
    if row is None:
        return None
    src = source_of(row)
    return cache.put(src) if cache is not None else src


async def resolve_dependencies(
    session: AsyncSession,
    engine: TemplateEngine,
    main: TemplateSource,
    locale: str | None,
    pinned: Iterable[TemplatePin] = (),
    cache: SourceCache | None = None,
) -> dict[str, TemplateSource]:
    """Every layout and partial `main` reaches, transitively: the pinned versions where given, else the current ones.

    Raises TemplateError naming a template that is used but missing or inactive.
    """
    pins = {p.name: p for p in pinned}
    found: dict[str, TemplateSource] = {}
    wanted = set(engine.references(main)) - {main.name}
    used_by = {name: main.name for name in wanted}
    while wanted:
        fresh: list[TemplateSource] = []
        for name in sorted(n for n in wanted if n in pins):
            src = await pinned_source(session, pins[name], cache)
            if src is None:
                raise TemplateError(f"template {name!r} version {pins[name].version} ({used_by[name]!r} uses it) no longer exists")
            fresh.append(src)
        current = await current_templates(session, [n for n in wanted if n not in pins], locale)
        for name in sorted(n for n in wanted if n not in pins):
            if name not in current:
                raise TemplateError(f"template {used_by[name]!r} uses {name!r}, which does not exist or is inactive")
            fresh.append(source_of(current[name]))
        wanted = set()
        for src in fresh:
            found[src.name] = src
            for ref in engine.references(src):
                if ref not in found and ref != main.name and ref not in wanted:
                    wanted.add(ref)
                    used_by[ref] = src.name
    return found


async def save_template_version(session: AsyncSession, template: EmailTemplate) -> EmailTemplate:
    """Store a new version of `template.name`/`locale`; the previous one stays, no longer current.

    Saves of one name and locale are serialized (a transaction-scoped advisory lock on
    PostgreSQL; SQLite's writes are serialized already), and a writer that still meets a
    taken version number tries again with the next one.
    """
    for attempt in range(5):
        connection = await session.connection()
        if connection.dialect.name == "postgresql":
            key = f"email_templates:{template.name}:{template.locale}"
            await connection.execute(sa.text("SELECT pg_advisory_xact_lock(hashtextextended(:key, 0))"), {"key": key})
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
        row = EmailTemplate.model_validate(template.model_dump(exclude={"id"}))
        row.version = (latest or 0) + 1
        row.is_current = True
        row.is_active = True
        row.created_at = row.updated_at = utcnow()
        session.add(row)
        try:
            await session.commit()
        except IntegrityError:
            await session.rollback()
            if attempt == 4:
                raise
            continue
        await session.refresh(row)
        return row
    raise AssertionError("unreachable")


async def deactivate_template(session: AsyncSession, name: str, locale: str | None) -> int:
    """Stop new emails using `name` (one variant, or every variant when `locale` is None); returns rows changed."""
    query = sa.update(EmailTemplate).where(col(EmailTemplate.name) == name, col(EmailTemplate.is_active).is_(True))
    if locale is not None:
        query = query.where(col(EmailTemplate.locale) == locale)
    result = await (await session.connection()).execute(query.values(is_active=False, updated_at=utcnow()))
    await session.commit()
    return result.rowcount or 0
