"""/v1/templates: versioned, layered, localized templates; previews; loading the templates folder."""

from __future__ import annotations

import re
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Query, Response, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse
from sqlmodel import col, select

from api.deps import AdminDep, BrowserPrincipalDep, PrincipalDep, SessionDep, SettingsDep, TemplatesDep
from api.schemas import MAX_VERSION, PreviewIn, PreviewOut, ReloadOut, TemplateBody, TemplateIn, TemplateOut, TemplatePinOut
from mailqueue.contracts import TemplatePin
from mailqueue.errors import TemplateError
from mailqueue.models import EmailTemplate
from mailqueue.store import (
    current_template,
    deactivate_template,
    pin_of,
    save_template_version,
    template_version,
    template_versions,
)
from mailqueue.template_library import MissingVariables, Problem, check_draft, current_exact, prepare, reload_folder
from mailqueue.templating import TemplateEngine, TemplateSource, check_locale

router = APIRouter(prefix="/v1/templates", tags=["templates"])

NOT_FOUND = {404: {"description": "No such template"}}
LocaleQuery = Annotated[str, Query(max_length=35, description="The variant: '' (default), 'de', 'pt-BR', ...")]
VersionQuery = Annotated[int | None, Query(ge=1, le=MAX_VERSION)]
# What TemplateIn accepts: a name outside it was never stored, so it is a 404 without a query (NUL cannot be searched).
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,200}$")

# Template HTML is written by untrusted authors: shown in a browser it must not run scripts
# or reach anything, and it gets an opaque origin of its own (CSP sandbox).
PREVIEW_HEADERS = {
    "Content-Security-Policy": "sandbox; default-src 'none'; img-src * data:; style-src 'unsafe-inline'; font-src * data:",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def _out(t: EmailTemplate) -> TemplateOut:
    return TemplateOut.model_validate(t, from_attributes=True)


def _pin(p: TemplatePin | TemplateSource) -> TemplatePinOut:
    return TemplatePinOut(name=p.name, locale=p.locale or "", version=p.version)


def _locale(value: str) -> str:
    try:
        return check_locale(value) or ""
    except ValueError as exc:
        raise RequestValidationError([{"type": "value_error", "loc": ("query", "locale"), "msg": str(exc), "input": value}]) from None


def _unprocessable(problems: list[Problem]) -> RequestValidationError:
    return RequestValidationError(
        [
            {
                "type": "template_error",
                "loc": ("body", p.field) if p.template is None else ("body", p.template, p.field),
                "msg": f"line {p.line}: {p.message}" if p.line else p.message,
                "line": p.line,
                "input": None,
            }
            for p in problems
        ]
    )


async def _save(name: str, body: TemplateBody, principal: PrincipalDep, session: SessionDep, engine: TemplateEngine) -> EmailTemplate:
    draft = TemplateSource(name=name, version=0, locale=body.locale, subject=body.subject or "", html=body.html, text=body.text)
    problems = await check_draft(session, engine, draft, body.sample_data)
    if problems:
        raise _unprocessable(problems)
    fields = body.model_dump(exclude={"subject"})
    row = EmailTemplate(name=name, subject=body.subject or "", created_by=principal.id or principal.kind, **fields)
    return await save_template_version(session, row)


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=TemplateOut,
    responses={409: {"description": "The template (name + locale) exists; PUT changes it"}, 422: {"description": "Syntax or sample-data error, with the line"}},
    summary="Create a template (or a locale variant of one)",
)
async def create_template(
    body: TemplateIn, response: Response, principal: AdminDep, session: SessionDep, engine: TemplatesDep
) -> TemplateOut:
    existing = await current_exact(session, body.name, body.locale)
    if existing is not None and existing.is_active:
        raise HTTPException(status.HTTP_409_CONFLICT, f"template {body.name!r} ({body.locale or 'default'}) exists; PUT /v1/templates/{body.name} makes a new version")
    row = await _save(body.name, TemplateBody.model_validate(body.model_dump(exclude={"name"})), principal, session, engine)
    response.headers["Location"] = f"/v1/templates/{row.name}" + (f"?locale={row.locale}" if row.locale else "")
    return _out(row)


@router.get("", response_model=list[TemplateOut], summary="Current versions of all templates and their variants")
async def list_templates(
    principal: PrincipalDep, session: SessionDep, include_inactive: bool = False
) -> list[TemplateOut]:
    query = select(EmailTemplate).where(col(EmailTemplate.is_current).is_(True))
    if not include_inactive:
        query = query.where(col(EmailTemplate.is_active).is_(True))
    rows = await session.exec(query.order_by(col(EmailTemplate.name), col(EmailTemplate.locale)))
    return [_out(t) for t in rows.all()]


@router.post(
    "/reload",
    response_model=ReloadOut,
    responses={422: {"description": "A file has a problem; nothing was saved"}},
    summary="Load the templates folder: a new version of every template whose files changed",
)
async def reload_templates(principal: AdminDep, session: SessionDep, settings: SettingsDep, engine: TemplatesDep) -> ReloadOut:
    result = await reload_folder(session, engine, settings.templates_dir, created_by=f"reload:{principal.id or principal.kind}")
    if result.problems:
        raise _unprocessable(result.problems)
    return ReloadOut(
        directory=str(settings.templates_dir.resolve()),
        created=[_pin(p) for p in result.created],
        unchanged=[_pin(p) for p in result.unchanged],
    )


@router.get("/{name}", response_model=TemplateOut, responses=NOT_FOUND, summary="The current version of a template (or a stored one)")
async def get_template(
    name: str,
    principal: PrincipalDep,
    session: SessionDep,
    locale: LocaleQuery = "",
    version: VersionQuery = None,
) -> TemplateOut:
    locale = _locale(locale)
    if not _NAME.match(name):
        row = None
    else:
        row = await (template_version(session, name, locale, version) if version else current_exact(session, name, locale))
    if row is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no template {name!r}" + (f" ({locale})" if locale else "") + (f" version {version}" if version else ""))
    return _out(row)


@router.put(
    "/{name}",
    response_model=TemplateOut,
    responses={
        201: {"model": TemplateOut, "description": "The first version of the template (or of this locale variant)"},
        422: {"description": "Syntax or sample-data error, with the line"},
    },
    summary="Save a new version (or the first one); unchanged content keeps the current version",
)
async def put_template(
    name: Annotated[str, Path(max_length=200, pattern=r"^[A-Za-z0-9_.-]+$")],
    body: TemplateBody,
    response: Response,
    principal: AdminDep,
    session: SessionDep,
    engine: TemplatesDep,
) -> TemplateOut:
    try:
        body.check_parts(name)
    except ValueError as exc:
        raise RequestValidationError([{"type": "value_error", "loc": ("body",), "msg": str(exc), "input": None}]) from None
    current = await current_exact(session, name, body.locale)
    if current is not None and current.is_active and _same(current, body):
        return _out(current)
    row = await _save(name, body, principal, session, engine)
    response.status_code = status.HTTP_201_CREATED if current is None else status.HTTP_200_OK
    return _out(row)


def _same(row: EmailTemplate, body: TemplateBody) -> bool:
    fields: dict[str, Any] = body.model_dump()
    fields["subject"] = body.subject or ""
    return all(getattr(row, k) == v for k, v in fields.items())


@router.delete(
    "/{name}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=NOT_FOUND,
    summary="Deactivate a template (every variant, or ?locale=); queued emails still go out",
)
async def delete_template(
    name: str, principal: AdminDep, session: SessionDep, locale: Annotated[str | None, Query(max_length=35)] = None
) -> Response:
    locale = _locale(locale) if locale is not None else None
    if not _NAME.match(name):
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no template {name!r}")
    changed = await deactivate_template(session, name, locale)
    if not changed:  # already inactive is fine (DELETE is idempotent); never stored is a 404
        query = select(EmailTemplate.id).where(EmailTemplate.name == name)
        if locale is not None:
            query = query.where(EmailTemplate.locale == locale)
        if (await session.exec(query.limit(1))).first() is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no template {name!r}" + (f" ({locale or 'default'})" if locale is not None else ""))
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/{name}/versions", response_model=list[TemplateOut], responses=NOT_FOUND, summary="Every stored version, newest first")
async def list_versions(name: str, principal: PrincipalDep, session: SessionDep, locale: LocaleQuery = "") -> list[TemplateOut]:
    rows = await template_versions(session, name, _locale(locale)) if _NAME.match(name) else []
    if not rows:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no template {name!r}" + (f" ({locale})" if locale else ""))
    return [_out(t) for t in rows]


async def _preview(
    session: SessionDep, engine: TemplateEngine, name: str, locale: str | None, version: int | None, data: dict[str, Any] | None
) -> PreviewOut:
    if not _NAME.match(name):
        row = None
    elif version is not None:
        row = await template_version(session, name, locale or "", version)
    else:
        row = await current_template(session, name, locale)
    if row is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no active template {name!r}" + (f" version {version}" if version else ""))
    source = "request" if data is not None else "sample_data"
    if data is None:
        data = row.sample_data
        if data is None and row.locale:  # a variant without its own sample data: the default variant's
            default = await current_exact(session, name, "")
            data = default.sample_data if default is not None else None
        data = data or {}
    try:
        prepared = await prepare(session, engine, row, data, locale)
    except MissingVariables as exc:
        hint = "" if source == "request" else " (the template's sample_data lacks them; send data in the body)"
        raise RequestValidationError([{"type": "missing_variables", "loc": ("body", "data"), "msg": f"{exc}{hint}", "missing": exc.names, "input": None}]) from None
    except TemplateError as exc:
        raise RequestValidationError([{"type": "template_error", "loc": ("body", "data"), "msg": str(exc), "input": None}]) from None
    return PreviewOut(
        subject=prepared.content.subject,
        html=prepared.content.html,
        text=prepared.content.text,
        template=_pin(pin_of(prepared.main)),
        dependencies=[_pin(d) for d in sorted(prepared.dependencies.values(), key=lambda s: s.name)],
        data_source=source,
    )


@router.post("/{name}/preview", response_model=PreviewOut, responses=NOT_FOUND, summary="Render with the given data (or the sample data)")
async def preview_template(name: str, principal: PrincipalDep, session: SessionDep, engine: TemplatesDep, body: PreviewIn | None = None) -> PreviewOut:
    body = body or PreviewIn()
    return await _preview(session, engine, name, body.locale, body.version, body.data)


@router.get(
    "/{name}/preview",
    response_class=HTMLResponse,
    responses={**NOT_FOUND, 200: {"content": {"text/html": {}}, "description": "The rendered HTML, for a browser"}},
    summary="The rendered HTML with the sample data: open it in a browser",
)
async def preview_html(
    name: str,
    principal: BrowserPrincipalDep,
    session: SessionDep,
    engine: TemplatesDep,
    locale: Annotated[str | None, Query(max_length=35)] = None,
    version: VersionQuery = None,
    part: Annotated[str, Query(pattern="^(html|text)$")] = "html",
) -> Response:
    preview = await _preview(session, engine, name, _locale(locale) if locale else None, version, None)
    if part == "text" or preview.html is None:
        return Response(preview.text or "", media_type="text/plain; charset=utf-8", headers=PREVIEW_HEADERS)
    return HTMLResponse(preview.html, headers=PREVIEW_HEADERS)
