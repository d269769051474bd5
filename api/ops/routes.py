"""/ops: the ops console's pages and forms. Each page asks the same services as /v1 (api/services/*),
as the logged-in key's principal: a user sees only their own emails, admin pages answer admins only."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Query, Request, status
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import ValidationError
from starlette.datastructures import FormData

from api.deps import SessionDep, context_for
from api.ops import pages
from api.schemas.flags import FlagIn
from api.ops.session import CSRF_FIELD, AdminsOnly, OpsSession, SessionSigner, check_csrf, log_in, principal_of
from api.services import emails, templates, users
from api.services import flags as flag_service
from api.services import stats as queue_stats
from api.services.context import Context
from api.services.templates import locale_of
from api.services.errors import NotFound, ServiceError, invalid, refusal_of
from mailqueue.contracts import EmailStatus
from mailqueue.delivery import TemporalUnavailable
from mailqueue.flags import Flags

router = APIRouter(prefix="/ops", include_in_schema=False)

PAGE_SIZE = 25
# What a finished action says on the page it leads back to (?done=...): fixed words, never the request's.
DONE = {
    "cancelled": "Cancelled.",
    "retried": "Queued again: a new delivery run has started.",
    "rescheduled": "Rescheduled.",
    "revoked": "The key is revoked: its next request is refused.",
    "flag": "Flag changed.",
}


def signer_of(request: Request) -> SessionSigner:
    state = request.app.state
    if getattr(state, "ops_signer", None) is None:
        state.ops_signer = SessionSigner(state.settings)  # made once, at the first /ops request
    return state.ops_signer


def page(request: Request, template: str, status_code: int = 200, session: OpsSession | None = None, /, **values: Any) -> HTMLResponse:
    return HTMLResponse(pages.render(template, request, csrf=session.csrf if session else "", **values), status_code=status_code,
                        headers=pages.PAGE_HEADERS)


class Ops:
    """One request of a logged-in operator: their session, and the services' Context as their principal."""

    def __init__(self, request: Request, session: OpsSession, ctx: Context) -> None:
        self.request, self.session, self.ctx = request, session, ctx

    def page(self, template: str, status_code: int = 200, /, **values: Any) -> HTMLResponse:
        return page(self.request, template, status_code, self.session, principal=self.ctx.principal,
                    kill_switch=pages.kill_switch(self.request), **values)

    def refused(self, template: str, exc: Exception, /, **values: Any) -> HTMLResponse:
        """The page again, with what the service (or Temporal) said, under the REST API's status code."""
        if isinstance(exc, ServiceError):
            code, detail = refusal_of(exc)[0], exc.detail
        else:
            code, detail = 503, f"Temporal is unavailable; nothing was changed, try again ({exc})"
        return self.page(template, code, error=_words(detail), **values)


def _words(detail: Any) -> str:
    if isinstance(detail, list):  # field errors, as pydantic's
        return "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ())[1:])}: {e.get('msg')}" for e in detail if isinstance(e, dict))
    return str(detail)


async def logged_in(request: Request, db: SessionDep) -> Ops:
    session = signer_of(request).read(request)
    principal = await principal_of(request.app.state.settings, signer_of(request), db, session)
    assert session is not None
    return Ops(request, session, context_for(request, principal, db))


async def admin(ops: Annotated[Ops, Depends(logged_in)]) -> Ops:
    if not ops.ctx.principal.is_admin:
        raise AdminsOnly
    return ops


async def form_of(request: Request) -> FormData:
    """The posted form, refused (403) without this session's CSRF token."""
    form = await request.form()
    check_csrf(signer_of(request).read(request), form.get(CSRF_FIELD))
    return form


OpsDep = Annotated[Ops, Depends(logged_in)]
AdminOpsDep = Annotated[Ops, Depends(admin)]
FormDep = Annotated[FormData, Depends(form_of)]


def back_to(path: str, **query: str) -> RedirectResponse:
    return RedirectResponse(f"{path}?{urlencode(query)}" if query else path, status_code=status.HTTP_303_SEE_OTHER)


# --- login -----------------------------------------------------------------------------------


@router.get("/login")
async def login_page(request: Request) -> HTMLResponse:
    signer = signer_of(request)
    session = signer.read(request)
    answer = page(request, "login.html", 200, session or (new := OpsSession()), principal=None)
    if session is None:
        signer.write(request, answer, new)  # a first visit gets its CSRF token (for the login form) here
    return answer


@router.post("/login")
async def login(request: Request, form: FormDep, db: SessionDep) -> Response:
    key = form.get("key")
    signer = signer_of(request)
    session = await log_in(request.app.state.settings, signer, db, key if isinstance(key, str) else "")
    if session is None:
        return page(request, "login.html", 401, signer.read(request), principal=None, error="That key is not a valid API key.")
    answer = back_to("/ops")
    signer.write(request, answer, session)  # a new CSRF token with the login: none from before it stays valid
    return answer


@router.post("/logout")
async def logout(request: Request, form: FormDep) -> Response:
    answer = back_to("/ops/login")
    signer_of(request).clear(answer)
    return answer


# --- overview --------------------------------------------------------------------------------


@router.get("")
async def overview(ops: OpsDep) -> HTMLResponse:
    stats = await queue_stats.stats(ops.ctx, queue_stats.STUCK_AFTER_SECONDS)
    return ops.page(
        "overview.html", stats=stats, by_status=pages.by_status_rows(stats), failure_ratio=pages.failure_ratio(stats),
        chart=pages.chart(await queue_stats.sends_per_minute(ops.ctx)),
    )


# --- emails ----------------------------------------------------------------------------------


def _instant(value: str | None, name: str) -> datetime | None:
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise invalid(("query", name), "not an ISO 8601 time, e.g. 2026-11-29T10:00", value=value) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)  # the form's datetime-local: read as UTC


@router.get("/emails")
async def email_list(
    ops: OpsDep,
    status_: Annotated[list[str] | None, Query(alias="status")] = None,
    recipient: Annotated[str | None, Query(max_length=512)] = None,
    template: Annotated[str | None, Query(max_length=200)] = None,
    related_entity_type: Annotated[str | None, Query(max_length=100)] = None,
    related_entity_id: Annotated[str | None, Query(max_length=200)] = None,
    tag: Annotated[str | None, Query(max_length=64)] = None,
    created_after: Annotated[str | None, Query(max_length=40)] = None,
    created_before: Annotated[str | None, Query(max_length=40)] = None,
    page_: Annotated[int, Query(alias="page", ge=1, le=100_000)] = 1,
) -> HTMLResponse:
    chosen = [s for s in (status_ or []) if s in pages.STATUS_ORDER]
    filters = {
        "recipient": recipient or "", "template": template or "", "related_entity_type": related_entity_type or "",
        "related_entity_id": related_entity_id or "", "tag": tag or "", "created_after": created_after or "",
        "created_before": created_before or "",
    }
    query = [("status", s) for s in chosen] + [(k, v) for k, v in filters.items() if v]
    values = {"statuses": pages.STATUS_ORDER, "chosen": chosen, "filters": filters, "items": [], "total": 0, "page": page_, "pages": 1}
    try:
        where = emails.EmailFilter(
            statuses=[EmailStatus(s) for s in chosen] or None, recipient=recipient or None, template=template or None,
            related_entity_type=related_entity_type or None, related_entity_id=related_entity_id or None, tag=tag or None,
            created_after=_instant(created_after, "created_after"), created_before=_instant(created_before, "created_before"),
        )
        total, items = await emails.list_emails(ops.ctx, where, page_, PAGE_SIZE)
    except ServiceError as exc:
        return ops.refused("emails.html", exc, **values, query="")
    values |= {"items": items, "total": total, "pages": max(1, math.ceil(total / PAGE_SIZE))}
    return ops.page("emails.html", **values, query=urlencode(query))


async def _email_page(ops: Ops, email_id: str, code: int = 200, error: str | None = None, done: str | None = None) -> HTMLResponse:
    email, events = await emails.get_email(ops.ctx, email_id)
    state = EmailStatus(email.status)
    return ops.page(
        "email.html", code, email=email, events=events, error=error, done=DONE.get(done or ""),
        temporal_link=pages.temporal_ui_link(ops.ctx.settings, email.workflow_id),
        can_cancel=state.is_cancellable, can_retry=state is EmailStatus.FAILED, can_reschedule=state is EmailStatus.SCHEDULED,
    )


@router.get("/emails/{email_id}")
async def email_detail(email_id: str, ops: OpsDep, done: Annotated[str | None, Query(max_length=20)] = None) -> HTMLResponse:
    try:
        return await _email_page(ops, email_id, done=done)
    except NotFound as exc:
        return ops.refused("missing.html", exc)


@router.get("/emails/{email_id}/mail")
async def email_mail(email_id: str, ops: OpsDep) -> Response:
    """The mail's HTML as sent (or its text), for the detail page's sandboxed iframe."""
    try:
        email = await emails.email_or_404(ops.ctx, email_id)
    except NotFound:
        return Response("no such email", status_code=404, media_type="text/plain", headers=pages.MAIL_HEADERS)
    if email.html:
        return HTMLResponse(email.html, headers=pages.MAIL_HEADERS)
    return Response(email.text or "", media_type="text/plain; charset=utf-8", headers=pages.MAIL_HEADERS)


async def _change(ops: Ops, email_id: str, done: str, change: Any) -> Response:
    """Run one of the API's own changes; on a refusal, the detail page again with its words (409 and the like)."""
    try:
        await change
    except (ServiceError, TemporalUnavailable) as exc:
        code = refusal_of(exc)[0] if isinstance(exc, ServiceError) else 503
        words = _words(exc.detail) if isinstance(exc, ServiceError) else f"Temporal is unavailable; nothing was changed ({exc})"
        await ops.ctx.session.rollback()
        try:
            return await _email_page(ops, email_id, code, error=words)
        except NotFound as missing:
            return ops.refused("missing.html", missing)
    return back_to(f"/ops/emails/{email_id}", done=done)


@router.post("/emails/{email_id}/cancel")
async def email_cancel(email_id: str, ops: OpsDep, form: FormDep) -> Response:
    reason = str(form.get("reason") or "").strip()[:500] or None
    return await _change(ops, email_id, "cancelled", emails.cancel(ops.ctx, email_id, reason))


@router.post("/emails/{email_id}/retry")
async def email_retry(email_id: str, ops: OpsDep, form: FormDep) -> Response:
    return await _change(ops, email_id, "retried", emails.retry(ops.ctx, email_id))


@router.post("/emails/{email_id}/reschedule")
async def email_reschedule(email_id: str, ops: OpsDep, form: FormDep) -> Response:
    async def reschedule() -> Any:
        send_at = _instant(str(form.get("send_at") or ""), "send_at")
        if send_at is None:
            raise invalid(("body", "send_at"), "a time is required")
        return await emails.reschedule(ops.ctx, email_id, send_at)

    return await _change(ops, email_id, "rescheduled", reschedule())


# --- templates -------------------------------------------------------------------------------


@router.get("/templates")
async def template_list(ops: OpsDep) -> HTMLResponse:
    rows = await templates.list_current(ops.ctx, include_inactive=True)
    return ops.page("templates.html", templates=rows)


@router.get("/templates/{name}")
async def template_detail(name: str, ops: OpsDep, locale: Annotated[str, Query(max_length=35)] = "") -> HTMLResponse:
    try:
        versions = await templates.versions(ops.ctx, name, locale)
    except ServiceError as exc:
        return ops.refused("missing.html", exc)
    variants = sorted({t.locale for t in await templates.list_current(ops.ctx, include_inactive=True) if t.name == name})
    try:
        preview, preview_error = await templates.preview(ops.ctx, name, locale_of(locale) if locale else None, None, None), None
    except ServiceError as exc:
        preview, preview_error = None, _words(exc.detail)
    return ops.page("template.html", name=name, locale=locale, variants=variants, versions=versions, preview=preview,
                    preview_error=preview_error)


# --- users and keys (admins) -----------------------------------------------------------------


async def _users_page(ops: Ops, code: int = 200, **values: Any) -> HTMLResponse:
    listed = await users.with_keys(ops.ctx, await users.list_users(ops.ctx))
    return ops.page("users.html", code, users=listed, **({"issued": None, "error": None, "done": None} | values))


@router.get("/users")
async def user_list(ops: AdminOpsDep, done: Annotated[str | None, Query(max_length=20)] = None) -> HTMLResponse:
    return await _users_page(ops, done=DONE.get(done or ""))


@router.post("/users/{user_id}/keys")
async def key_issue(user_id: str, ops: AdminOpsDep, form: FormDep) -> Response:
    name = str(form.get("name") or "").strip()[:200] or None
    try:
        issued = await users.issue(ops.ctx, user_id, name)
    except ServiceError as exc:
        return await _users_page(ops, refusal_of(exc)[0], error=_words(exc.detail))
    # Shown once, on this answer only: never in a redirect's URL, never cached.
    return await _users_page(ops, issued={"user_id": user_id, "key": issued.key, "name": name})


@router.post("/users/{user_id}/keys/{key_id}/revoke")
async def key_revoke(user_id: str, key_id: str, ops: AdminOpsDep, form: FormDep) -> Response:
    try:
        await users.revoke(ops.ctx, user_id, key_id)
    except ServiceError as exc:
        return await _users_page(ops, refusal_of(exc)[0], error=_words(exc.detail))
    return back_to("/ops/users", done="revoked")


@router.get("/templates/{name}/preview")
async def template_preview(name: str, ops: OpsDep, locale: Annotated[str, Query(max_length=35)] = "") -> Response:
    """The variant rendered with its sample data, for the template page's sandboxed iframe."""
    try:
        preview = await templates.preview(ops.ctx, name, locale_of(locale) if locale else None, None, None)
    except ServiceError as exc:
        return Response(_words(exc.detail), status_code=refusal_of(exc)[0], media_type="text/plain", headers=pages.MAIL_HEADERS)
    return HTMLResponse(preview.html or "", headers=pages.MAIL_HEADERS)


# --- flags and their audit log (admins) ------------------------------------------------------


def _flags_of(ops: Ops) -> Flags:
    return ops.request.app.state.flags


async def _flags_page(ops: Ops, code: int = 200, **values: Any) -> HTMLResponse:
    return ops.page("flags.html", code, flags=flag_service.every(_flags_of(ops)), **({"error": None, "done": None} | values))


@router.get("/flags")
async def flag_list(ops: AdminOpsDep, done: Annotated[str | None, Query(max_length=20)] = None) -> HTMLResponse:
    return await _flags_page(ops, done=DONE.get(done or ""))


@router.post("/flags/{key}")
async def flag_toggle(key: str, ops: AdminOpsDep, form: FormDep) -> Response:
    """Turn a flag on or off (`enabled` says which), with a reason; its rollout and targeted senders stay as they are."""
    flags = _flags_of(ops)
    try:
        _, state, _ = flag_service.current(flags, key)
        body = FlagIn(enabled=form.get("enabled") == "true", percentage=state.percentage, senders=list(state.senders),
                      reason=str(form.get("reason") or "").strip())
    except ServiceError as exc:
        return await _flags_page(ops, refusal_of(exc)[0], error=_words(exc.detail))
    except ValidationError as exc:
        return await _flags_page(ops, 422, error="; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()))
    await flag_service.put(ops.ctx, flags, key, body)
    return back_to("/ops/flags", done="flag")


@router.get("/audit")
async def audit_log(ops: AdminOpsDep, page_: Annotated[int, Query(alias="page", ge=1, le=100_000)] = 1) -> HTMLResponse:
    total, rows = await flag_service.audit(ops.ctx, None, page_, PAGE_SIZE)
    return ops.page("audit.html", rows=rows, total=total, page=page_, pages=max(1, math.ceil(total / PAGE_SIZE)))
