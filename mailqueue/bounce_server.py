"""The inbound SMTP listener of the bounce domain: bounces (RFC 3464 reports, and best effort for
other bounce mail) to bounce+<email id>@ and unsubscribe mail to unsubscribe+<email id>@, recorded
through mailqueue.feedback like any provider's event. It needs the database only (not Temporal).

    mailqueue bounces    (MAILQUEUE_BOUNCE_DOMAIN, MAILQUEUE_BOUNCE_HOST, MAILQUEUE_BOUNCE_PORT)

What it accepts, and why:
- RCPT only to bounce+/unsubscribe+<id>@<bounce domain> of an email that exists (an unsubscribe
  address only for an email that offered one); anything else 550 during the session. Refusing in
  the session sends nothing back to anyone (no backscatter): a real bounce has the null sender,
  and the reporting server keeps the decision. The database away: 451, the server tries again later.
- DATA up to MAILQUEUE_BOUNCE_MAX_BYTES (552 above). Whatever the bytes, it answers: unreadable
  mail is read as text, and a failure to record is a 451 (recording is idempotent, so the
  server's retry is harmless).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Iterable
from typing import Any

from aiosmtpd.smtp import SMTP
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from mailqueue import bounces
from mailqueue.bounces import Action, Addressed, RecipientStatus, Report
from mailqueue.config import Settings
from mailqueue.db import STORE_ERRORS, create_engine, sessionmaker
from mailqueue.feedback import Feedback, FeedbackKind, find_email, record_feedback
from mailqueue.message import bare_address
from mailqueue.models import Email
from mailqueue.suppressions import match_key

log = logging.getLogger("mailqueue.bounce_server")

MAX_RECIPIENTS = 20  # per transaction: a bounce names one address; a few if a server batches them
_DELIVERED = (Action.DELIVERED, Action.EXPANDED)  # the receiving side says the mail reached the mailbox


def _recipients(email: Email) -> dict[str, str]:
    """{match key, lower-cased: the bare address as sent} of every recipient of the email (to, cc,
    bcc). Lower-cased: a remote server may write the local part in another case than we did."""
    keys: dict[str, str] = {}
    for address in (*email.to, *email.cc, *email.bcc):
        try:
            keys.setdefault(match_key(address).lower(), bare_address(address) or address)
        except ValueError:
            continue
    return keys


def _ours(candidates: Iterable[str | None], recipients: dict[str, str]) -> str | None:
    """The first candidate that is one of the email's recipients (the address as the email has it)."""
    for candidate in candidates:
        if not candidate:
            continue
        try:
            key = match_key(candidate).lower()
        except ValueError:
            continue
        if key in recipients:
            return recipients[key]
    return None


def attribute(status: RecipientStatus, report: Report, recipients: dict[str, str]) -> str | None:
    """The email's recipient a bounce is about: the one the report (or, for a non-report, its text)
    names; else, for an email to one recipient, that one (a forward's failure is its recipient's);
    else None (an event about the email, suppressing nobody). A report that names an address the
    email was not sent to can never suppress that address: a recipient could forge one."""
    named = [status.recipient, status.final_recipient] if report.dsn else report.mentioned
    found = _ours(named, recipients)
    if found is None and len(recipients) == 1:
        return next(iter(recipients.values()))
    return found


def feedback_of(email_id: str, status: RecipientStatus, report: Report, recipient: str | None) -> Feedback | None:
    """The feedback one recipient's status stands for (None: nothing to record)."""
    if status.action is Action.RELAYED:
        return None  # passed on to a system that reports nothing more: not a delivery, not a failure
    named = status.recipient or status.final_recipient or ""
    how = status.action.value if report.dsn else "(not a delivery status report; read from its text)"
    words = f"{status.status} {how}" + (f": {status.diagnostic}" if status.diagnostic else "")
    if status.action in _DELIVERED:
        return Feedback(kind=FeedbackKind.DELIVERED, source=bounces.SOURCE_DSN, event_key=f"{report.key} {named}",
                        recipient=recipient, email_id=email_id, diagnostic=words)
    # failed, or delayed (a report that the server keeps trying: a soft bounce, whatever its code)
    hard = status.action is Action.FAILED and status.hard
    return Feedback(kind=FeedbackKind.BOUNCED, source=bounces.SOURCE_DSN, event_key=f"{report.key} {named}",
                    recipient=recipient, email_id=email_id, hard=hard, diagnostic=words)


class BounceHandler:
    """aiosmtpd's handler: the RCPT and DATA decisions (see the module's docstring)."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession], domain: str) -> None:
        self._sessions = sessions
        self.domain = domain

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str, options: list[str]) -> str:  # noqa: N802
        target = bounces.addressed(address, self.domain)
        if target is None:
            return "550 5.1.1 not a bounce or unsubscribe address of this server"
        if len(envelope.rcpt_tos) >= MAX_RECIPIENTS:
            return "452 4.5.3 too many recipients"
        try:
            async with self._sessions() as db:
                email = await find_email(db, email_id=target.email_id)
        except STORE_ERRORS as exc:
            log.warning("RCPT for email %s: the database is unavailable (%s); answered 451", target.email_id, type(exc).__name__)
            return "451 4.3.0 try again later"
        if email is None:
            log.info("RCPT refused: no email %s (a %s address)", target.email_id, target.kind)
            return "550 5.1.1 no such email here"
        if target.kind == bounces.UNSUBSCRIBE and not any(h.lower() == "list-unsubscribe" for h in email.headers):
            log.info("RCPT refused: email %s offered no unsubscribe", target.email_id)
            return "550 5.1.1 no such unsubscribe address here"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        data = bytes(envelope.original_content or envelope.content or b"")
        targets = [t for t in (bounces.addressed(r, self.domain) for r in envelope.rcpt_tos) if t is not None]
        report = bounces.parse(data) if any(t.kind == bounces.BOUNCE for t in targets) else None
        try:
            for target in targets:
                if target.kind == bounces.BOUNCE:
                    assert report is not None
                    await self.bounce(target, report)
                else:
                    await self.unsubscribe(target, data)
        except STORE_ERRORS as exc:
            log.warning("a message for %s could not be recorded: the database is unavailable (%s); answered 451",
                        ", ".join(t.email_id for t in targets), type(exc).__name__)
            return "451 4.3.0 try again later"
        return "250 2.0.0 OK"

    async def bounce(self, target: Addressed, report: Report) -> None:
        async with self._sessions() as db:
            email = await find_email(db, email_id=target.email_id)
            if email is None:  # removed since RCPT (the retention purge): a bounce must not bounce
                log.info("bounce for email %s dropped: no such email any more", target.email_id)
                return
            if report.auto_reply:
                log.info("email %s: an automatic reply (out of office or the like) came back; not a bounce, ignored", target.email_id)
                return
            recipients = _recipients(email)
            for status in report.recipients:
                recipient = attribute(status, report, recipients)
                feedback = feedback_of(target.email_id, status, report, recipient)
                if feedback is None:
                    log.info("email %s: a report says %s for a recipient; nothing to record", target.email_id, status.action.value)
                    continue
                recorded = await record_feedback(db, feedback, email=email)
                what = "delivered" if feedback.kind is FeedbackKind.DELIVERED else f"{'hard' if feedback.hard else 'soft'} bounce"
                log.info(
                    "email %s: %s %s (%s)%s", target.email_id, what, status.status,
                    "a delivery status report" if report.dsn else "read from a bounce's text",
                    "" if recorded is None else " already recorded" if recorded.duplicate else
                    " recorded, address suppressed" if recorded.suppressed else " recorded",
                )

    async def unsubscribe(self, target: Addressed, data: bytes) -> None:
        """A mail to the unsubscribe address: from one of the email's recipients (its From header),
        that recipient is unsubscribed from the email's sender; from anyone else, ignored."""
        author = bounces.sender_of(data)
        async with self._sessions() as db:
            email = await find_email(db, email_id=target.email_id)
            if email is None:
                log.info("unsubscribe mail for email %s dropped: no such email any more", target.email_id)
                return
            recipient = _ours([author], _recipients(email))
            if recipient is None:
                log.info("unsubscribe mail for email %s ignored: its From is not a recipient of that email", target.email_id)
                return
            key = match_key(recipient).lower()
            recorded = await record_feedback(db, Feedback(
                kind=FeedbackKind.UNSUBSCRIBED, source=bounces.SOURCE_UNSUBSCRIBE_MAIL, event_key=f"unsubscribe {key}",
                recipient=recipient, email_id=target.email_id,
            ), email=email)
            log.info("email %s: its recipient unsubscribed by mail%s", target.email_id,
                     " (again)" if recorded is not None and recorded.duplicate else "")


class BounceListener:
    """The listener on its host and port, in the running event loop (with its own database engine)."""

    def __init__(self, settings: Settings, *, host: str | None = None, port: int | None = None) -> None:
        if not settings.bounce_domain:
            raise ValueError("MAILQUEUE_BOUNCE_DOMAIN is not set: the listener accepts mail for that domain only")
        self.settings = settings
        self.domain = settings.bounce_domain
        self.host = host or settings.bounce_host
        self.port = settings.bounce_port if port is None else port
        self._engine: AsyncEngine | None = None
        self._server: asyncio.AbstractServer | None = None

    async def __aenter__(self) -> BounceListener:
        self._engine = create_engine(self.settings.database_url, pool_size=5)
        handler = BounceHandler(sessionmaker(self._engine), self.domain)
        limit = self.settings.bounce_max_bytes

        def protocol() -> SMTP:
            return SMTP(handler, data_size_limit=limit, enable_SMTPUTF8=True, hostname=self.domain, ident="mailqueue bounces",
                        timeout=60)

        try:
            self._server = await asyncio.get_running_loop().create_server(protocol, self.host, self.port)
        except BaseException:
            await self._engine.dispose()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        if self._engine is not None:
            await self._engine.dispose()


async def serve(settings: Settings) -> None:
    """Run the listener until SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with BounceListener(settings) as listener:
        log.info("listening on %s:%s for bounce+<email id>@%s and unsubscribe+<email id>@%s",
                 listener.host, listener.port, listener.domain, listener.domain)
        print(f"mailqueue bounces: listening on {listener.host}:{listener.port} for mail to {listener.domain}", flush=True)
        await stop.wait()
