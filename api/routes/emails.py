"""/v1/emails: queue, inspect, list, cancel, retry and reschedule emails."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Body, Header, Query, Request, Response, status

from api.deps import ContextDep
from api.metrics import ApiMetrics, Received
from api.schemas.emails import (
    IDEMPOTENCY_KEY_MAX_LENGTH,
    IDEMPOTENCY_KEY_PATTERN,
    BatchIn,
    BatchOut,
    CancelBody,
    EmailAccepted,
    EmailDetail,
    EmailPage,
    EmailRequest,
    EmailSummary,
    RescheduleBody,
)
from api.services import emails
from api.services.errors import ServiceError
from mailqueue.contracts import EmailStatus
from mailqueue.models import Email

router = APIRouter(prefix="/v1/emails", tags=["emails"])

NOT_FOUND = {404: {"description": "No such email"}}
CONFLICT = {409: {"description": "Not possible in the email's current state"}}

IdempotencyKey = Annotated[
    str | None,
    Header(alias="Idempotency-Key", min_length=1, max_length=IDEMPOTENCY_KEY_MAX_LENGTH, pattern=IDEMPOTENCY_KEY_PATTERN,
           description="Same key and body: same answer, one email. Same key, other body: 409."),
]


def _metrics(request: Request) -> ApiMetrics:
    return request.app.state.metrics


def accepted(email: Email, response: Response) -> EmailAccepted:
    response.headers["Location"] = f"/v1/emails/{email.id}"
    return EmailAccepted.of(email)


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=EmailAccepted,
    responses={409: {"description": "Idempotency-Key reused with a different body"}, 503: {"description": "Temporal unavailable; retry"}},
    summary="Queue an email",
)
async def queue_email(
    req: EmailRequest, request: Request, response: Response, ctx: ContextDep, idempotency_key: IdempotencyKey = None
) -> EmailAccepted:
    email = await emails.accept(ctx, req, idempotency_key)
    _metrics(request).received(Received.DUPLICATE if ctx.replays else Received.ACCEPTED)  # refusals: counted from the answer
    return accepted(email, response)


@router.post(
    "/batch",
    response_model=BatchOut,
    responses={422: {"description": "all_or_nothing, and at least one email is invalid: nothing was queued"}},
    summary="Queue up to 100 emails; each is validated and answered on its own",
)
async def queue_batch(body: BatchIn, request: Request, ctx: ContextDep) -> BatchOut:
    try:
        out = await emails.accept_batch(ctx, body)
    except ServiceError as exc:
        _metrics(request).refused_batch(exc, len(body.emails))
        raise
    _metrics(request).received_batch((item.status for item in out.items), ctx.replays)
    return out


@router.get("/{email_id}", response_model=EmailDetail, response_model_by_alias=True, responses=NOT_FOUND, summary="An email with its events")
async def get_email(email_id: str, ctx: ContextDep) -> EmailDetail:
    return EmailDetail.with_events(*await emails.get_email(ctx, email_id))


@router.get("", response_model=EmailPage, response_model_by_alias=True, summary="List emails")
async def list_emails(
    ctx: ContextDep,
    status_: Annotated[list[EmailStatus] | None, Query(alias="status", description="One or more statuses")] = None,
    recipient: Annotated[str | None, Query(max_length=512, description="Any of to/cc/bcc")] = None,
    template: Annotated[str | None, Query(max_length=200)] = None,
    related_entity_type: Annotated[str | None, Query(max_length=100)] = None,
    related_entity_id: Annotated[str | None, Query(max_length=200)] = None,
    tag: Annotated[str | None, Query(max_length=64)] = None,
    created_after: Annotated[datetime | None, Query(description="ISO 8601")] = None,
    created_before: Annotated[datetime | None, Query(description="ISO 8601")] = None,
    page: Annotated[int, Query(ge=1, le=100_000)] = 1,
    page_size: Annotated[int, Query(ge=1, le=emails.MAX_PAGE_SIZE)] = 20,
) -> EmailPage:
    where = emails.EmailFilter(
        statuses=status_, recipient=recipient, template=template, related_entity_type=related_entity_type,
        related_entity_id=related_entity_id, tag=tag, created_after=created_after, created_before=created_before,
    )
    total, items = await emails.list_emails(ctx, where, page, page_size)
    return EmailPage(items=[EmailSummary.of(e) for e in items], page=page, page_size=page_size, total=total)


@router.post(
    "/{email_id}/cancel", response_model=EmailDetail, response_model_by_alias=True, responses={**NOT_FOUND, **CONFLICT},
    summary="Cancel a queued, scheduled, deferred or paused email",
)
async def cancel_email(email_id: str, ctx: ContextDep, body: Annotated[CancelBody | None, Body()] = None) -> EmailDetail:
    return EmailDetail.with_events(*await emails.cancel(ctx, email_id, body.reason if body else None))


@router.post(
    "/{email_id}/retry", status_code=status.HTTP_202_ACCEPTED, response_model=EmailAccepted, responses={**NOT_FOUND, **CONFLICT},
    summary="Deliver a failed email again",
)
async def retry_email(email_id: str, response: Response, ctx: ContextDep) -> EmailAccepted:
    return accepted(await emails.retry(ctx, email_id), response)


@router.patch(
    "/{email_id}", response_model=EmailDetail, response_model_by_alias=True, responses={**NOT_FOUND, **CONFLICT},
    summary="Reschedule a scheduled email",
)
async def reschedule_email(email_id: str, body: RescheduleBody, ctx: ContextDep) -> EmailDetail:
    return EmailDetail.with_events(*await emails.reschedule(ctx, email_id, body.send_at))
