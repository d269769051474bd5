"""/v1/emails: queue, inspect, list, cancel, retry and reschedule emails."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import formataddr
from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import APIRouter, Body, Header, HTTPException, Query, Response, status
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select
from temporalio.client import (
    Client,
    WorkflowUpdateFailedError,
    WorkflowUpdateRPCTimeoutOrCancelledError,
)
from temporalio.common import WorkflowIDReusePolicy
from temporalio.exceptions import ApplicationError, WorkflowAlreadyStartedError
from temporalio.service import RPCError

from api.deps import (
    Principal,
    PrincipalDep,
    SessionDep,
    SettingsDep,
    TemplatesDep,
    TemporalDep,
)
from api.schemas import (
    BatchIn,
    BatchItemOut,
    BatchOut,
    CancelBody,
    EmailAccepted,
    EmailDetail,
    EmailPage,
    EmailRequest,
    EmailSummary,
    EventOut,
    RelatedEntity,
    RescheduleBody,
    Sender,
    TemplateUsed,
    normalize_address,
)
from mailqueue.config import Settings
from mailqueue.contracts import (
    CANCEL_UPDATE,
    RESCHEDULE_UPDATE,
    CancelRequest,
    Content,
    EmailSpec,
    EmailState,
    EmailStatus,
    RescheduleRequest,
    TemplateRef,
)
from mailqueue.delivery import RPC_TIMEOUT, TemporalUnavailable, retry_settings, send_queue_for, start_delivery
from mailqueue.errors import TemplateError
from mailqueue.ids import idempotent_email_id, message_id_for, new_email_id
from mailqueue.message import bare_address, domain_of
from mailqueue.models import Email, EmailRecipient, SenderSettings, utcnow
from mailqueue.store import (
    current_template,
    events_of,
    insert_email,
    queued_event,
    record_from_spec,
    spec_from_record,
)
from mailqueue.template_library import MissingVariables, prepare
from mailqueue.templating import TemplateEngine, is_partial

router = APIRouter(prefix="/v1/emails", tags=["emails"])

NOT_FOUND = {404: {"description": "No such email"}}
CONFLICT = {409: {"description": "Not possible in the email's current state"}}


def invalid(field: tuple[str | int, ...], message: str, value: Any = None) -> RequestValidationError:
    return RequestValidationError([{"type": "value_error", "loc": ("body", *field), "msg": message, "input": value}])


def check_send_at(send_at: datetime | None, settings: Settings, field: tuple[str, ...] = ("send_at",)) -> None:
    if send_at is None:
        return
    now = datetime.now(UTC)
    if send_at < now - timedelta(seconds=settings.send_at_grace_seconds):
        raise invalid(field, f"send_at is in the past (now is {now.isoformat(timespec='seconds')})", send_at.isoformat())
    if send_at > now + timedelta(days=settings.send_at_max_days):
        raise invalid(field, f"send_at is more than {settings.send_at_max_days} days ahead", send_at.isoformat())


def check_limits(req: EmailRequest, settings: Settings) -> None:
    recipients = len(req.to) + len(req.cc) + len(req.bcc)
    if recipients > settings.max_recipients:
        raise invalid(("to",), f"{recipients} recipients; at most {settings.max_recipients} are allowed per email")
    for part in ("html", "text"):
        body = getattr(req, part)
        if body is not None and len(body.encode()) > settings.max_body_bytes:
            raise invalid((part,), f"{part} is larger than {settings.max_body_bytes} bytes")
    if req.template_data is not None:
        size = len(json.dumps(req.template_data).encode())
        if size > settings.max_template_data_bytes:
            raise invalid(("template_data",), f"template_data is {size} bytes; the limit is {settings.max_template_data_bytes}")
    check_send_at(req.send_at, settings)


async def resolve_template(
    req: EmailRequest, session: SessionDep, engine: TemplateEngine
) -> tuple[TemplateRef, Content, str | None, str | None]:
    """Pin the template and its layouts/partials now, and prove the data renders them (422 otherwise)."""
    assert req.template is not None
    row = await current_template(session, req.template, req.locale)
    if row is None:
        raise invalid(("template",), f"unknown or inactive template {req.template!r}", req.template)
    if is_partial(row.name):
        raise invalid(("template",), f"{row.name!r} is a layout or partial; it is not sent by itself", req.template)
    data = req.template_data or {}
    try:
        # The worker renders the mail itself at send time; here Jinja alone proves the data fits.
        prepared = await prepare(session, engine, row, data, req.locale, finish=False)
    except MissingVariables as exc:
        raise RequestValidationError(
            [{"type": "missing_variables", "loc": ("body", "template_data"), "msg": str(exc), "missing": exc.names, "input": None}]
        ) from None
    except TemplateError as exc:
        raise invalid(("template_data",), f"template {row.name!r} cannot be rendered with this data: {exc}") from None
    return prepared.ref(data, req.locale), prepared.content, row.default_from, row.default_from_name


def request_hash(req: EmailRequest) -> str:
    canonical = json.dumps(req.model_dump(mode="json", by_alias=True), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def accepted(email: Email, response: Response) -> EmailAccepted:
    response.headers["Location"] = f"/v1/emails/{email.id}"
    return EmailAccepted(id=email.id, status=email.status, workflow_id=email.workflow_id)


@dataclass
class PreparedEmail:
    """A request that passed every check, turned into its workflow input; nothing written yet."""

    spec: EmailSpec
    content: Content | None  # the rendered subject etc. of a templated email (Jinja only)
    body_hash: str
    idempotency_key: str | None
    send_at: datetime | None


async def prepare_email(
    req: EmailRequest, principal: Principal, session: SessionDep, settings: Settings, engine: TemplateEngine,
    idempotency_key: str | None,
) -> PreparedEmail:
    """Validate beyond the schema (limits, template and its data, sender) and build the spec: 422s come from here."""
    check_limits(req, settings)
    template_ref = content = template_from = template_from_name = None
    if req.template is not None:
        template_ref, content, template_from, template_from_name = await resolve_template(req, session, engine)
    sender_from = None
    if principal.kind == "user":
        own = await session.get(SenderSettings, principal.id)
        sender_from = own.default_from if own else None
    from_address = req.from_ or sender_from or template_from or normalize_address(settings.default_from)
    if not req.from_ and template_from_name:  # the template names the sender; the address is its own or the system's
        from_address = formataddr((template_from_name, bare_address(from_address)))

    sender_type, sender_id = principal.sender
    email_id = idempotent_email_id(sender_type, sender_id, idempotency_key) if idempotency_key else new_email_id()
    related = req.related_entity
    spec = EmailSpec(
        email_id=email_id,
        message_id=message_id_for(email_id, settings.message_id_domain or domain_of(from_address)),
        from_address=from_address,
        to=req.to,
        cc=req.cc,
        bcc=req.bcc,
        reply_to=req.reply_to,
        content=None if template_ref else Content(subject=req.subject or "", html=req.html, text=req.text),
        template=template_ref,
        headers=req.headers,
        send_at=req.send_at,
        retry=retry_settings(settings, req.max_attempts),
        priority=str(req.priority),
        tags=req.tags,
        metadata=req.metadata,
        related_entity_type=related.type if related else None,
        related_entity_id=related.id if related else None,
        sender_type=sender_type,
        sender_id=sender_id,
        send_queue=await send_queue_for(session, settings, sender_type, sender_id),
        recorded=True,  # the record and its `queued` event are written below, before the workflow starts
    )
    return PreparedEmail(spec, content, request_hash(req), idempotency_key, req.send_at)


async def commit_email(prepared: PreparedEmail, session: SessionDep, settings: Settings, temporal: Client) -> Email:
    """Write the record, then start the workflow; 409 (idempotency conflict) and 503 (Temporal) come from here.

    A 202 always means the workflow exists: if Temporal cannot be reached, the new record is removed again.
    """
    spec, key = prepared.spec, prepared.idempotency_key
    email_id = spec.email_id
    email = await session.get(Email, email_id) if key else None
    created = email is None
    if email is None:
        email = record_from_spec(spec, idempotency_key=key, request_hash=prepared.body_hash)
        if prepared.content is not None:
            email.subject = prepared.content.subject  # as rendered at acceptance, for people reading the record
        if prepared.send_at is not None and prepared.send_at > datetime.now(UTC):
            email.status = EmailStatus.SCHEDULED.value
        try:
            await insert_email(session, email)
            await session.commit()
        except IntegrityError:  # the same key, at the same moment, from another request
            await session.rollback()
            email = await session.get(Email, email_id)
            created = False
            if email is None:
                raise
    if not created and email.request_hash != prepared.body_hash:
        raise HTTPException(status.HTTP_409_CONFLICT, "this Idempotency-Key was used with a different request body")

    await session.commit()  # never hold a database transaction while waiting on Temporal
    try:
        await start_delivery(temporal, spec, settings.task_queue, WorkflowIDReusePolicy.REJECT_DUPLICATE)
    except WorkflowAlreadyStartedError:
        pass  # a repeated request: the first one started it
    except TemporalUnavailable:
        if created:  # not durably accepted: leave no record behind that nothing will ever send
            await (await session.connection()).execute(sa.delete(Email.__table__).where(Email.__table__.c.id == email_id))
            await session.commit()
        raise
    return email


IdempotencyKey = Annotated[
    str | None,
    Header(alias="Idempotency-Key", min_length=1, max_length=255, pattern=r"^[\x21-\x7e]+$",
           description="Same key and body: same answer, one email. Same key, other body: 409."),
]


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=EmailAccepted,
    responses={409: {"description": "Idempotency-Key reused with a different body"}, 503: {"description": "Temporal unavailable; retry"}},
    summary="Queue an email",
)
async def queue_email(
    req: EmailRequest,
    response: Response,
    principal: PrincipalDep,
    session: SessionDep,
    settings: SettingsDep,
    temporal: TemporalDep,
    engine: TemplatesDep,
    idempotency_key: IdempotencyKey = None,
) -> EmailAccepted:
    prepared = await prepare_email(req, principal, session, settings, engine, idempotency_key)
    return accepted(await commit_email(prepared, session, settings, temporal), response)


@router.post(
    "/batch",
    response_model=BatchOut,
    responses={422: {"description": "all_or_nothing, and at least one email is invalid: nothing was queued"}},
    summary="Queue up to 100 emails; each is validated and answered on its own",
)
async def queue_batch(
    body: BatchIn,
    principal: PrincipalDep,
    session: SessionDep,
    settings: SettingsDep,
    temporal: TemporalDep,
    engine: TemplatesDep,
) -> BatchOut:
    results: list[BatchItemOut | None] = [None] * len(body.emails)
    ready: list[tuple[int, PreparedEmail]] = []
    for index, item in enumerate(body.emails):
        try:
            key = item.pop("idempotency_key", None) if isinstance(item, dict) else None
            if key is not None and not (isinstance(key, str) and _IDEMPOTENCY_KEY.match(key)):
                raise RequestValidationError([{"type": "value_error", "loc": ("body", "idempotency_key"), "input": None,
                                               "msg": "1 to 255 printable ASCII characters, no spaces"}])
            req = EmailRequest.model_validate(item)
            ready.append((index, await prepare_email(req, principal, session, settings, engine, key)))
        except (ValidationError, RequestValidationError) as exc:
            results[index] = BatchItemOut(index=index, status=422, detail=_errors(exc.errors()))
    rejected = [r for r in results if r is not None]
    if body.all_or_nothing and rejected:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY, {
            "msg": f"{len(rejected)} of {len(body.emails)} emails are invalid; nothing was queued (all_or_nothing)",
            "items": [r.model_dump(exclude_none=True) for r in rejected],
        })
    for index, prepared in ready:
        try:
            email = await commit_email(prepared, session, settings, temporal)
            results[index] = BatchItemOut(index=index, status=202, id=email.id, workflow_id=email.workflow_id, email_status=email.status)
        except HTTPException as exc:
            results[index] = BatchItemOut(index=index, status=exc.status_code, detail=[{"msg": str(exc.detail)}])
        except TemporalUnavailable:
            results[index] = BatchItemOut(index=index, status=503, detail=[{"msg": "Temporal is unavailable; this email was not queued, send it again"}])
    items = [r for r in results if r is not None]
    return BatchOut(
        items=items, accepted=sum(r.status == 202 for r in items), rejected=sum(r.status != 202 for r in items),
    )


_IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")


def _errors(errors: Any) -> list[dict[str, Any]]:
    """Pydantic's errors as JSON (no exception objects in `ctx`), with `body` and the item's place dropped."""
    out = []
    for error in errors:
        loc = [part for part in error.get("loc", ()) if part != "body"]
        out.append({"type": error.get("type"), "loc": loc, "msg": error.get("msg"),
                    **({"missing": error["missing"]} if "missing" in error else {})})
    return out


_EMAIL_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def visible_to(principal: Principal) -> list[Any]:
    """A user sees only the emails they sent; admins see all."""
    if principal.is_admin:
        return []
    return [col(Email.sender_type) == "user", col(Email.sender_id) == principal.id]


async def _email_or_404(session: SessionDep, email_id: str, principal: Principal) -> Email:
    email = await session.get(Email, email_id) if _EMAIL_ID.match(email_id) else None
    if email is not None and not principal.is_admin and (email.sender_type, email.sender_id) != ("user", principal.id):
        email = None  # someone else's email: as unknown as one that does not exist
    if email is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no email with id {email_id!r}")
    return email


def summary(email: Email) -> dict[str, Any]:
    return dict(
        id=email.id,
        workflow_id=email.workflow_id,
        status=email.status,
        sender=Sender(type=email.sender_type, id=email.sender_id),
        from_=email.from_address,
        to=email.to,
        cc=email.cc,
        bcc=email.bcc,
        subject=email.subject,
        template=TemplateUsed(
            name=email.template_name,
            version=email.template_version,
            locale=email.template_locale,
            requested_locale=email.locale,
            dependencies=email.template_dependencies or [],
        )
        if email.template_name
        else None,
        priority=email.priority,
        attempts=email.attempts,
        max_attempts=email.max_attempts,
        next_attempt_at=email.next_attempt_at,
        last_error=email.last_error,
        scheduled_for=email.scheduled_for,
        sent_at=email.sent_at,
        provider=email.provider,
        provider_message_id=email.provider_message_id,
        message_id=email.message_id,
        related_entity=RelatedEntity(type=email.related_entity_type, id=email.related_entity_id)
        if email.related_entity_type and email.related_entity_id
        else None,
        tags=email.tags,
        created_at=email.created_at,
        updated_at=email.updated_at,
    )


async def detail(session: SessionDep, email: Email) -> EmailDetail:
    events = await events_of(session, email.id)
    return EmailDetail(
        **summary(email),
        reply_to=email.reply_to,
        html=email.html,
        text=email.text,
        template_data=email.template_data,
        headers=email.headers,
        metadata=email.extra_metadata,
        events=[EventOut(event=e.event, status=e.status, attempt=e.attempt, detail=e.detail, at=e.created_at) for e in events],
    )


@router.get("/{email_id}", response_model=EmailDetail, response_model_by_alias=True, responses=NOT_FOUND, summary="An email with its events")
async def get_email(email_id: str, principal: PrincipalDep, session: SessionDep) -> EmailDetail:
    return await detail(session, await _email_or_404(session, email_id, principal))


@router.get("", response_model=EmailPage, response_model_by_alias=True, summary="List emails")
async def list_emails(
    principal: PrincipalDep,
    session: SessionDep,
    status_: Annotated[list[EmailStatus] | None, Query(alias="status", description="One or more statuses")] = None,
    recipient: Annotated[str | None, Query(max_length=512, description="Any of to/cc/bcc")] = None,
    template: Annotated[str | None, Query(max_length=200)] = None,
    related_entity_type: Annotated[str | None, Query(max_length=100)] = None,
    related_entity_id: Annotated[str | None, Query(max_length=200)] = None,
    tag: Annotated[str | None, Query(max_length=64)] = None,
    created_after: Annotated[datetime | None, Query(description="ISO 8601")] = None,
    created_before: Annotated[datetime | None, Query(description="ISO 8601")] = None,
    page: Annotated[int, Query(ge=1, le=100_000)] = 1,
    page_size: Annotated[int, Query(ge=1, le=100)] = 20,
) -> EmailPage:
    filters: list[Any] = visible_to(principal)
    if status_:
        filters.append(col(Email.status).in_([s.value for s in status_]))
    if recipient:
        try:
            address = bare_address(normalize_address(recipient)).lower()
        except ValueError as exc:
            raise RequestValidationError([{"type": "value_error", "loc": ("query", "recipient"), "msg": str(exc), "input": recipient}]) from None
        filters.append(
            sa.exists().where(col(EmailRecipient.email_id) == col(Email.id), col(EmailRecipient.address) == address)
        )
    if template:
        filters.append(col(Email.template_name) == template)
    if related_entity_type:
        filters.append(col(Email.related_entity_type) == related_entity_type)
    if related_entity_id:
        filters.append(col(Email.related_entity_id) == related_entity_id)
    for name, bound in (("created_after", created_after), ("created_before", created_before)):
        if bound is not None and bound.tzinfo is None:
            raise RequestValidationError([{"type": "value_error", "loc": ("query", name), "msg": "needs a time zone", "input": str(bound)}])
        if bound is not None:
            try:
                bound.astimezone(UTC)  # compared in UTC: 0001-01-01T00:00+01:00 is before the first UTC instant
            except OverflowError:
                raise RequestValidationError([{"type": "value_error", "loc": ("query", name), "msg": "out of range in UTC", "input": str(bound)}]) from None
    if created_after:
        filters.append(col(Email.created_at) >= created_after)
    if created_before:
        filters.append(col(Email.created_at) < created_before)
    query = select(Email).where(*filters)
    if tag:
        rows = (await session.exec(query.order_by(col(Email.created_at).desc(), col(Email.id).desc()))).all()
        matching = [e for e in rows if tag in e.tags]  # tags are JSON: filtered here, portable across databases
        total, items = len(matching), matching[(page - 1) * page_size : page * page_size]
    else:
        total = (await session.exec(select(sa.func.count()).select_from(Email).where(*filters))).one()
        items = (
            await session.exec(
                query.order_by(col(Email.created_at).desc(), col(Email.id).desc()).offset((page - 1) * page_size).limit(page_size)
            )
        ).all()
    return EmailPage(items=[EmailSummary(**summary(e)) for e in items], page=page, page_size=page_size, total=total)


async def _update(session: SessionDep, temporal: Client, email: Email, name: str, arg: Any) -> EmailState:
    # End the read transaction first: the workflow's own audit step must be able to write
    # (SQLite has one writer) while we wait for the update.
    await session.commit()
    handle = temporal.get_workflow_handle(email.workflow_id)
    try:
        return await handle.execute_update(name, arg, result_type=EmailState, rpc_timeout=RPC_TIMEOUT)
    except WorkflowUpdateFailedError as exc:  # the workflow's validator said no
        cause = exc.cause
        raise HTTPException(status.HTTP_409_CONFLICT, cause.message if isinstance(cause, ApplicationError) else str(cause)) from None
    except RPCError as exc:
        if "already completed" in exc.message or "not found" in exc.message.lower():
            raise HTTPException(status.HTTP_409_CONFLICT, f"the email is already {email.status}") from None
        raise TemporalUnavailable(exc.message) from exc
    except (WorkflowUpdateRPCTimeoutOrCancelledError, RuntimeError) as exc:
        raise TemporalUnavailable(str(exc)) from exc


@router.post("/{email_id}/cancel", response_model=EmailDetail, response_model_by_alias=True, responses={**NOT_FOUND, **CONFLICT}, summary="Cancel a queued or scheduled email")
async def cancel_email(
    email_id: str,
    principal: PrincipalDep,
    session: SessionDep,
    temporal: TemporalDep,
    body: Annotated[CancelBody | None, Body()] = None,
) -> EmailDetail:
    email = await _email_or_404(session, email_id, principal)
    if EmailStatus(email.status).is_final:
        raise HTTPException(status.HTTP_409_CONFLICT, f"the email is already {email.status}")
    state = await _update(session, temporal, email, CANCEL_UPDATE, CancelRequest(reason=body.reason if body else None))
    if state.status is not EmailStatus.CANCELLED:
        raise HTTPException(status.HTTP_409_CONFLICT, f"the email could not be cancelled: it is {state.status.value}")
    await session.refresh(email)
    return await detail(session, email)


@router.post("/{email_id}/retry", status_code=status.HTTP_202_ACCEPTED, response_model=EmailAccepted, responses={**NOT_FOUND, **CONFLICT}, summary="Deliver a failed email again")
async def retry_email(
    email_id: str, response: Response, principal: PrincipalDep, session: SessionDep, settings: SettingsDep, temporal: TemporalDep
) -> EmailAccepted:
    email = await _email_or_404(session, email_id, principal)
    if email.status != EmailStatus.FAILED.value:
        raise HTTPException(status.HTTP_409_CONFLICT, f"only failed emails can be retried; this one is {email.status}")
    spec = spec_from_record(email, retry_settings(settings, email.max_attempts))
    spec.recorded = True
    spec.send_queue = await send_queue_for(session, settings, email.sender_type, email.sender_id)
    # Written before the new run starts, so it can never overwrite the run's own steps.
    email.status, email.attempts, email.updated_at = EmailStatus.QUEUED.value, 0, utcnow()
    event = queued_event(email.id, "retry requested")
    session.add(event)
    await session.commit()
    try:
        await start_delivery(temporal, spec, settings.task_queue, WorkflowIDReusePolicy.ALLOW_DUPLICATE_FAILED_ONLY)
    except (WorkflowAlreadyStartedError, TemporalUnavailable) as exc:
        email.status = EmailStatus.FAILED.value
        await session.delete(event)
        await session.commit()
        if isinstance(exc, WorkflowAlreadyStartedError):
            raise HTTPException(status.HTTP_409_CONFLICT, "a delivery run of this email is still open; try again shortly") from None
        raise
    return accepted(email, response)


@router.patch("/{email_id}", response_model=EmailDetail, response_model_by_alias=True, responses={**NOT_FOUND, **CONFLICT}, summary="Reschedule a scheduled email")
async def reschedule_email(
    email_id: str, body: RescheduleBody, principal: PrincipalDep, session: SessionDep, settings: SettingsDep, temporal: TemporalDep
) -> EmailDetail:
    check_send_at(body.send_at, settings)
    email = await _email_or_404(session, email_id, principal)
    if email.status != EmailStatus.SCHEDULED.value:
        raise HTTPException(status.HTTP_409_CONFLICT, f"only scheduled emails can be rescheduled; this one is {email.status}")
    await _update(session, temporal, email, RESCHEDULE_UPDATE, RescheduleRequest(send_at=body.send_at.astimezone(UTC)))
    await session.refresh(email)
    return await detail(session, email)
