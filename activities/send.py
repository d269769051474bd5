"""Send activity: one delivery attempt through the configured driver."""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime, timedelta

from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.render import STORE_ERRORS, Renderer
from mailqueue.contracts import (
    PERMANENT_DELIVERY_ERROR,
    TEMPLATE_ERROR,
    TEMPLATE_STORE_UNAVAILABLE,
    TRANSIENT_DELIVERY_ERROR,
    AuditEntry,
    Content,
    EmailSpec,
    EmailStatus,
    EventType,
    SendRequest,
    SendResult,
)
from mailqueue.config import Settings
from mailqueue.crypto import SecretKeyError
from mailqueue.drivers import Driver
from mailqueue.errors import PermanentDeliveryError, TemplateError, TransientDeliveryError
from mailqueue.message import build_message, envelope, redirect
from mailqueue.models import SenderSettings
from mailqueue.senders import DriverFactory
from mailqueue.store import apply_audit

log = logging.getLogger("mailqueue.activities.send")


def _store_unavailable(spec: EmailSpec, what: str, exc: BaseException) -> ApplicationError:
    """Not a delivery attempt: the workflow waits for the database and asks again, so an outage
    delays the email without using up its attempts. The type only: driver messages can name
    hosts and users."""
    log.warning("email %s: %s unavailable (%s); the workflow will ask again", spec.email_id, what, type(exc).__name__)
    return ApplicationError(
        f"{what} unavailable ({type(exc).__name__})", {"attempt": 0}, type=TEMPLATE_STORE_UNAVAILABLE, non_retryable=True
    )


def _event_id(run_id: str, attempt: int, event: EventType) -> str:
    # Deterministic, so a repeated write of the same attempt's event is a no-op.
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"mailqueue:{run_id}:{attempt}:{event.value}"))


class SendActivities:
    def __init__(
        self, sessions: async_sessionmaker[AsyncSession], drivers: DriverFactory, renderer: Renderer, settings: Settings
    ) -> None:
        self._sessions = sessions
        self._drivers = drivers
        self._renderer = renderer
        self._redirect_to = settings.test_redirect_to

    @activity.defn(name="send_email")
    async def send(self, req: SendRequest) -> SendResult:
        info = activity.info()
        attempt = info.attempt
        spec = req.spec
        content = await self._content(req)  # before `sending`: a template that cannot render was never sent
        driver = await self._driver_for(spec)
        await self._audit(
            AuditEntry(
                email_id=spec.email_id,
                event_id=_event_id(info.workflow_run_id, attempt, EventType.SENDING),
                event=EventType.SENDING,
                at=datetime.now(UTC),
                status=EmailStatus.SENDING,
                attempt=attempt,
                detail=f"attempt {attempt} of {spec.retry.max_attempts} via {driver.name}",
                spec=spec,
            )
        )
        message = build_message(spec, content)
        sender, recipients = envelope(spec)
        if self._redirect_to:
            recipients = redirect(message, recipients, self._redirect_to)
        try:
            delivery = await driver.send(message, sender, recipients)
        except PermanentDeliveryError as exc:
            raise ApplicationError(
                exc.reason, {"attempt": attempt}, type=PERMANENT_DELIVERY_ERROR, non_retryable=True
            ) from None
        except TransientDeliveryError as exc:
            if attempt < spec.retry.max_attempts:
                await self._audit(self._retrying(req, attempt, exc.reason, info.workflow_run_id))
            raise ApplicationError(exc.reason, {"attempt": attempt}, type=TRANSIENT_DELIVERY_ERROR) from None
        result = SendResult(
            provider=driver.name,
            provider_message_id=delivery.provider_message_id,
            attempt=attempt,
            accepted_at=datetime.now(UTC),
            refused_recipients=delivery.refused_recipients,
        )
        # Recorded here, right after the server accepted, so the record never lags the mail;
        # if the database is away, the workflow records it once it is back.
        result.recorded = await self._audit(
            AuditEntry(
                email_id=spec.email_id,
                event_id=_event_id(info.workflow_run_id, attempt, EventType.SENT),
                event=EventType.SENT,
                at=result.accepted_at,
                status=EmailStatus.SENT,
                attempt=attempt,
                sent_at=result.accepted_at,
                provider=result.provider,
                provider_message_id=result.provider_message_id,
                detail=result.describe(),
                spec=spec,
            )
        )
        return result

    async def _driver_for(self, spec: EmailSpec) -> Driver:
        """The system's driver, or the one the sending user configured (secrets decrypted here only)."""
        if spec.sender_type != "user" or not spec.sender_id:
            return self._drivers.system
        try:
            async with self._sessions() as session:
                row = await session.get(SenderSettings, spec.sender_id)
            return self._drivers.for_sender(row)
        except SecretKeyError as exc:
            # A configuration fault no retry fixes soon; the message names no secret.
            raise ApplicationError(str(exc), {"attempt": 0}, type=PERMANENT_DELIVERY_ERROR, non_retryable=True) from None
        except STORE_ERRORS as exc:
            raise _store_unavailable(spec, "sender settings", exc) from None

    async def _content(self, req: SendRequest) -> Content:
        """The mail to send: given by the workflow (emails queued before the send rendered), raw, or rendered now."""
        spec = req.spec
        if req.content is not None:
            return req.content
        if spec.content is not None:
            return spec.content
        if spec.template is None:
            raise ApplicationError("the email has neither content nor a template", {"attempt": 0}, type=TEMPLATE_ERROR, non_retryable=True)
        try:
            return await self._renderer.render(spec.template)
        except TemplateError as exc:
            raise ApplicationError(str(exc), {"attempt": 0}, type=TEMPLATE_ERROR, non_retryable=True) from None
        except STORE_ERRORS as exc:
            raise _store_unavailable(spec, "template store", exc) from None

    def _retrying(self, req: SendRequest, attempt: int, reason: str, run_id: str) -> AuditEntry:
        retry = req.spec.retry
        delay = min(
            retry.initial_interval_seconds * retry.backoff_coefficient ** (attempt - 1),
            retry.maximum_interval_seconds,
        )
        now = datetime.now(UTC)
        return AuditEntry(
            email_id=req.spec.email_id,
            event_id=_event_id(run_id, attempt, EventType.RETRYING),
            event=EventType.RETRYING,
            at=now,
            status=EmailStatus.RETRYING,
            attempt=attempt,
            last_error=reason,
            detail=f"attempt {attempt} failed, next attempt in about {delay:.0f}s: {reason}",
            next_attempt_at=now + timedelta(seconds=delay),
            spec=req.spec,
        )

    async def _audit(self, entry: AuditEntry) -> bool:
        """Best effort: a database outage must not stop or repeat a send; the workflow
        records the outcome itself when this returns False."""
        try:
            async with self._sessions() as session:
                await apply_audit(session, entry)
            return True
        except Exception as exc:  # noqa: BLE001 - logged here, and the workflow records the outcome
            log.warning(
                "could not record %s event for email %s: %s: %s",
                entry.event.value, entry.email_id, type(exc).__name__, exc,
            )
            return False
