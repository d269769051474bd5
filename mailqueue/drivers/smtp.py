"""SMTP driver on aiosmtplib, classifying every failure as transient or permanent."""

from __future__ import annotations

import asyncio
import re
import ssl
import time
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Any

import aiosmtplib
from aiosmtplib import SMTPResponse

from mailqueue.config import Settings, SmtpSecurity
from mailqueue.drivers.base import Delivery, DriverName
from mailqueue.errors import PermanentDeliveryError, ServerUnreachable, TransientDeliveryError

_QUEUED_AS = re.compile(r"queued as\s+(\S+)", re.IGNORECASE)


def _classify(code: int, what: str) -> TransientDeliveryError | PermanentDeliveryError:
    cls = PermanentDeliveryError if 500 <= code < 600 else TransientDeliveryError
    return cls(what, code=code)


class _Client(aiosmtplib.SMTP):
    """aiosmtplib.SMTP that remembers whether the connection was found lost at MAIL FROM, the first
    command of a transaction: then nothing of the message had reached the server."""

    lost_at_mail_from = False

    async def mail(self, *args: Any, **kwargs: Any) -> SMTPResponse:
        try:
            return await super().mail(*args, **kwargs)
        except ConnectionError:  # SMTPServerDisconnected is one; a 4xx/5xx reply is not
            self.lost_at_mail_from = True
            raise


@dataclass
class _Connection:
    client: _Client
    messages: int = 0
    idle_since: float = field(default_factory=time.monotonic)


class SmtpDriver:
    """SMTP with connection reuse: open, already-authenticated connections are kept per driver
    instance (one instance per server and credentials) and reused for the next messages, which
    saves the TCP, TLS and AUTH round trips of every message after the first.

    Nothing is sent twice because of reuse. A pooled connection the server has closed is
    dropped before use: the event loop has usually seen the close already (`is_connected`),
    and one idle for a second or more must also answer NOOP. If the server's close is only
    noticed at MAIL FROM, the first command of the transaction, the send is tried once more on
    a fresh connection: nothing of the message had reached the server. Any other failure, above
    all one during or after DATA, is never retried here: it is reported as before (transient
    or permanent) and Temporal's retry policy decides, exactly as without reuse.
    """

    name = DriverName.SMTP
    PROBE_AFTER_IDLE_SECONDS = 1.0

    def __init__(
        self,
        host: str,
        port: int,
        *,
        security: SmtpSecurity = SmtpSecurity.NONE,
        username: str | None = None,
        password: str | None = None,
        timeout: float = 30.0,
        validate_certs: bool = True,
        reuse_connections: bool = True,
        max_connections: int = 10,
        max_messages_per_connection: int = 100,
        idle_timeout: float = 30.0,
    ) -> None:
        self.host, self.port, self.security = host, port, security
        self._username, self._password = username, password
        self.timeout, self.validate_certs = timeout, validate_certs
        self.reuse_connections = reuse_connections
        self.max_connections = max_connections
        self.max_messages_per_connection = max_messages_per_connection
        self.idle_timeout = idle_timeout
        if max_connections < 1 or max_messages_per_connection < 1:
            raise ValueError("max_connections and max_messages_per_connection must be at least 1")
        self._idle: list[_Connection] = []  # most recently used last
        self._slots = asyncio.Semaphore(max_connections)  # binds to the running loop on first use
        self.connections_opened = 0  # for tests and the benchmark

    def __repr__(self) -> str:
        return f"SmtpDriver({self.host}:{self.port}, security={self.security.value})"  # never the credentials

    @classmethod
    def from_settings(cls, s: Settings) -> SmtpDriver:
        return cls(
            s.smtp_host,
            s.smtp_port,
            security=s.smtp_security,
            username=s.smtp_username,
            password=s.smtp_password.get_secret_value() if s.smtp_password else None,
            timeout=s.smtp_timeout_seconds,
            validate_certs=s.smtp_validate_certs,
        )

    async def send(self, message: EmailMessage, sender: str, recipients: list[str]) -> Delivery:
        server = f"{self.host}:{self.port}"
        async with self._slots:  # at most max_connections talking to this server at once
            try:
                conn = await self._checkout() if self.reuse_connections else None
                if conn is not None:
                    try:
                        refused, reply = await self._transaction(conn, message, sender, recipients)
                    except ConnectionError:
                        if not conn.client.lost_at_mail_from:
                            raise
                        conn = None  # closed by the server while pooled, seen only at MAIL FROM: once more, fresh
                if conn is None:
                    refused, reply = await self._transaction(await self._open(), message, sender, recipients)
            except aiosmtplib.SMTPAuthenticationError as exc:
                # The server's words only: never the username or password.
                raise PermanentDeliveryError(
                    f"SMTP authentication refused by {server}: {exc.code} {exc.message}", code=exc.code
                ) from None
            except aiosmtplib.SMTPRecipientsRefused as exc:
                codes = [r.code for r in exc.recipients]
                detail = "; ".join(f"{r.recipient}: {r.code} {r.message}" for r in exc.recipients)
                worst = max(codes) if all(c >= 500 for c in codes) else min(codes)
                raise _classify(worst, f"all recipients refused by {server}: {detail}") from None
            except aiosmtplib.SMTPResponseException as exc:
                raise _classify(exc.code, f"{server} answered {exc.code} {exc.message}") from None
            except (TimeoutError, aiosmtplib.SMTPException, OSError) as exc:
                raise TransientDeliveryError(f"cannot talk to {server}: {type(exc).__name__}: {exc}") from None
        match = _QUEUED_AS.search(reply)
        return Delivery(
            provider_message_id=match.group(1) if match else str(message["Message-ID"]),
            refused_recipients={addr: f"{r.code} {r.message}" for addr, r in refused.items()},
        )

    async def _transaction(
        self, conn: _Connection, message: EmailMessage, sender: str, recipients: list[str]
    ) -> tuple[dict[str, SMTPResponse], str]:
        """One full transaction (MAIL, RCPT, DATA) on conn, which goes back to the pool only if it succeeded."""
        try:
            result = await conn.client.send_message(message, sender=sender, recipients=recipients)
        except BaseException:
            # After any error (or cancellation) the connection's state is unknown: drop it at once,
            # without a QUIT that could wait on a server mid-DATA.
            conn.client.close()
            raise
        conn.messages += 1
        await self._checkin(conn)
        return result

    async def _open(self) -> _Connection:
        client = _Client(
            hostname=self.host,
            port=self.port,
            use_tls=self.security is SmtpSecurity.TLS,
            start_tls=self.security is SmtpSecurity.STARTTLS,
            validate_certs=self.validate_certs,
            timeout=self.timeout,
        )
        try:
            await client.connect()
        except aiosmtplib.SMTPConnectError as exc:
            # Refused, timed out or unresolved (aiosmtplib wraps the OSError), or a greeting other
            # than 220. A 5xx greeting is the server's final word (permanent, handled by send); the
            # rest mean the server is away or busy: nothing of the message was handed over.
            code = getattr(exc, "code", None)
            if (isinstance(code, int) and code >= 500) or isinstance(exc.__cause__, ssl.SSLError):
                raise  # reached, but refused for good, or its certificate is not trusted: not an outage
            raise ServerUnreachable(f"{self.host}:{self.port} could not be reached: {type(exc).__name__}: {exc}", code=code) from None
        self.connections_opened += 1
        try:
            if self._username:
                await client.login(self._username, self._password or "")
        except BaseException:
            client.close()  # a refused login is never pooled
            raise
        return _Connection(client)

    async def _checkout(self) -> _Connection | None:
        """The most recently used pooled connection that is still usable, or None."""
        while self._idle:
            conn = self._idle.pop()
            idle = time.monotonic() - conn.idle_since
            if not conn.client.is_connected:  # the server closed it and the event loop saw it
                conn.client.close()
                continue
            if idle > self.idle_timeout:  # the server may drop it any moment: retire it politely
                await self._close(conn)
                continue
            if idle >= self.PROBE_AFTER_IDLE_SECONDS:
                try:
                    await conn.client.noop(timeout=min(self.timeout, 5))
                except (TimeoutError, aiosmtplib.SMTPException, OSError):
                    conn.client.close()  # dead: nothing of the message was sent on it
                    continue
            return conn
        return None

    async def _checkin(self, conn: _Connection) -> None:
        if not self.reuse_connections or conn.messages >= self.max_messages_per_connection or not conn.client.is_connected:
            await self._close(conn)
            return
        conn.idle_since = time.monotonic()
        self._idle.append(conn)

    async def _close(self, conn: _Connection) -> None:
        """QUIT a connection in a clean state (between transactions); close it if the server does not answer."""
        client = conn.client
        if client.is_connected:
            try:
                await asyncio.wait_for(client.quit(), timeout=min(self.timeout, 5))
            except (TimeoutError, aiosmtplib.SMTPException, OSError):
                client.close()

    async def aclose(self) -> None:
        """Close every pooled connection (QUIT): on worker shutdown."""
        idle, self._idle = self._idle, []
        for conn in idle:
            await self._close(conn)
