"""A user's sender settings: how their emails leave. Secrets are write-only and stored encrypted."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request, status
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, field_validator
from temporalio.client import WorkflowFailureError

from api.deps import Principal, PrincipalDep, SessionDep, SettingsDep, TemporalDep
from api.routes.emails import PreparedEmail, commit_email
from mailqueue.delivery import retry_settings, send_queue_for
from api.schemas import Text, normalize_address
from mailqueue.config import SmtpSecurity
from mailqueue.contracts import Content, EmailSpec
from mailqueue.crypto import SecretBox
from mailqueue.ids import message_id_for, new_email_id
from mailqueue.message import domain_of
from mailqueue.models import SenderSettings, User, utcnow
from mailqueue.senders import REQUIRED, SenderDriver

router = APIRouter(prefix="/v1/settings", tags=["settings"])
NOT_FOUND = {404: {"description": "No such user (or not yours)"}}
SECRETS = {"smtp_password": "smtp_password_enc", "api_key": "api_key_enc", "api_secret": "api_secret_enc"}


class MailSettingsIn(BaseModel):
    """Secrets (smtp_password, api_key, api_secret): omit or null to keep the stored one, "" to remove it."""

    model_config = ConfigDict(extra="forbid")
    driver: SenderDriver = SenderDriver.SYSTEM_SMTP
    smtp_host: str | None = Field(default=None, max_length=255, pattern=r"^[A-Za-z0-9.-]+$")
    smtp_port: int | None = Field(default=None, ge=1, le=65535)
    smtp_username: Text | None = Field(default=None, max_length=255)
    smtp_password: str | None = Field(default=None, max_length=1000)
    smtp_security: SmtpSecurity | None = None
    api_key: str | None = Field(default=None, max_length=1000, description="SendGrid or Mailgun API key; SES access key id")
    api_secret: str | None = Field(default=None, max_length=1000, description="SES secret access key")
    mailgun_domain: str | None = Field(default=None, max_length=255, pattern=r"^[A-Za-z0-9.-]+$")
    mailgun_region: str | None = Field(default=None, pattern=r"^(us|eu)$")
    ses_region: str | None = Field(default=None, max_length=32, pattern=r"^[a-z]{2}(-[a-z]+)+-\d$")
    default_from: str | None = Field(default=None, max_length=512)
    hourly_limit: int | None = Field(default=None, ge=1, le=10_000_000)
    daily_limit: int | None = Field(default=None, ge=1, le=100_000_000)

    @field_validator("default_from")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        return normalize_address(value) if value else None


class MailSettingsOut(BaseModel):
    user_id: str
    driver: SenderDriver
    smtp_host: str | None = None
    smtp_port: int | None = None
    smtp_username: str | None = None
    smtp_security: str | None = None
    smtp_password_set: bool = False
    api_key_set: bool = False
    api_secret_set: bool = False
    mailgun_domain: str | None = None
    mailgun_region: str | None = None
    ses_region: str | None = None
    default_from: str | None = None
    hourly_limit: int | None = None
    daily_limit: int | None = None
    updated_at: datetime | None = None


class TestIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    to: str | None = Field(default=None, max_length=512, description="Default: the user's email address")

    @field_validator("to")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        return normalize_address(value) if value else None


class TestOut(BaseModel):
    email_id: str
    status: str
    provider: str | None
    provider_message_id: str | None
    error: str | None


def _out(user_id: str, row: SenderSettings | None) -> MailSettingsOut:
    if row is None:
        return MailSettingsOut(user_id=user_id, driver=SenderDriver.SYSTEM_SMTP)
    return MailSettingsOut(
        **{k: v for k, v in row.model_dump().items() if not k.endswith("_enc")},
        smtp_password_set=bool(row.smtp_password_enc), api_key_set=bool(row.api_key_enc), api_secret_set=bool(row.api_secret_enc),
    )


async def _target(principal: Principal, session: SessionDep, user_id: str | None) -> User:
    """The caller's own settings; an admin may name a user. Someone else's: 404."""
    if user_id is None:
        if principal.kind != "user":
            raise RequestValidationError([{"type": "value_error", "loc": ("query", "user_id"), "input": None,
                                           "msg": "the bootstrap key sends as the system (MAILQUEUE_SMTP_*); name a user with ?user_id="}])
        user_id = principal.id
    user = await session.get(User, user_id) if (principal.is_admin or user_id == principal.id) else None
    if user is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no user with id {user_id!r}")
    return user


UserQuery = Annotated[str | None, Query(max_length=36, description="Admins: whose settings")]


@router.get("/mail", response_model=MailSettingsOut, responses=NOT_FOUND, summary="The caller's sender settings (secrets never shown)")
async def get_mail_settings(principal: PrincipalDep, session: SessionDep, user_id: UserQuery = None) -> MailSettingsOut:
    user = await _target(principal, session, user_id)
    return _out(user.id, await session.get(SenderSettings, user.id))


@router.put("/mail", response_model=MailSettingsOut, responses=NOT_FOUND, summary="Replace the caller's sender settings")
async def put_mail_settings(
    body: MailSettingsIn, request: Request, principal: PrincipalDep, session: SessionDep, user_id: UserQuery = None
) -> MailSettingsOut:
    user = await _target(principal, session, user_id)
    row = await session.get(SenderSettings, user.id) or SenderSettings(user_id=user.id)
    fields = body.model_dump(exclude=set(SECRETS))
    for name, value in fields.items():
        setattr(row, name, value.value if hasattr(value, "value") else value)
    box: SecretBox = request.app.state.secrets
    for name, column in SECRETS.items():
        value = getattr(body, name)
        if value is not None:
            setattr(row, column, box.encrypt(value) if value else None)
    missing = [f.removesuffix("_enc") for f in REQUIRED[body.driver] if not getattr(row, f)]
    if body.driver is SenderDriver.USER_SMTP and not row.smtp_port:
        row.smtp_port = 587
        missing = [m for m in missing if m != "smtp_port"]
    if missing:
        raise RequestValidationError([
            {"type": "missing", "loc": ("body", m), "input": None, "msg": f"driver {body.driver.value} needs {m}"} for m in missing
        ])
    row.updated_at = utcnow()
    session.add(row)
    await session.commit()
    await session.refresh(row)
    return _out(user.id, row)


@router.post(
    "/mail/test",
    response_model=TestOut,
    responses={**NOT_FOUND, 503: {"description": "Temporal unavailable; retry"}},
    summary="Send a test email now through these settings and report the answer",
)
async def test_mail_settings(
    principal: PrincipalDep, session: SessionDep, settings: SettingsDep, temporal: TemporalDep,
    body: TestIn | None = None, user_id: UserQuery = None,
) -> TestOut:
    user = await _target(principal, session, user_id)
    row = await session.get(SenderSettings, user.id)
    to = (body.to if body and body.to else None) or user.email
    if not to:
        raise RequestValidationError([{"type": "missing", "loc": ("body", "to"), "input": None, "msg": "the user has no email address: give `to`"}])
    try:
        to = normalize_address(to)
    except ValueError as exc:  # the user's own address, stored before addresses were checked
        raise RequestValidationError([{"type": "value_error", "loc": ("body", "to"), "input": None, "msg": f"{exc}: give `to`"}]) from None
    from_address = (row.default_from if row else None) or normalize_address(settings.default_from)
    email_id = new_email_id()
    driver = SenderDriver(row.driver).value if row else SenderDriver.SYSTEM_SMTP.value
    # An ordinary email (recorded, one attempt): the settings are only ever decrypted by the worker.
    spec = EmailSpec(
        email_id=email_id, message_id=message_id_for(email_id, settings.message_id_domain or domain_of(from_address)),
        from_address=from_address, to=[to],
        content=Content(subject="mailqueue test email",
                        text=f"This test email was sent through your mailqueue settings (driver {driver}) at {datetime.now(UTC):%Y-%m-%d %H:%M:%S} UTC."),
        retry=retry_settings(settings, 1), tags=["settings-test"], sender_type="user", sender_id=user.id, recorded=True,
        send_queue=await send_queue_for(session, settings, "user", user.id),
    )
    # The same path as POST /v1/emails: no record is left behind if Temporal cannot take it (503).
    email = await commit_email(PreparedEmail(spec, None, "", None, None), session, settings, temporal)
    handle = temporal.get_workflow_handle(email.workflow_id)
    error: str | None = None
    try:
        await asyncio.wait_for(handle.result(), settings.send_timeout_seconds + 15)
    except WorkflowFailureError:
        pass  # the record says why
    except TimeoutError:
        error = "no answer yet; the email stays queued: GET /v1/emails/" + email_id
    await session.refresh(email)
    return TestOut(
        email_id=email_id, status=email.status, provider=email.provider,
        provider_message_id=email.provider_message_id, error=error or email.last_error,
    )


