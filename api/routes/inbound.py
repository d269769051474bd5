"""/v1/inbound/{ses,sendgrid,mailgun}: providers' events after "sent" (delivered, bounced,
complained, unsubscribed). No API key: the provider's signature is the credential.

/v1/inbound/{ses,sendgrid,mailgun}/{user_id}: the same, for mail through a user's own provider
account, verified with the keys in that user's sender settings and touching that user's emails only.
An unknown user and a user without the provider's key get the same 403.

401: the request carries no signature. 403: the signature does not verify, is stale (SNS: over an
hour old; SendGrid, Mailgun: over MAILQUEUE_INBOUND_MAX_AGE_SECONDS), was used before (Mailgun), the
SNS topic is not ours, or the route is not configured. Nothing changes on any refusal."""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Header, HTTPException, Path, Request

from api.deps import SessionDep
from api.schemas.inbound import MAILGUN_BODY, SENDGRID_BODY, SNS_BODY, InboundResult, request_body
from api.services import inbound as service
from api.services.errors import Invalid, ServiceError
from mailqueue import inbound

log = logging.getLogger("mailqueue.inbound")
router = APIRouter(prefix="/v1/inbound", tags=["provider events"])

RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "Verified; each event recorded, or counted as a duplicate, unknown or ignored"},
    400: {"description": "The body is not JSON"},
    401: {"description": "No signature"},
    403: {"description": "A signature that does not verify, is stale or was used before; a topic not allowed; or this provider is not configured here"},
    422: {"description": "JSON, but not what the provider sends"},
    503: {"description": "Could not verify now (the SNS certificate or confirm URL unreachable), or the database is down: the provider retries"},
}
USER_RESPONSES: dict[int | str, dict[str, Any]] = {
    **RESPONSES,
    200: {"description": "Verified with the user's key; each event recorded, or counted as a duplicate, unknown (including "
                         "another sender's email) or ignored"},
    403: {"description": "A signature that does not verify, is stale or was used before; a topic not in the user's list; or no such "
                         "user, or no key of this provider in their sender settings (the same answer)"},
    503: {"description": "Could not verify now (the SNS certificate or confirm URL unreachable, the user's stored key unreadable), "
                         "or the database is down: the provider retries"},
}
UserId = Annotated[str, Path(min_length=1, max_length=36, description="The user whose provider account sends these events")]
SendGridSignature = Annotated[str | None, Header(alias=inbound.SENDGRID_SIGNATURE, max_length=512, description="base64 DER ECDSA signature")]
SendGridTimestamp = Annotated[str | None, Header(alias=inbound.SENDGRID_TIMESTAMP, max_length=32, description="unix seconds, signed with the body")]


async def _verified(source: str, call: Any) -> InboundResult:
    try:
        return await call
    except inbound.Refused as exc:
        log.warning("%s event refused (%s): %s", source, type(exc).__name__, exc)
        headers = {"WWW-Authenticate": f'Signature realm="{source}"'} if exc.status == 401 else None
        raise HTTPException(exc.status, str(exc), headers=headers) from None
    except inbound.Unavailable as exc:
        log.warning("%s event not verified now: %s", source, exc)
        raise HTTPException(503, f"could not verify now: {exc}; nothing was changed, try again", headers={"Retry-After": "60"}) from None
    except inbound.Malformed as exc:
        if exc.errors is None:
            raise ServiceError(str(exc)) from None  # 400
        raise Invalid([{**e, "loc": ("body", *e.get("loc", ()))} for e in exc.errors]) from None


@router.post(
    "/ses", response_model=InboundResult, responses=RESPONSES, openapi_extra=request_body(SNS_BODY),
    summary="SES events through SNS (bounce, complaint, delivery); confirms SNS subscriptions",
    description="Subscribe this URL (HTTPS) to the SNS topics SES publishes to, with raw message delivery off; "
    "set MAILQUEUE_SNS_TOPIC_ARNS. The body is read as JSON whatever its Content-Type (SNS sends text/plain). The SNS signature is verified with the certificate of SigningCertURL (an SNS endpoint).",
)
async def ses_events(request: Request, session: SessionDep) -> InboundResult:
    body = await request.body()
    keys = inbound.Keys.of_settings(request.app.state.settings)
    return await _verified("ses", service.ses(session, keys, request.app.state.sns_certificates, body))


@router.post(
    "/sendgrid", response_model=InboundResult, responses=RESPONSES, openapi_extra=request_body(SENDGRID_BODY),
    summary="SendGrid Event Webhook (signed): delivered, bounce, deferred, dropped, spamreport, unsubscribe",
    description="Enable the Event Webhook's signature verification and set MAILQUEUE_SENDGRID_WEBHOOK_PUBLIC_KEY to its key.",
)
async def sendgrid_events(
    request: Request,
    session: SessionDep,
    signature: SendGridSignature = None,
    timestamp: SendGridTimestamp = None,
) -> InboundResult:
    body = await request.body()
    keys = inbound.Keys.of_settings(request.app.state.settings)
    return await _verified("sendgrid", service.sendgrid(session, keys, body, signature, timestamp))


@router.post(
    "/mailgun", response_model=InboundResult, responses=RESPONSES, openapi_extra=request_body(MAILGUN_BODY),
    summary="Mailgun webhooks (signed): delivered, failed, complained, unsubscribed",
    description="Point the domain's webhooks here and set MAILQUEUE_MAILGUN_WEBHOOK_SIGNING_KEY. A signed token is accepted once.",
)
async def mailgun_events(request: Request, session: SessionDep) -> InboundResult:
    body = await request.body()
    return await _verified("mailgun", service.mailgun(session, inbound.Keys.of_settings(request.app.state.settings), body))


# --- a user's own provider account ----------------------------------------------------------------


@router.post(
    "/ses/{user_id}", response_model=InboundResult, responses=USER_RESPONSES, openapi_extra=request_body(SNS_BODY),
    summary="SES events of a user's own SES account, through their SNS topics",
    description="Subscribe this URL to the SNS topics the user's SES publishes to (raw message delivery off), and list those "
    "topics in the user's sns_topic_arns (PUT /v1/settings/mail). Verified like /v1/inbound/ses; only the user's emails are touched.",
)
async def user_ses_events(user_id: UserId, request: Request, session: SessionDep) -> InboundResult:
    body = await request.body()
    return await _verified("ses", service.user_ses(session, request.app.state.settings, request.app.state.sns_certificates, user_id, body))


@router.post(
    "/sendgrid/{user_id}", response_model=InboundResult, responses=USER_RESPONSES, openapi_extra=request_body(SENDGRID_BODY),
    summary="SendGrid Event Webhook of a user's own SendGrid account (signed)",
    description="Point the user's signed Event Webhook here and set its verification key as sendgrid_webhook_public_key "
    "(PUT /v1/settings/mail). Verified like /v1/inbound/sendgrid; only the user's emails are touched.",
)
async def user_sendgrid_events(
    user_id: UserId, request: Request, session: SessionDep, signature: SendGridSignature = None, timestamp: SendGridTimestamp = None,
) -> InboundResult:
    body = await request.body()
    return await _verified("sendgrid", service.user_sendgrid(session, request.app.state.settings, user_id, body, signature, timestamp))


@router.post(
    "/mailgun/{user_id}", response_model=InboundResult, responses=USER_RESPONSES, openapi_extra=request_body(MAILGUN_BODY),
    summary="Mailgun webhooks of a user's own Mailgun domain (signed)",
    description="Point the domain's webhooks here and set its signing key as mailgun_webhook_signing_key (PUT /v1/settings/mail; "
    "stored encrypted). Verified like /v1/inbound/mailgun, a signed token accepted once; only the user's emails are touched.",
)
async def user_mailgun_events(user_id: UserId, request: Request, session: SessionDep) -> InboundResult:
    body = await request.body()
    return await _verified("mailgun", service.user_mailgun(session, request.app.state.settings, request.app.state.secrets, user_id, body))
