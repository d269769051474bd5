"""Send activity: one delivery attempt through the configured driver."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from datetime import UTC, datetime, timedelta

from botocore.exceptions import BotoCoreError, ClientError
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession
from temporalio import activity
from temporalio.exceptions import ApplicationError, ApplicationErrorCategory

from mailqueue.blobs import BlobMissing, BlobStore, blob_store, read_attachment
from mailqueue.bounces import bounce_address
from mailqueue.config import Settings
from mailqueue.contracts import (
    EMAIL_CLOSED,
    NOT_SENT_ASK_AGAIN,
    PERMANENT_DELIVERY_ERROR,
    SEND_QUEUE_CHANGED,
    SENDING_PAUSED,
    SERVER_UNREACHABLE,
    TEMPLATE_ERROR,
    TRANSIENT_DELIVERY_ERROR,
    WENT_OUT,
    AttachmentRef,
    AuditEntry,
    Content,
    EmailSpec,
    EmailStatus,
    EventType,
    SendRequest,
    SendResult,
)
from mailqueue.crypto import SecretBox, SecretKeyError
from mailqueue.db import STORE_ERRORS
from mailqueue.dkim_keys import DkimSigner, signer_for
from mailqueue.drivers.base import Driver, DriverName
from mailqueue.drivers.factory import DriverFactory
from mailqueue.drivers.smtp import SmtpDriver
from mailqueue.email_store import PriorDelivery, RecordClosed, apply_audit
from mailqueue.errors import (
    PermanentDeliveryError,
    ServerUnreachable,
    TemplateError,
    TransientDeliveryError,
)
from mailqueue.message import build_message, envelope, redirect
from mailqueue.metrics import SendOutcome, WorkerMetrics
from mailqueue.models import Email
from mailqueue.flags import Flags
from mailqueue.senders import resolve_sender, sender_key
from mailqueue.suppressions import (
    dropped_detail,
    has_recipients,
    suppressed_for,
    without_suppressed,
)
from mailqueue.template_library import Renderer
from mailqueue.tracing import span

log = logging.getLogger("mailqueue.activities.send")

CLAIM_SECONDS = 2.0  # the `sending` write may not eat the attempt's time (it is best effort)
SAFETY_SECONDS = 0.5  # a send ends this long before the attempt's deadline
# A send starts only with this much of its attempt left (a send takes milliseconds to a second;
# one cut short by the deadline is retried). Waiting for more would send a busy worker's mail to
# the back of the queue for nothing.
MIN_SEND_SECONDS = 2.0


def _ask_again(
    spec: EmailSpec, reason: str, *, kind: str = NOT_SENT_ASK_AGAIN, attempts_used: int = 0, **details: object
) -> ApplicationError:
    """Not a delivery attempt (nothing was sent): the workflow waits and asks again, so the email
    is delayed without using up its attempts. `kind` tells the workflow what it waits for."""
    log.warning("email %s: %s; not counted as an attempt, the workflow will ask again", spec.email_id, reason)
    # BENIGN: expected while an outage lasts; the SDK then logs it at DEBUG, not with a
    # traceback at WARNING on every ask (the line above says what happened).
    return ApplicationError(
        reason, {"attempt": attempts_used, **details}, type=kind, non_retryable=True, category=ApplicationErrorCategory.BENIGN
    )


def _store_unavailable(spec: EmailSpec, what: str, exc: BaseException) -> ApplicationError:
    """The database is away. The exception's type only: driver messages can name hosts and users."""
    return _ask_again(spec, f"{what} unavailable ({type(exc).__name__})")


def _queue_name(send_queue: str | None) -> str:
    return f"the {send_queue} send queue" if send_queue else "the main queue"


class AttemptClock:
    """How long until Temporal gives this attempt up (its start-to-close timeout)."""

    def __init__(self, info: activity.Info) -> None:
        self.limit = info.start_to_close_timeout.total_seconds() if info.start_to_close_timeout else 0.0
        # The server started the clock when it handed the task out; a busy worker can take
        # seconds to begin running it (5 s seen under load), and those count too. This relies on
        # the worker's and the server's clocks agreeing (NTP), as Temporal's own timeouts do.
        delay = (datetime.now(UTC) - info.started_time).total_seconds()
        self._deadline = time.monotonic() + self.limit - max(delay, 0.0)

    def left(self) -> float | None:
        return self._deadline - time.monotonic() if self.limit else None


def _event_id(info: activity.Info, event: EventType) -> str:
    # Deterministic, so a repeated write of the same attempt's event is a no-op. The activity id
    # tells apart the send steps of one run (the workflow asks again after an outage).
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"mailqueue:{info.workflow_run_id}:{info.activity_id}:{info.attempt}:{event.value}"))


class SendActivities:
    def __init__(
        self, sessions: async_sessionmaker[AsyncSession], drivers: DriverFactory, renderer: Renderer, settings: Settings,
        metrics: WorkerMetrics | None = None, secrets: SecretBox | None = None, flags: Flags | None = None,
    ) -> None:
        self._sessions = sessions
        self._secrets = secrets  # opens the DKIM keys (built on first use)
        self._metrics = metrics or WorkerMetrics()
        self._drivers = drivers
        self._renderer = renderer
        self._settings = settings
        self._redirect_to = settings.test_redirect_to
        self._blobs: BlobStore | None = None  # where attachment bytes are (made on first use)
        self._flags = flags  # the kill switch and the drivers' flags (None: nothing is ever paused)

    @activity.defn(name="send_email")
    async def send(self, req: SendRequest) -> SendResult:
        info = activity.info()
        clock = AttemptClock(info)
        attempt = info.attempt
        spec = req.spec
        if self._flags is not None and req.fresh_flags:
            await self._flags.refresh()  # the workflow was told a flag changed: not a cached value
        if (held := self._paused_by(spec)) is not None:  # first, before any work
            return await self._held(spec, held)
        content = await self._content(req)  # before `sending`: a template that cannot render was never sent
        files = await self._files(spec)  # and files that are gone: never sent without them
        driver, signer, own = await self._driver_for(spec)
        if (held := self._paused_by(spec, driver.name, own)) is not None:
            return await self._held(spec, held)
        prior, found = await self._claim(
            AuditEntry(
                email_id=spec.email_id,
                event_id=_event_id(info, EventType.SENDING),
                event=EventType.SENDING,
                at=datetime.now(UTC),
                status=EmailStatus.SENDING,
                attempt=attempt,
                detail=f"attempt {attempt} of {spec.retry.max_attempts} via {driver.name}",
                content=content if spec.template is not None else None,  # what a templated email says
                spec=spec,
            )
        )
        if prior is not None:
            # An earlier attempt's mail was accepted and recorded, but its completion never
            # reached Temporal (the worker died, or the completion was lost): do not send again.
            log.warning(
                "email %s: attempt %s was accepted by %s; attempt %s does not send again",
                spec.email_id, prior.attempt, prior.provider, attempt,
            )
            return SendResult(
                provider=prior.provider or driver.name,
                provider_message_id=prior.provider_message_id or "",
                attempt=prior.attempt,
                accepted_at=prior.sent_at or datetime.now(UTC),
                recorded=True,
            )
        # After the claim, so that a mail an earlier attempt sent is never re-recorded as suppressed.
        spec = await self._without_suppressed(spec, info, found)
        if not has_recipients(spec):  # all suppressed since the email was accepted: recorded, nothing sent
            return SendResult(
                provider=driver.name, provider_message_id="", attempt=attempt, accepted_at=datetime.now(UTC),
                recorded=True, suppressed=True,
            )
        message = build_message(spec, content, files)
        sender, recipients = envelope(spec)
        if self._settings.bounce_domain and driver is self._drivers.system and driver.name == DriverName.SMTP:
            # The system's relay gets its bounces back by mail, at an address that names the email
            # (VERP); the From header stays. Not a user's own SMTP server: many (Gmail, Microsoft 365)
            # refuse or rewrite a MAIL FROM that is not the signed-in account, and their bounces go to
            # the user. Providers report bounces as events of their own, and take `sender` for the From.
            sender = bounce_address(spec.email_id, self._settings.bounce_domain)
        if self._redirect_to:
            recipients = redirect(message, recipients, self._redirect_to)
        # Once this attempt's time is up, Temporal starts the next one, whether or not this one is
        # still running: a send must neither start without the time to finish nor outlive it, or
        # two attempts could send at once. Not starting is not an attempt: the workflow asks again.
        left = clock.left()
        if left is not None and left < min(MIN_SEND_SECONDS, clock.limit / 4):
            raise _ask_again(spec, f"not sent: {left:.1f}s left of attempt {attempt}, too little to send (the steps before the send were slow)")
        began = time.monotonic()
        if_failed = SendOutcome.RETRYING if attempt < spec.retry.max_attempts else SendOutcome.FAILED
        try:
            # The driver call in the email's trace: ids and counts only, never an address.
            traced = {"mailqueue.email_id": spec.email_id, "mailqueue.attempt": attempt, "mailqueue.driver": driver.name,
                      "mailqueue.recipients": len(recipients)}
            with span("deliver", traced):
                async with asyncio.timeout(None if left is None else left - SAFETY_SECONDS):
                    if signer is not None:
                        assert isinstance(driver, SmtpDriver)  # signers are made for SMTP drivers only
                        delivery = await driver.send(message, sender, recipients, sign=signer)
                    else:
                        delivery = await driver.send(message, sender, recipients)
        except TimeoutError:
            exc = TransientDeliveryError("the send did not finish within the attempt's time limit")
            self._metrics.send(driver.name, if_failed, time.monotonic() - began)
            if attempt < spec.retry.max_attempts:
                await self._audit(self._retrying(req, info, exc.reason), within=clock.left())
            raise ApplicationError(exc.reason, {"attempt": attempt}, type=TRANSIENT_DELIVERY_ERROR) from None
        except PermanentDeliveryError as exc:
            self._metrics.send(driver.name, SendOutcome.FAILED, time.monotonic() - began)
            raise ApplicationError(
                exc.reason, {"attempt": attempt}, type=PERMANENT_DELIVERY_ERROR, non_retryable=True
            ) from None
        except TransientDeliveryError as exc:
            if isinstance(exc, ServerUnreachable) and spec.retry.unreachable_wait_seconds > 0:
                # Nothing was handed over: not an attempt. The workflow waits for the server.
                self._metrics.send(driver.name, SendOutcome.UNREACHABLE, time.monotonic() - began)
                await self._audit(self._retrying(req, info, exc.reason, unreachable=True), within=clock.left())
                raise _ask_again(spec, exc.reason, kind=SERVER_UNREACHABLE, attempts_used=attempt - 1) from None
            self._metrics.send(driver.name, if_failed, time.monotonic() - began)
            if attempt < spec.retry.max_attempts:
                await self._audit(self._retrying(req, info, exc.reason), within=clock.left())
            raise ApplicationError(exc.reason, {"attempt": attempt}, type=TRANSIENT_DELIVERY_ERROR) from None
        result = SendResult(
            provider=driver.name,
            provider_message_id=delivery.provider_message_id,
            attempt=attempt,
            accepted_at=datetime.now(UTC),
            refused_recipients=delivery.refused_recipients,
        )
        self._metrics.send(driver.name, SendOutcome.SENT, time.monotonic() - began)
        self._metrics.handed_over(driver.name, info.workflow_run_id, spec.send_at, result.accepted_at)
        # Recorded here, right after the server accepted, so the record never lags the mail (and
        # a later attempt knows not to send again). If the database is away or slow, the attempt
        # still ends in time, so Temporal hears of the delivery and no other attempt starts; the
        # workflow records it once the database is back.
        result.recorded = await self._audit(
            within=clock.left(),
            entry=AuditEntry(
                email_id=spec.email_id,
                event_id=_event_id(info, EventType.SENT),
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

    async def _driver_for(self, spec: EmailSpec) -> tuple[Driver, DkimSigner | None, bool]:
        """The driver the sender's settings name now: the system's, or the user's own (secrets
        decrypted here only). If that driver's send queue is not the one this send waits in (the
        user changed drivers since the email was queued), nothing is sent: the workflow sends
        again from the right queue, so the new driver's rate limit holds.

        And the DKIM signer when the driver is SMTP (the system relay or the user's own server) and
        the From is in one of the user's verified domains with active keys: read by key here and
        decrypted here, never carried by the workflow. Providers sign on their side."""
        try:
            async with self._sessions() as session:
                route = await resolve_sender(session, self._settings, spec.sender_type, spec.sender_id)
                driver = self._drivers.for_route(route)
                signer = None
                if isinstance(driver, SmtpDriver):  # on the same connection: no second checkout per send
                    signer = await signer_for(session, self._box(), spec.sender_type, spec.sender_id, spec.from_address)
        except SecretKeyError as exc:
            # A configuration fault no retry fixes soon; the message names no secret.
            raise ApplicationError(str(exc), {"attempt": 0}, type=PERMANENT_DELIVERY_ERROR, non_retryable=True) from None
        except STORE_ERRORS as exc:
            raise _store_unavailable(spec, "sender settings", exc) from None
        if route.send_queue != spec.send_queue:
            raise _ask_again(
                spec,
                f"not sent: the sender now sends through {route.driver.value}, whose sends wait in "
                f"{_queue_name(route.send_queue)}, not in {_queue_name(spec.send_queue)}",
                kind=SEND_QUEUE_CHANGED, send_queue=route.send_queue,
            )
        return driver, signer, route.own_driver

    async def _files(self, spec: EmailSpec) -> list[tuple[AttachmentRef, bytes]]:
        """The attachments' bytes from the blob store, each checked against its size and SHA-256."""
        if not spec.attachments:
            return []
        if self._blobs is None:
            self._blobs = blob_store(self._settings)
        try:
            async with self._sessions() as session:
                return [(ref, await read_attachment(session, self._blobs, ref)) for ref in spec.attachments]
        except BlobMissing as exc:  # the same on every attempt: the email fails, saying which file
            raise ApplicationError(str(exc), {"attempt": 0}, type=PERMANENT_DELIVERY_ERROR, non_retryable=True) from None
        except (*STORE_ERRORS, BotoCoreError, ClientError) as exc:
            raise _store_unavailable(spec, "attachment store", exc) from None

    def _paused_by(self, spec: EmailSpec, driver: str | None = None, own: bool = False) -> str | None:
        """Why this sender's email may not go now (the kill switch; with the driver known, that driver
        turned off, or users' own SMTP turned off), or None."""
        if self._flags is None:
            return None
        sender = sender_key(spec.sender_type, spec.sender_id)
        if driver is None:
            return "sending is paused (sending.paused on)" if self._flags.is_on("sending.paused", sender) else None
        if not self._flags.is_on(f"driver.{driver}.enabled", sender):
            return f"the {driver} driver is turned off (driver.{driver}.enabled off)"
        if own and driver == DriverName.SMTP and not self._flags.is_on("user_smtp.enabled", sender):
            return "sending through users' own SMTP servers is turned off (user_smtp.enabled off)"
        return None

    async def _held(self, spec: EmailSpec, why: str) -> SendResult:
        """Nothing is sent while paused: the workflow records `paused` and waits (not an attempt, never
        a failure). Unless the record says the mail already went (an earlier attempt whose completion
        was lost): then that delivery is the answer, so a resume never sends it twice."""
        try:
            async with self._sessions() as session:
                email = await session.get(Email, spec.email_id)
        except STORE_ERRORS as exc:
            raise _store_unavailable(spec, "email record", exc) from None
        if email is not None and EmailStatus(email.status) in WENT_OUT:
            return SendResult(
                provider=email.provider or "", provider_message_id=email.provider_message_id or "", attempt=email.attempts,
                accepted_at=email.sent_at or datetime.now(UTC), recorded=True,
            )
        raise _ask_again(spec, f"not sent: {why}", kind=SENDING_PAUSED)

    def _box(self) -> SecretBox:
        if self._secrets is None:
            self._secrets = SecretBox.from_settings(self._settings)
        return self._secrets

    async def _without_suppressed(self, spec: EmailSpec, info: activity.Info, found: dict[str, str] | None) -> EmailSpec:
        """The spec without the recipients its sender suppressed since the email was accepted (one
        indexed query), and a `suppressed` event if there were any. With none left, the record
        ends `suppressed`; if that cannot be written, nothing is sent and the workflow asks again."""
        if found is None:  # the claim could not look (the database slow or away): once more, on its own
            try:
                async with self._sessions() as session:
                    found = await suppressed_for(session, spec)
            except STORE_ERRORS as exc:
                raise _store_unavailable(spec, "suppression list", exc) from None
        if not found:
            return spec
        kept, dropped = without_suppressed(spec, found)
        none_left = not has_recipients(kept)
        recorded = await self._audit(AuditEntry(
            email_id=spec.email_id,
            event_id=_event_id(info, EventType.SUPPRESSED),
            event=EventType.SUPPRESSED,
            at=datetime.now(UTC),
            status=EmailStatus.SUPPRESSED if none_left else None,
            detail=dropped_detail(dropped) + ("; nothing sent" if none_left else " since the email was accepted"),
            spec=spec,
        ))
        if none_left and not recorded:
            raise _ask_again(spec, "not sent: every recipient is suppressed, and the record could not say so yet")
        return kept

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

    def _retrying(self, req: SendRequest, info: activity.Info, reason: str, *, unreachable: bool = False) -> AuditEntry:
        retry, attempt, now = req.spec.retry, info.attempt, datetime.now(UTC)
        if unreachable:
            detail = (
                f"not sent: {reason}; not counted as an attempt, waiting for the server "
                f"(up to {retry.unreachable_wait_seconds:.0f}s in all)"
            )
            next_at = None  # the workflow asks again, at most a minute later
        else:
            delay = min(
                retry.initial_interval_seconds * retry.backoff_coefficient ** (attempt - 1),
                retry.maximum_interval_seconds,
            )
            detail = f"attempt {attempt} failed, next attempt in about {delay:.0f}s: {reason}"
            next_at = now + timedelta(seconds=delay)
        return AuditEntry(
            email_id=req.spec.email_id,
            event_id=_event_id(info, EventType.RETRYING),
            event=EventType.RETRYING,
            at=now,
            status=EmailStatus.RETRYING,
            attempt=attempt - 1 if unreachable else attempt,
            last_error=reason,
            detail=detail,
            next_attempt_at=next_at,
            spec=req.spec,
        )

    async def _claim(self, entry: AuditEntry) -> tuple[PriorDelivery | None, dict[str, str] | None]:
        """Record `sending`, or learn that the mail already went. Best effort like `_audit`: with
        the database away or slow the send goes ahead (the duplicate guard needs the database)."""
        try:
            async with asyncio.timeout(CLAIM_SECONDS), self._sessions() as session:
                prior = await apply_audit(session, entry, unless_final=True)
                if prior is not None:
                    return prior, None
                # The suppression list, on the same connection: a second checkout per send, with 200
                # sends in flight on a pool of 20, made attempts run out of time before sending.
                spec = entry.spec
                assert spec is not None
                return None, await suppressed_for(session, spec)
        except RecordClosed as exc:  # its run has ended: Temporal drops this attempt's answer; send nothing
            log.warning("%s", exc)
            raise ApplicationError(str(exc), type=EMAIL_CLOSED, non_retryable=True) from None
        except Exception as exc:  # noqa: BLE001 - logged; delivery must not wait for the audit
            log.warning("could not record sending for email %s: %s: %s", entry.email_id, type(exc).__name__, exc)
            return None, None

    async def _audit(self, entry: AuditEntry, within: float | None = None) -> bool:
        """Best effort: a database outage must not stop or repeat a send; the workflow
        records the outcome itself when this returns False. `within`: the attempt's time left."""
        try:
            async with asyncio.timeout(None if within is None else max(within - SAFETY_SECONDS, 0.1)):
                async with self._sessions() as session:
                    await apply_audit(session, entry)
            return True
        except Exception as exc:  # noqa: BLE001 - logged here, and the workflow records the outcome
            log.warning(
                "could not record %s event for email %s: %s: %s",
                entry.event.value, entry.email_id, type(exc).__name__, exc,
            )
            return False
