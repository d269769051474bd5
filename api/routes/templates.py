"""/v1/templates: store templates (every change is a new version) and read them."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, status
from fastapi.exceptions import RequestValidationError
from sqlmodel import col, select

from api.deps import PrincipalDep, SessionDep, TemplatesDep
from api.schemas import TemplateIn, TemplateOut
from mailqueue.errors import TemplateError
from mailqueue.models import EmailTemplate
from mailqueue.store import save_template_version

router = APIRouter(prefix="/v1/templates", tags=["templates"])


def _out(t: EmailTemplate) -> TemplateOut:
    return TemplateOut.model_validate(t, from_attributes=True)


@router.post("", status_code=status.HTTP_201_CREATED, response_model=TemplateOut, summary="Create a template or a new version of it")
async def save_template(body: TemplateIn, principal: PrincipalDep, session: SessionDep, engine: TemplatesDep) -> TemplateOut:
    for part in ("subject", "html", "text"):
        source = getattr(body, part)
        if source is not None:
            try:
                engine.check_syntax(source, part)
            except TemplateError as exc:
                raise RequestValidationError(
                    [{"type": "value_error", "loc": ("body", part), "msg": f"template syntax error: {exc}", "input": None}]
                ) from None
    row = EmailTemplate(**body.model_dump(), created_by=principal.id or principal.kind)
    return _out(await save_template_version(session, row))


@router.get("", response_model=list[TemplateOut], summary="Current versions of all templates")
async def list_templates(principal: PrincipalDep, session: SessionDep) -> list[TemplateOut]:
    rows = await session.exec(
        select(EmailTemplate).where(col(EmailTemplate.is_current).is_(True)).order_by(col(EmailTemplate.name), col(EmailTemplate.locale))
    )
    return [_out(t) for t in rows.all()]


@router.get("/{name}", response_model=TemplateOut, responses={404: {"description": "No such template"}}, summary="The current version of a template")
async def get_template(name: str, principal: PrincipalDep, session: SessionDep, locale: str = "") -> TemplateOut:
    row = (
        await session.exec(
            select(EmailTemplate).where(
                EmailTemplate.name == name, EmailTemplate.locale == locale, col(EmailTemplate.is_current).is_(True)
            )
        )
    ).first()
    if row is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no template named {name!r}")
    return _out(row)
