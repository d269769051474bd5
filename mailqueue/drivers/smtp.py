"""SMTP driver on aiosmtplib, classifying every failure as transient or permanent."""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass, field
from email.message import EmailMessage

import aiosmtplib

from mailqueue.config import Settings, SmtpSecurity
from mailqueue.drivers import Delivery
from mailqueue.errors import PermanentDeliveryError, TransientDeliveryError

_QUEUED_AS = re.compile(r"queued as\s+(\S+)", re.IGNORECASE)


def _classify(code: int, what: str) -> TransientDeliveryError | PermanentDeliveryError:
    cls = PermanentDeliveryError if 500 <= code < 600 else TransientDeliveryError
    return cls(what, code=code)


@dataclass
class _Connection:
    client: aiosmtplib.SMTP
    messages: int = 0
    idle_since: float = field(default_factory=time.monotonic)


class SmtpDriver:
    """SMTP with connection reuse: open, already-authenticated connections are kept per driver
    instance (one instance per server and credentials) and reused for the next messages, which
    saves the TCP, TLS and AUTH round trips of every message after the first.

    Nothing is sent twice because of reuse: a connection idle for a second or more is probed
    with NOOP before use, and one that fails the probe (the server closed it) is dropped before
    any command of the message was sent; the message then goes over a new connection. A failure
    during the transaction itself is never retried here: it is reported as before (transient
    or permanent) and Temporal's retry policy decides, exactly as without reuse.
    """

    name = "smtp"
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
        self._idle: list[_Connection] = []
        self._slots: asyncio.Semaphore | None = None
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
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_connections)
        server = f"{self.host}:{self.port}"
        async with self._slots:  # at most max_connections talking to this server at once
            conn = await self._checkout() if self.reuse_connections else None
            done = False
            try:
                if conn is None:
                    conn = await self._open()
                refused, reply = await conn.client.send_message(message, sender=sender, recipients=recipients)
                done = True
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
            finally:
                if not done and conn is not None:
                    await self._close(conn)  # after any error the connection's state is unknown: never reuse it
            conn.messages += 1
            await self._checkin(conn)
        match = _QUEUED_AS.search(reply)
        return Delivery(
            provider_message_id=match.group(1) if match else str(message["Message-ID"]),
            refused_recipients={addr: f"{r.code} {r.message}" for addr, r in refused.items()},
        )

    async def _open(self) -> _Connection:
        client = aiosmtplib.SMTP(
            hostname=self.host,
            port=self.port,
            use_tls=self.security is SmtpSecurity.TLS,
            start_tls=self.security is SmtpSecurity.STARTTLS,
            validate_certs=self.validate_certs,
            timeout=self.timeout,
        )
        await client.connect()
        self.connections_opened += 1
        conn = _Connection(client)
        try:
            if self._username:
                await client.login(self._username, self._password or "")
        except BaseException:
            await self._close(conn)
            raise
        return conn

    async def _checkout(self) -> _Connection | None:
        """The most recently used open connection that still answers, or None."""
        while self._idle:
            conn = self._idle.pop()
            idle = time.monotonic() - conn.idle_since
            if not conn.client.is_connected or idle > self.idle_timeout:
                await self._close(conn)
                continue
            if idle >= self.PROBE_AFTER_IDLE_SECONDS:
                try:
                    await conn.client.noop()
                except (TimeoutError, aiosmtplib.SMTPException, OSError):
                    await self._close(conn)  # closed by the server while idle: nothing of the message was sent
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
