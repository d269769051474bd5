"""Template versions: the SQL side of templates (current and pinned versions, saving, deactivating)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from mailqueue.contracts import TemplatePin
from mailqueue.errors import TemplateError
from mailqueue.models import EmailTemplate, utcnow
from mailqueue.templating import TemplateEngine, TemplateSource


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


async def current_exact(session: AsyncSession, name: str, locale: str) -> EmailTemplate | None:
    """The current version of exactly this variant (active or not): no locale fallback."""
    return (
        await session.exec(
            select(EmailTemplate).where(
                EmailTemplate.name == name, EmailTemplate.locale == locale, col(EmailTemplate.is_current).is_(True)
            )
        )
    ).first()


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
