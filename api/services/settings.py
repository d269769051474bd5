"""Sender settings: how a user's emails leave (secrets write-only, stored encrypted), and a test send."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from temporalio.client import WorkflowFailureError

from api.schemas.common import normalize_address
from api.schemas.settings import SECRETS, MailSettingsIn, TestIn, TestOut
from api.services.context import Context
from api.services.emails import PreparedEmail, commit_email
from api.services.errors import Invalid, NotFound, field_error, invalid
from mailqueue.config import SmtpSecurity
from mailqueue.contracts import Content, EmailSpec, SenderType
from mailqueue.delivery import retry_settings
from mailqueue.domains import FromRefused, sender_identity
from mailqueue.drivers.base import SenderDriver
from mailqueue.egress import DestinationRefused, Kind, check_destination, plaintext_auth_allowed, secret_binding
from mailqueue.ids import message_id_for, new_email_id
from mailqueue.models import SenderSettings, User, utcnow
from mailqueue.senders import REQUIRED, over_ceilings, resolve_sender


async def target_user(ctx: Context, user_id: str | None) -> User:
    """The caller's own settings; an admin may name a user. Someone else's: NotFound."""
    principal = ctx.principal
    if user_id is None:
        if not principal.is_user:
            raise invalid(("query", "user_id"), "the bootstrap key sends as the system (MAILQUEUE_SMTP_*); name a user with ?user_id=")
        user_id = principal.id
    user = await ctx.session.get(User, user_id) if (principal.is_admin or user_id == principal.id) else None
    if user is None:
        raise NotFound(f"no user with id {user_id!r}")
    return user


async def get_mail_settings(ctx: Context, user_id: str | None) -> tuple[User, SenderSettings | None]:
    user = await target_user(ctx, user_id)
    return user, await ctx.session.get(SenderSettings, user.id)


async def put_mail_settings(ctx: Context, body: MailSettingsIn, user_id: str | None) -> tuple[User, SenderSettings]:
    """Replace a user's settings; a secret left out (or null) keeps the stored one, "" removes it."""
    session = ctx.session
    user = await target_user(ctx, user_id)
    row = await session.get(SenderSettings, user.id) or SenderSettings(user_id=user.id)
    given_for = {column: secret_binding(row, column) for column in SECRETS.values()}  # what each stored secret was given for
    for name, value in body.model_dump(exclude=set(SECRETS)).items():
        setattr(row, name, value.value if hasattr(value, "value") else value)
    for name, column in SECRETS.items():
        value = getattr(body, name)
        if value is not None:
            setattr(row, column, ctx.secrets.encrypt(value) if value else None)
        elif secret_binding(row, column) != given_for[column]:
            # A secret goes only where it was given for: a new server, login or security (or a new
            # provider) must be given it again, or whoever holds the key could send it anywhere.
            setattr(row, column, None)
    missing = [f.removesuffix("_enc") for f in REQUIRED[body.driver] if not getattr(row, f)]
    if body.driver is SenderDriver.USER_SMTP and not row.smtp_port:
        row.smtp_port = 587
        missing = [m for m in missing if m != "smtp_port"]
    if missing:
        raise Invalid([field_error(("body", m), f"driver {body.driver.value} needs {m}", type="missing") for m in missing])
    if body.driver is SenderDriver.USER_SMTP:
        await _check_smtp_server(ctx, row)
    if row.default_from:  # the user's own From: only in one of their verified domains (mailqueue/domains.py)
        try:
            await sender_identity(
                session, ctx.settings, SenderType.USER, user.id, row.default_from, "default_from", normalize_address(ctx.settings.default_from),
            )
        except FromRefused as exc:
            raise invalid(("body", "default_from"), str(exc), value=row.default_from, type="unverified_sender") from None
    if over := over_ceilings(row, user):  # an admin's ceiling (PATCH /v1/users/{id}) binds whoever writes here
        raise Invalid([
            field_error(("body", name), f"at most {ceiling}: the ceiling an admin set for this user (GET /v1/users/me shows it)",
                        value=getattr(row, name), ceiling=ceiling)
            for name, ceiling in over
        ])
    row.updated_at = utcnow()
    session.add(row)
    await session.commit()
    await session.refresh(row)
    return user, row


async def _check_smtp_server(ctx: Context, row: SenderSettings) -> None:
    """The egress policy at the door (the send checks again, and connects to what it checked):
    a host or port no send may use is refused now, saying which rule, and so is AUTH that would
    cross the network unencrypted."""
    host, port = row.smtp_host or "", row.smtp_port or 587
    try:
        await check_destination(ctx.settings, host, port, kind=Kind.SMTP)
    except DestinationRefused as exc:
        field, value = ("smtp_port", port) if exc.part == "port" else ("smtp_host", host)
        msg = exc.reason if exc.part == "port" else f"{host} {exc.reason}"
        raise invalid(("body", field), msg, value=value, type="egress_refused") from None
    if row.smtp_username and row.smtp_security == SmtpSecurity.NONE and not plaintext_auth_allowed(ctx.settings, host):
        raise invalid(
            ("body", "smtp_security"), "AUTH needs an encrypted connection: use starttls or tls "
            "(the operator allows plain-text AUTH only to the hosts in MAILQUEUE_SMTP_PLAINTEXT_AUTH_HOSTS)",
            value=row.smtp_security, type="plaintext_auth",
        )


async def send_test(ctx: Context, body: TestIn | None, user_id: str | None) -> TestOut:
    """Send a test email now through a user's settings and wait (a while) for the answer.

    An ordinary recorded email with one attempt: only the worker ever decrypts the settings."""
    session, settings = ctx.session, ctx.settings
    user = await target_user(ctx, user_id)
    to = (body.to if body and body.to else None) or user.email
    if not to:
        raise invalid(("body", "to"), "the user has no email address: give `to`", type="missing")
    try:
        to = normalize_address(to)
    except ValueError as exc:  # the user's own address, stored before addresses were checked
        raise invalid(("body", "to"), f"{exc}: give `to`") from None
    route = await resolve_sender(session, settings, SenderType.USER, user.id)
    try:  # sent from the user's default_from, which must be in one of their verified domains
        identity = await sender_identity(
            session, settings, SenderType.USER, user.id, route.default_from, "default_from", normalize_address(settings.default_from),
        )
    except FromRefused as exc:
        why = str(exc) if route.default_from else "set default_from in /v1/settings/mail to an address in a verified domain"
        raise invalid(("settings", "default_from"), f"the test email is sent from default_from: {why}", type="unverified_sender") from None
    email_id = new_email_id()
    driver = route.settings.driver if route.settings is not None else SenderDriver.SYSTEM_SMTP.value
    # One attempt, and an unreachable server is that attempt's answer: a test asks now, it does
    # not wait for the server to come back.
    test_retry = retry_settings(settings, 1, route)
    test_retry.unreachable_wait_seconds = 0
    spec = EmailSpec(
        email_id=email_id, message_id=message_id_for(email_id, identity.message_id_domain),
        from_address=identity.from_address, to=[to],
        content=Content(subject="mailqueue test email",
                        text=f"This test email was sent through your mailqueue settings (driver {driver}) at {datetime.now(UTC):%Y-%m-%d %H:%M:%S} UTC."),
        retry=test_retry, tags=["settings-test"], sender_type=SenderType.USER, sender_id=user.id,
        send_queue=route.send_queue, recorded=True,
    )
    # The same path as POST /v1/emails: no record is left behind if Temporal cannot take it.
    email = await commit_email(ctx, PreparedEmail(spec))
    error: str | None = None
    try:
        await asyncio.wait_for(ctx.temporal.get_workflow_handle(email.workflow_id).result(), settings.send_timeout_seconds + 15)
    except WorkflowFailureError:
        pass  # the record says why
    except TimeoutError:
        error = "no answer yet; the email stays queued: GET /v1/emails/" + email_id
    await session.refresh(email)
    return TestOut(
        email_id=email_id, status=email.status, provider=email.provider,
        provider_message_id=email.provider_message_id, error=error or email.last_error,
    )
