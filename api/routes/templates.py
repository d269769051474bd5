"""/v1/templates: versioned, layered, localized templates; previews; loading the templates folder."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Response, status
from fastapi.responses import HTMLResponse

from api.deps import AdminContextDep, BrowserContextDep, ContextDep
from api.schemas.templates import MAX_VERSION, PreviewIn, PreviewOut, ReloadOut, TemplateBody, TemplateIn, TemplateOut
from api.services import templates
from api.services.templates import locale_of
from mailqueue.models import EmailTemplate

router = APIRouter(prefix="/v1/templates", tags=["templates"])

NOT_FOUND = {404: {"description": "No such template"}}
LocaleQuery = Annotated[str, Query(max_length=35, description="The variant: '' (default), 'de', 'pt-BR', ...")]
VersionQuery = Annotated[int | None, Query(ge=1, le=MAX_VERSION)]

# Template HTML is written by untrusted authors: shown in a browser it must not run scripts
# or reach anything, and it gets an opaque origin of its own (CSP sandbox). Nothing remote
# loads, not even images or fonts: a remote image would tell its server who opened the
# preview, and when. No page may frame it (clickjacking).
PREVIEW_HEADERS = {
    "Content-Security-Policy": "sandbox; default-src 'none'; img-src data:; style-src 'unsafe-inline'; font-src data:; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def _out(t: EmailTemplate) -> TemplateOut:
    return TemplateOut.model_validate(t, from_attributes=True)


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=TemplateOut,
    responses={409: {"description": "The template (name + locale) exists; PUT changes it"}, 422: {"description": "Syntax or sample-data error, with the line"}},
    summary="Create a template (or a locale variant of one)",
)
async def create_template(body: TemplateIn, response: Response, ctx: AdminContextDep) -> TemplateOut:
    row = await templates.create(ctx, body)
    response.headers["Location"] = f"/v1/templates/{row.name}" + (f"?locale={row.locale}" if row.locale else "")
    return _out(row)


@router.get("", response_model=list[TemplateOut], summary="Current versions of all templates and their variants")
async def list_templates(ctx: ContextDep, include_inactive: bool = False) -> list[TemplateOut]:
    return [_out(t) for t in await templates.list_current(ctx, include_inactive)]


@router.post(
    "/reload",
    response_model=ReloadOut,
    responses={422: {"description": "A file has a problem; nothing was saved"}},
    summary="Load the templates folder: a new version of every template whose files changed",
)
async def reload_templates(ctx: AdminContextDep) -> ReloadOut:
    return await templates.reload(ctx)


@router.get("/{name}", response_model=TemplateOut, responses=NOT_FOUND, summary="The current version of a template (or a stored one)")
async def get_template(name: str, ctx: ContextDep, locale: LocaleQuery = "", version: VersionQuery = None) -> TemplateOut:
    return _out(await templates.get(ctx, name, locale, version))


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
    ctx: AdminContextDep,
) -> TemplateOut:
    row, first = await templates.put(ctx, name, body)
    if first is not None:
        response.status_code = status.HTTP_201_CREATED if first else status.HTTP_200_OK
    return _out(row)


@router.delete(
    "/{name}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=NOT_FOUND,
    summary="Deactivate a template (every variant, or ?locale=); queued emails still go out",
)
async def delete_template(name: str, ctx: AdminContextDep, locale: Annotated[str | None, Query(max_length=35)] = None) -> Response:
    await templates.deactivate(ctx, name, locale)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/{name}/versions", response_model=list[TemplateOut], responses=NOT_FOUND, summary="Every stored version, newest first")
async def list_versions(name: str, ctx: ContextDep, locale: LocaleQuery = "") -> list[TemplateOut]:
    return [_out(t) for t in await templates.versions(ctx, name, locale)]


@router.post("/{name}/preview", response_model=PreviewOut, responses=NOT_FOUND, summary="Render with the given data (or the sample data)")
async def preview_template(name: str, ctx: ContextDep, body: PreviewIn | None = None) -> PreviewOut:
    body = body or PreviewIn()
    return await templates.preview(ctx, name, body.locale, body.version, body.data)


@router.get(
    "/{name}/preview",
    response_class=HTMLResponse,
    responses={**NOT_FOUND, 200: {"content": {"text/html": {}}, "description": "The rendered HTML, for a browser"}},
    summary="The rendered HTML with the sample data: open it in a browser",
)
async def preview_html(
    name: str,
    ctx: BrowserContextDep,
    locale: Annotated[str | None, Query(max_length=35)] = None,
    version: VersionQuery = None,
    part: Annotated[str, Query(pattern="^(html|text)$")] = "html",
) -> Response:
    preview = await templates.preview(ctx, name, locale_of(locale) if locale else None, version, None)
    if part == "text" or preview.html is None:
        return Response(preview.text or "", media_type="text/plain; charset=utf-8", headers=PREVIEW_HEADERS)
    return HTMLResponse(preview.html, headers=PREVIEW_HEADERS)
