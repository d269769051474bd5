"""Templates: versioned, layered, localized; checked when saved; previews; loading the templates folder."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from sqlmodel import col, select

from api.schemas.templates import PreviewOut, ReloadOut, TemplateBody, TemplateIn, TemplatePinOut
from api.services.context import Context
from api.services.errors import Conflict, Invalid, NotFound, field_error, invalid
from mailqueue.contracts import TemplatePin
from mailqueue.errors import TemplateError
from mailqueue.models import EmailTemplate
from mailqueue.template_library import MissingVariables, Problem, TemplateLimitError, check_draft, prepare, reload_folder
from mailqueue.template_store import (
    current_exact,
    current_template,
    deactivate_template,
    pin_of,
    save_template_version,
    template_version,
    template_versions,
)
from mailqueue.templating import TemplateSource, check_locale

# What TemplateIn accepts: a name outside it was never stored, so it is unknown without a query (NUL cannot be searched).
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,200}$")


def locale_of(value: str) -> str:
    """A locale given in the query ('' is the default variant), checked."""
    try:
        return check_locale(value) or ""
    except ValueError as exc:
        raise invalid(("query", "locale"), str(exc), value=value) from None


def _unprocessable(problems: list[Problem]) -> Invalid:
    return Invalid([
        field_error(
            ("body", p.field) if p.template is None else ("body", p.template, p.field),
            f"line {p.line}: {p.message}" if p.line else p.message,
            line=p.line, **_kind(p.limit),
        )
        for p in problems
    ])


def _kind(limit: str | None) -> dict[str, Any]:
    """A render that broke a limit (string, loop, cpu, time, memory, ...) says which; other template errors are just that."""
    return {"type": "template_limit", "limit": limit} if limit else {"type": "template_error"}


def pin_out(p: TemplatePin | TemplateSource) -> TemplatePinOut:
    return TemplatePinOut(name=p.name, locale=p.locale or "", version=p.version)


async def _save(ctx: Context, name: str, body: TemplateBody) -> EmailTemplate:
    draft = TemplateSource(name=name, version=0, locale=body.locale, subject=body.subject or "", html=body.html, text=body.text)
    problems = await check_draft(ctx.session, ctx.templates, draft, body.sample_data)
    if problems:
        raise _unprocessable(problems)
    fields = body.model_dump(exclude={"subject"})
    row = EmailTemplate(name=name, subject=body.subject or "", created_by=ctx.principal.author, **fields)
    return await save_template_version(ctx.session, row)


async def create(ctx: Context, body: TemplateIn) -> EmailTemplate:
    """A new template, or a new locale variant of one; Conflict if it exists (a new version is `put`)."""
    existing = await current_exact(ctx.session, body.name, body.locale)
    if existing is not None and existing.is_active:
        raise Conflict(f"template {body.name!r} ({body.locale or 'default'}) exists; PUT /v1/templates/{body.name} makes a new version")
    return await _save(ctx, body.name, TemplateBody.model_validate(body.model_dump(exclude={"name"})))


async def list_current(ctx: Context, include_inactive: bool) -> Sequence[EmailTemplate]:
    """The current version of every template and variant."""
    query = select(EmailTemplate).where(col(EmailTemplate.is_current).is_(True))
    if not include_inactive:
        query = query.where(col(EmailTemplate.is_active).is_(True))
    return (await ctx.session.exec(query.order_by(col(EmailTemplate.name), col(EmailTemplate.locale)))).all()


async def reload(ctx: Context) -> ReloadOut:
    """Load MAILQUEUE_TEMPLATES_DIR: a new version of every template whose files changed; all or nothing."""
    result = await reload_folder(ctx.session, ctx.templates, ctx.settings.templates_dir, created_by=f"reload:{ctx.principal.author}")
    if result.problems:
        raise _unprocessable(result.problems)
    return ReloadOut(
        directory=str(ctx.settings.templates_dir.resolve()),
        created=[pin_out(p) for p in result.created],
        unchanged=[pin_out(p) for p in result.unchanged],
    )


async def get(ctx: Context, name: str, locale: str, version: int | None) -> EmailTemplate:
    """The current version of a template variant (active or not), or a stored one."""
    locale = locale_of(locale)
    if not _NAME.match(name):
        row = None
    else:
        row = await (template_version(ctx.session, name, locale, version) if version else current_exact(ctx.session, name, locale))
    if row is None:
        raise NotFound(f"no template {name!r}" + (f" ({locale})" if locale else "") + (f" version {version}" if version else ""))
    return row


async def put(ctx: Context, name: str, body: TemplateBody) -> tuple[EmailTemplate, bool | None]:
    """Save a new version (or the first one). Unchanged content keeps the current version.

    Returns the version and whether it is the first of this variant (None: nothing was saved)."""
    try:
        body.check_parts(name)
    except ValueError as exc:
        raise invalid(("body",), str(exc)) from None
    current = await current_exact(ctx.session, name, body.locale)
    if current is not None and current.is_active and _same(current, body):
        return current, None
    return await _save(ctx, name, body), current is None


def _same(row: EmailTemplate, body: TemplateBody) -> bool:
    fields: dict[str, Any] = body.model_dump()
    fields["subject"] = body.subject or ""
    return all(getattr(row, k) == v for k, v in fields.items())


async def deactivate(ctx: Context, name: str, locale: str | None) -> None:
    """New emails can no longer use it (every variant, or one); queued ones still go out. Idempotent."""
    locale = locale_of(locale) if locale is not None else None
    if not _NAME.match(name):
        raise NotFound(f"no template {name!r}")
    changed = await deactivate_template(ctx.session, name, locale)
    if not changed:  # already inactive is fine (deactivating is idempotent); never stored is unknown
        query = select(EmailTemplate.id).where(EmailTemplate.name == name)
        if locale is not None:
            query = query.where(EmailTemplate.locale == locale)
        if (await ctx.session.exec(query.limit(1))).first() is None:
            raise NotFound(f"no template {name!r}" + (f" ({locale or 'default'})" if locale is not None else ""))


async def versions(ctx: Context, name: str, locale: str) -> Sequence[EmailTemplate]:
    """Every stored version of a variant, newest first."""
    rows = await template_versions(ctx.session, name, locale_of(locale)) if _NAME.match(name) else []
    if not rows:
        raise NotFound(f"no template {name!r}" + (f" ({locale})" if locale else ""))
    return rows


async def preview(ctx: Context, name: str, locale: str | None, version: int | None, data: dict[str, Any] | None) -> PreviewOut:
    """The template rendered with `data` (None: its stored sample data), as an email would be."""
    session = ctx.session
    if not _NAME.match(name):
        row = None
    elif version is not None:
        row = await template_version(session, name, locale or "", version)
    else:
        row = await current_template(session, name, locale)
    if row is None:
        raise NotFound(f"no active template {name!r}" + (f" version {version}" if version else ""))
    source = "request" if data is not None else "sample_data"
    if data is None:
        data = row.sample_data
        if data is None and row.locale:  # a variant without its own sample data: the default variant's
            default = await current_exact(session, name, "")
            data = default.sample_data if default is not None else None
        data = data or {}
    try:
        prepared = await prepare(session, ctx.templates, row, data, locale)
    except MissingVariables as exc:
        hint = "" if source == "request" else " (the template's sample_data lacks them; send data in the body)"
        raise invalid(("body", "data"), f"{exc}{hint}", type="missing_variables", missing=exc.names) from None
    except TemplateError as exc:
        raise invalid(("body", "data"), str(exc), **_kind(exc.limit if isinstance(exc, TemplateLimitError) else None)) from None
    return PreviewOut(
        subject=prepared.content.subject,
        html=prepared.content.html,
        text=prepared.content.text,
        template=pin_out(pin_of(prepared.main)),
        dependencies=[pin_out(d) for d in sorted(prepared.dependencies.values(), key=lambda s: s.name)],
        data_source=source,
    )
