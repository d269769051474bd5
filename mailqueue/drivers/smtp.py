"""SMTP driver on aiosmtplib, classifying every failure as transient or permanent.

Two kinds of server: the operator's relay (the system's driver), whose replies are quoted in
reasons (scrubbed and cut short: "550 5.1.1 <x@example.com>: user unknown" helps a sender),
and a user's own server, reached only through the egress policy. A user's server may be
anyone's: reasons about it say what happened in our own words with the reply code and the
enhanced status code ("recipient refused (550 5.1.1)"), never the server's text, and a closed
port, a filtered one and a service that is not SMTP read the same. Its raw words go to the
operator's log only, scrubbed.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Any

import aiosmtplib
from aiosmtplib import SMTPResponse
from opentelemetry.trace import SpanKind

from mailqueue.config import Settings, SmtpSecurity
from mailqueue.drivers.base import Delivery, DriverName, remote_text
from mailqueue.egress import Destination, DestinationRefused, IPAddress, NotResolved
from mailqueue.errors import DeliveryError, PermanentDeliveryError, ServerUnreachable, TransientDeliveryError
from mailqueue.tracing import span

log = logging.getLogger("mailqueue.drivers.smtp")

# A queue id is one token; a server's other words stay out of the record.
_QUEUED_AS = re.compile(r"queued as\s+([A-Za-z0-9._:@<>+/=-]{1,100})", re.IGNORECASE)
_ENHANCED = re.compile(r"^([245]\.\d{1,3}\.\d{1,3})(?!\S)")


def _classify(code: int, what: str) -> TransientDeliveryError | PermanentDeliveryError:
    cls = PermanentDeliveryError if 500 <= code < 600 else TransientDeliveryError
    return cls(what, code=code)


def codes(code: int, message: str) -> str:
    """"550 5.1.1": a reply's code and, when the server gave one, its enhanced status code (RFC 3463)."""
    enhanced = _ENHANCED.match(message.strip())
    return f"{code} {enhanced.group(1)}" if enhanced else str(code)


# Takes a serialized message and returns it signed (mailqueue.dkim_keys.DkimSigner).
Signer = Callable[[bytes], bytes]


class _Client(aiosmtplib.SMTP):
    """aiosmtplib.SMTP that remembers whether the connection was found lost at MAIL FROM, the first
    command of a transaction: then nothing of the message had reached the server. And that signs
    the serialized message when a transaction gives it a signer."""

    lost_at_mail_from = False
    sign: Signer | None = None  # for one transaction: signs the bytes that go out (see sendmail)

    async def sendmail(self, sender: str, recipients: Any, message: str | bytes, /, **kwargs: Any) -> tuple[dict[str, SMTPResponse], str]:
        # send_message serializes the message for this server (8BITMIME decides 8bit or 7bit
        # transfer encodings, SMTPUTF8 the header policy) and hands the bytes here: a signature
        # made now covers exactly the bytes that are sent.
        if self.sign is not None:
            message = self.sign(message.encode("ascii") if isinstance(message, str) else message)
        return await super().sendmail(sender, recipients, message, **kwargs)

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
        destination: Destination | None = None,
        plaintext_auth: bool = False,
        server_words: bool = True,
    ) -> None:
        """`destination`: the egress check, asked before every new connection; the connection goes
        to the addresses it returns, TLS still verifies (and names, SNI) `host`. None: connect by
        name, as for the operator's relay. `plaintext_auth`: AUTH may go over a connection
        without TLS. `server_words`: reasons may quote the server's text (the operator's relay)."""
        self.host, self.port, self.security = host, port, security
        self._username, self._password = username, password
        self.timeout, self.validate_certs = timeout, validate_certs
        self.reuse_connections = reuse_connections
        self.max_connections = max_connections
        self.max_messages_per_connection = max_messages_per_connection
        self.idle_timeout = idle_timeout
        self._destination = destination
        self.plaintext_auth = plaintext_auth
        self.server_words = server_words
        if max_connections < 1 or max_messages_per_connection < 1:
            raise ValueError("max_connections and max_messages_per_connection must be at least 1")
        self._idle: list[_Connection] = []  # most recently used last
        self._slots = asyncio.Semaphore(max_connections)  # binds to the running loop on first use
        self.connections_opened = 0  # for tests and the benchmark

    def __repr__(self) -> str:
        return f"SmtpDriver({self.host}:{self.port}, security={self.security.value})"  # never the credentials

    @classmethod
    def from_settings(cls, s: Settings) -> SmtpDriver:
        """The system's relay: the operator's own server, connected to by name, configured as the operator chose."""
        return cls(
            s.smtp_host,
            s.smtp_port,
            security=s.smtp_security,
            username=s.smtp_username,
            password=s.smtp_password.get_secret_value() if s.smtp_password else None,
            timeout=s.smtp_timeout_seconds,
            validate_certs=s.smtp_validate_certs,
            plaintext_auth=True,
        )

    @property
    def server(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def _secrets(self) -> tuple[str, ...]:
        """What a server must never see quoted back anywhere: the credentials and the AUTH payloads that carry them."""
        user, password = self._username or "", self._password or ""
        b64 = lambda v: base64.b64encode(v.encode()).decode()  # noqa: E731
        found = (password, b64(f"\0{user}\0{password}"), b64(password)) if password else ()
        # A short user name would blank out ordinary words; a long one is worth keeping out too.
        return found + ((user, b64(user)) if len(user) >= 4 else ())

    async def send(self, message: EmailMessage, sender: str, recipients: list[str], *, sign: Signer | None = None) -> Delivery:
        """`sign`: DKIM-sign the message as serialized for the server (a signature made on any other
        serialization could break on this one)."""
        async with self._slots:  # at most max_connections talking to this server at once
            # The SMTP conversation in the email's trace (the wait for a slot is not part of it).
            with span("smtp send", {"server.address": self.host, "server.port": self.port}, kind=SpanKind.CLIENT):
                refused, reply = await self._converse(message, sender, recipients, sign)
        match = _QUEUED_AS.search(reply)
        return Delivery(
            provider_message_id=match.group(1) if match else str(message["Message-ID"]),
            refused_recipients={addr: self._reply(r.code, r.message) for addr, r in refused.items()},
        )

    async def _converse(
        self, message: EmailMessage, sender: str, recipients: list[str], sign: Signer | None = None,
    ) -> tuple[dict[str, SMTPResponse], str]:
        """The transaction, on a pooled connection or a new one; every failure classified."""
        try:
            conn = await self._checkout() if self.reuse_connections else None
            if conn is not None:
                try:
                    refused, reply = await self._transaction(conn, message, sender, recipients, sign)
                except ConnectionError:
                    if not conn.client.lost_at_mail_from:
                        raise
                    conn = None  # closed by the server while pooled, seen only at MAIL FROM: once more, fresh
            if conn is None:
                refused, reply = await self._transaction(await self._open(), message, sender, recipients, sign)
        except DeliveryError:
            raise  # classified where it happened (opening the connection)
        except aiosmtplib.SMTPRecipientsRefused as exc:
            worst = max(r.code for r in exc.recipients) if all(r.code >= 500 for r in exc.recipients) else min(r.code for r in exc.recipients)
            if self.server_words:
                detail = "; ".join(f"{r.recipient}: {r.code} {self._words(r.message)}" for r in exc.recipients)
                raise _classify(worst, f"all recipients refused by {self.server}: {detail}") from None
            self._log_words("all recipients refused", *(f"{r.code} {r.message}" for r in exc.recipients))
            detail = "; ".join(f"{r.recipient} ({codes(r.code, r.message)})" for r in exc.recipients)
            raise _classify(worst, f"all recipients refused: {detail}") from None
        except aiosmtplib.SMTPResponseException as exc:
            raise self._refused(exc, sender) from None
        except (TimeoutError, aiosmtplib.SMTPException, OSError) as exc:
            if self.server_words:
                raise TransientDeliveryError(f"cannot talk to {self.server}: {type(exc).__name__}: {self._words(str(exc))}") from None
            self._log_words("connection lost", f"{type(exc).__name__}: {exc}")
            raise TransientDeliveryError(f"the connection to {self.server} was lost ({type(exc).__name__})") from None
        return refused, reply

    # --- what reasons may say ------------------------------------------------------------------

    def _words(self, text: str) -> str:
        return remote_text(text, self._secrets)

    def _reply(self, code: int, message: str) -> str:
        """A reply as a reason may show it: the relay's words, or a user's server's codes."""
        if self.server_words:
            return f"{code} {self._words(message)}"
        self._log_words("refused a recipient", f"{code} {message}")
        return codes(code, message)

    def _log_words(self, what: str, *raw: str) -> None:
        """A user's server's own words, for the operator's log only."""
        log.warning("smtp %s %s; it said: %s", self.server, what, " | ".join(self._words(r) for r in raw))

    def _refused(self, exc: aiosmtplib.SMTPResponseException, sender: str) -> DeliveryError:
        """A reply that refused a command of the session or the transaction."""
        if exc.code < 0:  # aiosmtplib's own code for an answer that is not SMTP (or too long)
            if self.server_words:
                return TransientDeliveryError(f"{self.server} answered {exc.code} {self._words(exc.message)}", code=exc.code)
            self._log_words("answered something that is not SMTP", exc.message)
            return TransientDeliveryError(f"the answer of {self.server} could not be read as SMTP")
        if self.server_words:
            return _classify(exc.code, f"{self.server} answered {exc.code} {self._words(exc.message)}")
        self._log_words(f"answered {exc.code}", exc.message)
        what = codes(exc.code, exc.message)
        if isinstance(exc, aiosmtplib.SMTPSenderRefused):
            return _classify(exc.code, f"sender {sender} refused ({what})")
        if isinstance(exc, aiosmtplib.SMTPDataError):
            return _classify(exc.code, f"message refused ({what})")
        return _classify(exc.code, f"{self.server} refused a command ({what})")

    def _unreachable(self, exc: BaseException) -> ServerUnreachable:
        """Nothing answered as an SMTP server would: refused, timed out, hung up, or not SMTP.
        For a user's server these read the same, so that the settings cannot scan ports."""
        code = getattr(exc, "code", None)
        if self.server_words:
            detail = self._words(f"{type(exc).__name__}: {exc}")
            return ServerUnreachable(f"{self.server} could not be reached: {detail}", code=code if isinstance(code, int) else None)
        self._log_words("could not be reached", f"{type(exc).__name__}: {exc}")
        return ServerUnreachable(f"could not reach an SMTP server at {self.server}")

    # --- opening a connection ------------------------------------------------------------------

    async def _connect(self, addresses: list[IPAddress]) -> socket.socket:
        """A TCP connection to the first of the checked addresses that accepts one."""
        loop = asyncio.get_running_loop()
        failure: BaseException = OSError("no address to connect to")
        for ip in addresses:
            sock = socket.socket(socket.AF_INET6 if ip.version == 6 else socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                await asyncio.wait_for(loop.sock_connect(sock, (str(ip), self.port)), self.timeout)
                return sock
            except (OSError, TimeoutError) as exc:
                sock.close()
                failure = exc  # the next address, if the name has another
            except BaseException:
                sock.close()
                raise
        raise failure

    async def _checked_socket(self) -> socket.socket | None:
        """For a user's server: the egress check, then a connection to an address it allowed."""
        if self._destination is None:
            return None
        try:
            addresses = await self._destination(self.host, self.port)
        except NotResolved as exc:
            raise ServerUnreachable(f"{self.host} {exc.reason}") from None
        except DestinationRefused as exc:
            # The policy's word is final: no retry can make a forbidden destination allowed.
            refused = exc.reason if exc.part == "port" else f"{self.host} {exc.reason}"
            raise PermanentDeliveryError(f"destination refused: {refused}") from None
        try:
            return await self._connect(addresses)
        except (OSError, TimeoutError) as exc:
            raise self._unreachable(exc) from None

    async def _open(self) -> _Connection:
        if self._username and (refusal := self._auth_refusal(encrypted=self.security is not SmtpSecurity.NONE)):
            raise refusal  # known before connecting: the server is not even greeted
        sock = await self._checked_socket()
        tls_name = self.host.strip("[]").removesuffix(".")
        try:
            client = _Client(
                # With a checked socket, the host name is what TLS verifies and names (SNI); the
                # connection itself is already made, to the address the policy allowed.
                hostname=tls_name if sock is not None else self.host,
                port=None if sock is not None else self.port,
                sock=sock,
                use_tls=self.security is SmtpSecurity.TLS,
                start_tls=False,  # below, so that a refusal there is told apart from one at the greeting
                validate_certs=self.validate_certs,
                timeout=self.timeout,
            )
        except BaseException:
            if sock is not None:
                sock.close()
            raise
        # From here the socket is the event loop's (its transport closes it): closing it here too
        # could close a descriptor number a new connection already reuses.
        try:
            await self._greet(client)
            self.connections_opened += 1
            if self.security is SmtpSecurity.STARTTLS:
                await self._starttls(client)
            if self._username:
                await self._login(client)
        except BaseException:
            client.close()  # a refused login is never pooled
            raise
        return _Connection(client)

    async def _greet(self, client: _Client) -> None:
        try:
            await client.connect()
        except aiosmtplib.SMTPConnectResponseError as exc:
            # An SMTP server that turned the session away. 5xx: its final word; else (421) busy or
            # going down: nothing of the message was handed over.
            if exc.code >= 500:
                if self.server_words:
                    raise
                self._log_words(f"refused the session with {exc.code}", exc.message)
                raise PermanentDeliveryError(f"{self.server} refused the session ({codes(exc.code, exc.message)})", code=exc.code) from None
            if self.server_words:
                raise ServerUnreachable(f"{self.server} could not be reached: {type(exc).__name__}: {self._words(str(exc))}", code=exc.code) from None
            self._log_words(f"turned the session away with {exc.code}", exc.message)
            raise ServerUnreachable(f"{self.server} turned the session away ({codes(exc.code, exc.message)})", code=exc.code) from None
        except aiosmtplib.SMTPConnectError as exc:
            # Refused, timed out, hung up before a greeting, or a TLS handshake that failed.
            if isinstance(exc.__cause__, ssl.SSLCertVerificationError) or (self.server_words and isinstance(exc.__cause__, ssl.SSLError)):
                raise self._tls_failed(exc) from None  # reached, but its certificate is not trusted: not an outage
            raise self._unreachable(exc) from None
        except aiosmtplib.SMTPResponseException as exc:
            if exc.code < 0 and not self.server_words:
                raise self._unreachable(exc) from None  # a greeting that is not SMTP: as if nothing answered
            raise

    def _tls_failed(self, exc: BaseException) -> DeliveryError:
        if self.server_words:
            return TransientDeliveryError(f"cannot talk to {self.server}: {type(exc).__name__}: {self._words(str(exc))}")
        self._log_words("failed the TLS handshake", f"{type(exc).__name__}: {exc} ({exc.__cause__})")
        return TransientDeliveryError(f"the TLS certificate of {self.server} was not accepted")

    async def _starttls(self, client: _Client) -> None:
        try:
            await client.starttls()
        except aiosmtplib.SMTPResponseException:
            raise  # a refused STARTTLS: classified by its code in send()
        except aiosmtplib.SMTPException as exc:
            if not client.supports_extension("starttls") and client.is_connected:
                # Nothing was sent: AUTH and the message wait for the TLS the settings ask for. A
                # user's server that does not offer it (or a path that strips the offer) will not
                # on a retry; the operator's relay is waited for, as for any fault they can mend.
                cls = TransientDeliveryError if self.server_words else PermanentDeliveryError
                raise cls(f"{self.server} does not offer STARTTLS (security is starttls); nothing was sent") from None
            if isinstance(exc.__cause__, ssl.SSLCertVerificationError):
                raise self._tls_failed(exc) from None
            raise
        except ssl.SSLCertVerificationError as exc:
            raise self._tls_failed(exc) from None

    def _auth_refusal(self, *, encrypted: bool) -> PermanentDeliveryError | None:
        """Why AUTH may not be sent (on a connection that is, or will be, `encrypted`), or None."""
        if not encrypted and not self.plaintext_auth:
            # The password would cross the network readable by anyone on the path: never sent.
            return PermanentDeliveryError(
                f"AUTH refused: the connection to {self.server} is not encrypted; use security starttls or tls "
                "(plain-text AUTH only to the hosts in MAILQUEUE_SMTP_PLAINTEXT_AUTH_HOSTS)"
            )
        if not self._password:
            if self._destination is None:  # the operator's relay
                return PermanentDeliveryError("MAILQUEUE_SMTP_USERNAME is set but MAILQUEUE_SMTP_PASSWORD is not")
            return PermanentDeliveryError(
                "smtp_username is set but no password is stored (a change of host, port, username or security "
                "clears it): PUT /v1/settings/mail with smtp_password"
            )
        return None

    async def _login(self, client: _Client) -> None:
        if refusal := self._auth_refusal(encrypted=client.get_transport_info("sslcontext") is not None):
            raise refusal
        try:
            await client.login(self._username or "", self._password)
        except aiosmtplib.SMTPAuthenticationError as exc:
            if self.server_words:
                # The server's words only: never the username or password.
                raise PermanentDeliveryError(
                    f"SMTP authentication refused by {self.server}: {exc.code} {self._words(exc.message)}", code=exc.code
                ) from None
            self._log_words(f"refused the login with {exc.code}", exc.message)
            raise PermanentDeliveryError(f"authentication failed ({codes(exc.code, exc.message)})", code=exc.code) from None
        except aiosmtplib.SMTPException as exc:
            if isinstance(exc, aiosmtplib.SMTPResponseException | ConnectionError | TimeoutError):
                raise  # a reply to another command, or the connection: send() classifies it
            # No AUTH offered, or no mechanism in common: a setting to change, not an outage.
            raise PermanentDeliveryError(f"{self.server} offers no authentication this client can use") from None

    async def _transaction(
        self, conn: _Connection, message: EmailMessage, sender: str, recipients: list[str], sign: Signer | None = None,
    ) -> tuple[dict[str, SMTPResponse], str]:
        """One full transaction (MAIL, RCPT, DATA) on conn, which goes back to the pool only if it succeeded."""
        conn.client.sign = sign
        try:
            result = await conn.client.send_message(message, sender=sender, recipients=recipients)
        except BaseException:
            # After any error (or cancellation) the connection's state is unknown: drop it at once,
            # without a QUIT that could wait on a server mid-DATA.
            conn.client.close()
            raise
        finally:
            conn.client.sign = None
        conn.messages += 1
        await self._checkin(conn)
        return result

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
