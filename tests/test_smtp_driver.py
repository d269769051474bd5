"""The SMTP driver against real aiosmtpd servers: security modes, auth, and error classes."""

from __future__ import annotations

import asyncio
import base64
import logging
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from typing import Any

import pytest
import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from devstack.net import free_port
from mailqueue.config import SmtpSecurity
from mailqueue.drivers.smtp import SmtpDriver
from mailqueue.egress import DestinationRefused, NotResolved
from mailqueue.errors import PermanentDeliveryError, ServerUnreachable, TransientDeliveryError
from tests.helpers import Checked, ScriptedHandler, eventually, tls_issued_by, trusted_ca

PASSWORD = "s3cret-Passw0rd!"


def _auth(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
    def text(value: str | bytes) -> str:
        return value.decode() if isinstance(value, bytes) else value

    ok = isinstance(data, LoginPassword) and text(data.login) == "mailer" and text(data.password) == PASSWORD
    return AuthResult(success=ok, handled=False)  # handled=False: the server answers 235/535 itself


@pytest.fixture(scope="module")
def server_tls() -> ssl.SSLContext:
    ca = trustme.CA()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(ctx)
    return ctx


def _serve(**kw: Any) -> tuple[Controller, ScriptedHandler, int]:
    handler = ScriptedHandler()
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port, **kw)
    controller.start()
    return controller, handler, port


@pytest.fixture
def starttls_server(server_tls: ssl.SSLContext) -> Iterator[tuple[ScriptedHandler, int]]:
    controller, handler, port = _serve(
        tls_context=server_tls, require_starttls=True, authenticator=_auth, auth_require_tls=True,
        # aiosmtpd's LOGIN does not take the initial response aiosmtplib sends; PLAIN is what relays offer.
        auth_exclude_mechanism=["LOGIN"],
    )
    yield handler, port
    controller.stop()


def message() -> EmailMessage:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"], msg["Message-ID"] = "a@example.com", "b@example.com", "t", "<x@example.com>"
    msg.set_content("hello")
    return msg


async def test_starttls_with_auth_delivers(starttls_server: tuple[ScriptedHandler, int]) -> None:
    handler, port = starttls_server
    driver = SmtpDriver("127.0.0.1", port, security=SmtpSecurity.STARTTLS, username="mailer", password=PASSWORD,
                        validate_certs=False, timeout=5)
    delivery = await driver.send(message(), "a@example.com", ["b@example.com"])
    await driver.aclose()
    assert len(handler.messages) == 1 and delivery.provider_message_id.startswith("C")


async def test_wrong_password_is_permanent_and_never_echoes_the_secret(starttls_server: tuple[ScriptedHandler, int]) -> None:
    handler, port = starttls_server
    wrong = "not-the-" + PASSWORD
    driver = SmtpDriver("127.0.0.1", port, security=SmtpSecurity.STARTTLS, username="mailer", password=wrong,
                        validate_certs=False, timeout=5)
    with pytest.raises(PermanentDeliveryError) as exc:
        await driver.send(message(), "a@example.com", ["b@example.com"])
    assert "authentication refused" in exc.value.reason and exc.value.code == 535
    assert wrong not in str(exc.value) and "mailer" not in str(exc.value)
    assert handler.messages == []


async def test_plain_connection_to_a_starttls_only_server_is_refused_permanently(starttls_server: tuple[ScriptedHandler, int]) -> None:
    _, port = starttls_server
    driver = SmtpDriver("127.0.0.1", port, security=SmtpSecurity.NONE, timeout=5)
    with pytest.raises(PermanentDeliveryError, match="530"):
        await driver.send(message(), "a@example.com", ["b@example.com"])


async def test_implicit_tls_delivers(server_tls: ssl.SSLContext) -> None:
    controller, handler, port = _serve(ssl_context=server_tls)
    try:
        driver = SmtpDriver("127.0.0.1", port, security=SmtpSecurity.TLS, validate_certs=False, timeout=5)
        await driver.send(message(), "a@example.com", ["b@example.com"])
        await driver.aclose()
        assert len(handler.messages) == 1
    finally:
        controller.stop()


async def test_untrusted_certificate_is_refused_when_validating(server_tls: ssl.SSLContext) -> None:
    controller, handler, port = _serve(ssl_context=server_tls)
    try:
        driver = SmtpDriver("127.0.0.1", port, security=SmtpSecurity.TLS, validate_certs=True, timeout=5)
        with pytest.raises(TransientDeliveryError, match="cannot talk to"):
            await driver.send(message(), "a@example.com", ["b@example.com"])
        assert handler.messages == []
    finally:
        controller.stop()


@pytest.mark.parametrize(
    ("reply", "error"),
    [("451 4.3.0 Try again later", TransientDeliveryError), ("421 4.4.2 Closing", TransientDeliveryError),
     ("550 5.7.1 Spam", PermanentDeliveryError), ("554 5.0.0 Failed", PermanentDeliveryError)],
)
async def test_smtp_replies_are_classified(reply: str, error: type[Exception]) -> None:
    controller, handler, port = _serve()
    handler.data_replies.append(reply)
    try:
        with pytest.raises(error, match=reply.split()[0]):
            await SmtpDriver("127.0.0.1", port, timeout=5).send(message(), "a@example.com", ["b@example.com"])
    finally:
        controller.stop()


async def test_partly_refused_recipients_are_reported_not_failed() -> None:
    controller, handler, port = _serve()
    handler.rejected_recipients["gone@example.com"] = "550 5.1.1 No such user"
    try:
        driver = SmtpDriver("127.0.0.1", port, timeout=5)
        delivery = await driver.send(message(), "a@example.com", ["b@example.com", "gone@example.com"])
        await driver.aclose()
        assert list(delivery.refused_recipients) == ["gone@example.com"]
        assert handler.messages[0].rcpt_tos == ["b@example.com"]
    finally:
        controller.stop()


async def test_nothing_listening_is_an_unreachable_server() -> None:
    """Unreachable (a transient error the workflow waits out without using attempts)."""
    with pytest.raises(ServerUnreachable, match="could not be reached"):
        await SmtpDriver("127.0.0.1", free_port(), timeout=2).send(message(), "a@example.com", ["b@example.com"])


@pytest.mark.parametrize(("greeting", "error"), [("421 4.3.2 Service not available, closing", ServerUnreachable),
                                                  ("554 5.7.1 No SMTP service here", PermanentDeliveryError)])
async def test_a_server_that_turns_the_session_away_at_the_greeting(greeting: str, error: type[Exception]) -> None:
    """421 at the greeting: busy or going down, nothing handed over (unreachable). 554: its final word."""

    async def greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(f"{greeting}\r\n".encode())
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(greet, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(error, match=greeting.split()[0]) as caught:
            await SmtpDriver("127.0.0.1", port, timeout=2).send(message(), "a@example.com", ["b@example.com"])
        if error is PermanentDeliveryError:
            assert not isinstance(caught.value, TransientDeliveryError)
    finally:
        server.close()
        await server.wait_closed()


async def test_a_silent_server_times_out_as_transient() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    accepted: list[socket.socket] = []
    thread = threading.Thread(target=lambda: accepted.append(listener.accept()[0]), daemon=True)
    thread.start()
    try:
        started = asyncio.get_running_loop().time()
        with pytest.raises(TransientDeliveryError) as caught:
            await SmtpDriver("127.0.0.1", listener.getsockname()[1], timeout=1).send(
                message(), "a@example.com", ["b@example.com"]
            )
        # Connected, but no greeting in time: aiosmtplib reports a connect timeout, nothing was sent.
        assert isinstance(caught.value, ServerUnreachable), caught.value
        assert asyncio.get_running_loop().time() - started < 5
    finally:
        for s in accepted:
            s.close()
        listener.close()


# --- connection reuse ---------------------------------------------------------------------------


class Connections:
    """What the server saw: connections opened, open now, the most open at once, QUITs; and when
    to hang up on MAIL FROM (given the number of that MAIL on its connection)."""

    def __init__(self) -> None:
        self.opened = self.peak = self.quits = 0
        self.live: dict[Any, Any] = {}  # server protocol (one per connection) -> its transport
        self.hang_up_at_mail: Callable[[int], bool] = lambda n: False
        self.refuse_noop = False

    @property
    def open(self) -> int:
        return len(self.live)


class HangingUpHandler(ScriptedHandler):
    """When told to, takes the whole message at DATA and hangs up instead of answering: the
    client cannot know whether it was accepted, the case that must never be retried."""

    hang_up_at_data = False

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.hang_up_at_data:
            self.data_calls += 1
            server.transport.close()
            return "250 OK"  # never reaches the client
        return await super().handle_DATA(server, session, envelope)


def _counting_server(**kw: Any) -> tuple[Controller, HangingUpHandler, int, Connections]:
    from aiosmtpd.smtp import SMTP

    seen = Connections()

    class CountingSMTP(SMTP):
        mails = 0

        def connection_made(self, transport: Any) -> None:
            if self.transport is None:  # STARTTLS calls this again on the same connection
                seen.opened += 1
            seen.live[self] = transport
            seen.peak = max(seen.peak, seen.open)
            super().connection_made(transport)

        def connection_lost(self, error: Exception | None) -> None:
            seen.live.pop(self, None)
            super().connection_lost(error)

        async def smtp_MAIL(self, arg: str | None) -> None:
            self.mails += 1
            if seen.hang_up_at_mail(self.mails):
                self.transport.close()  # no reply: the client finds the connection lost at MAIL FROM
                return
            await super().smtp_MAIL(arg)

        async def smtp_NOOP(self, arg: str) -> None:
            if seen.refuse_noop:  # what a server that has given up on an idle session answers
                await self.push("421 4.4.2 Idle too long, closing")
                self.transport.close()
                return
            await super().smtp_NOOP(arg)

        async def smtp_QUIT(self, arg: str) -> None:
            seen.quits += 1
            await super().smtp_QUIT(arg)

    class CountingController(Controller):
        def factory(self) -> SMTP:
            return CountingSMTP(self.handler, **self.SMTP_kwargs)

    handler, port = HangingUpHandler(), free_port()
    controller = CountingController(handler, hostname="127.0.0.1", port=port, **kw)
    controller.start()
    seen.opened = seen.peak = 0  # start() made a readiness connection of its own
    seen.live.clear()
    return controller, handler, port, seen


@pytest.fixture
def counting() -> Iterator[tuple[HangingUpHandler, int, Connections, Controller]]:
    controller, handler, port, seen = _counting_server()
    yield handler, port, seen, controller
    controller.stop()


def numbered(i: int) -> EmailMessage:
    msg = message()
    msg.replace_header("Message-ID", f"<m{i}@example.com>")
    return msg


def received(handler: ScriptedHandler) -> list[str]:
    return [m.message["Message-ID"] for m in handler.messages]


async def until(condition: Callable[[], bool], what: str) -> None:
    """Wait for something another thread or the event loop does (a socket closing): never passes early."""
    await eventually(condition, timeout=30, interval=0.02, what=f"never happened: {what}")


async def test_sequential_sends_share_one_connection(counting: Any) -> None:
    handler, port, seen, _ = counting
    driver = SmtpDriver("127.0.0.1", port)
    for i in range(20):
        await driver.send(numbered(i), "a@example.com", ["b@example.com"])
    assert len(handler.messages) == 20 and seen.opened == 1 and driver.connections_opened == 1
    await driver.aclose()

    one_each = SmtpDriver("127.0.0.1", port, reuse_connections=False)
    for i in range(20):
        await one_each.send(numbered(i), "a@example.com", ["b@example.com"])
    assert len(handler.messages) == 40 and seen.opened == 21 and one_each._idle == []


async def test_concurrent_sends_never_open_more_than_the_limit(counting: Any) -> None:
    handler, port, seen, _ = counting
    driver = SmtpDriver("127.0.0.1", port, max_connections=5)
    await asyncio.gather(*(driver.send(numbered(i), "a@example.com", ["b@example.com"]) for i in range(30)))
    assert sorted(received(handler)) == sorted(f"<m{i}@example.com>" for i in range(30))
    assert seen.peak <= 5 and 1 <= seen.opened <= 5
    await driver.aclose()


async def test_a_connection_the_server_dropped_while_idle_is_replaced_and_nothing_is_sent_twice(counting: Any) -> None:
    handler, port, seen, controller = counting
    driver = SmtpDriver("127.0.0.1", port)
    await driver.send(numbered(1), "a@example.com", ["b@example.com"])
    for transport in list(seen.live.values()):  # the server hangs up on its idle client
        controller.loop.call_soon_threadsafe(transport.close)
    await until(lambda: not driver._idle[0].client.is_connected, "the client sees the server's close")
    await driver.send(numbered(2), "a@example.com", ["b@example.com"])
    assert received(handler) == ["<m1@example.com>", "<m2@example.com>"]
    assert handler.data_calls == 2 and seen.opened == 2
    await driver.aclose()


async def test_a_pooled_connection_that_fails_the_noop_probe_is_not_used(counting: Any) -> None:
    handler, port, seen, _ = counting
    driver = SmtpDriver("127.0.0.1", port)
    driver.PROBE_AFTER_IDLE_SECONDS = 0  # probe every reuse, so the test need not wait a second
    await driver.send(numbered(1), "a@example.com", ["b@example.com"])
    seen.refuse_noop = True  # from now on the server ends the session when probed
    await driver.send(numbered(2), "a@example.com", ["b@example.com"])
    assert received(handler) == ["<m1@example.com>", "<m2@example.com>"] and seen.opened == 2
    await driver.aclose()


async def test_a_drop_noticed_only_at_mail_from_is_retried_once_on_a_fresh_connection(counting: Any) -> None:
    handler, port, seen, _ = counting
    driver = SmtpDriver("127.0.0.1", port)
    await driver.send(numbered(1), "a@example.com", ["b@example.com"])
    seen.hang_up_at_mail = lambda n: n == 2  # the pooled connection dies at its second MAIL FROM
    await driver.send(numbered(2), "a@example.com", ["b@example.com"])
    assert received(handler) == ["<m1@example.com>", "<m2@example.com>"]
    assert handler.data_calls == 2 and seen.opened == 2
    await driver.aclose()


async def test_the_retry_after_a_drop_at_mail_from_happens_once_and_never_on_a_fresh_connection(counting: Any) -> None:
    handler, port, seen, _ = counting
    driver = SmtpDriver("127.0.0.1", port)
    await driver.send(numbered(1), "a@example.com", ["b@example.com"])
    seen.hang_up_at_mail = lambda n: True  # every MAIL FROM, on the pooled and on any new connection
    with pytest.raises(TransientDeliveryError, match="cannot talk to"):
        await driver.send(numbered(2), "a@example.com", ["b@example.com"])
    assert seen.opened == 2 and driver._idle == []  # the pooled one, then one fresh one: no more
    with pytest.raises(TransientDeliveryError, match="cannot talk to"):
        await driver.send(numbered(3), "a@example.com", ["b@example.com"])
    assert seen.opened == 3 and received(handler) == ["<m1@example.com>"]  # a fresh connection is not retried


async def test_a_connection_lost_during_data_is_never_retried(counting: Any) -> None:
    handler, port, seen, _ = counting
    driver = SmtpDriver("127.0.0.1", port)
    await driver.send(numbered(1), "a@example.com", ["b@example.com"])
    handler.hang_up_at_data = True  # the server gets the whole message and hangs up without answering
    with pytest.raises(TransientDeliveryError, match="cannot talk to"):
        await driver.send(numbered(2), "a@example.com", ["b@example.com"])
    assert handler.data_calls == 2 and seen.opened == 1 and driver._idle == []


async def test_a_connection_is_renewed_after_its_message_limit(counting: Any) -> None:
    handler, port, seen, _ = counting
    driver = SmtpDriver("127.0.0.1", port, max_messages_per_connection=3)
    for i in range(7):
        await driver.send(numbered(i), "a@example.com", ["b@example.com"])
    assert len(handler.messages) == 7 and seen.opened == 3  # 3 + 3 + 1 messages
    assert seen.quits == 2 and len(driver._idle) == 1  # the full ones were closed with QUIT
    await driver.aclose()


async def test_aclose_quits_every_pooled_connection(counting: Any) -> None:
    handler, port, seen, _ = counting
    driver = SmtpDriver("127.0.0.1", port, max_connections=3)
    await asyncio.gather(*(driver.send(numbered(i), "a@example.com", ["b@example.com"]) for i in range(12)))
    pooled = len(driver._idle)
    assert len(handler.messages) == 12 and pooled == seen.opened >= 1 and seen.quits == 0
    await driver.aclose()
    assert seen.quits == pooled and driver._idle == []
    await until(lambda: seen.open == 0, "the server sees every connection closed")


async def test_a_failed_transaction_does_not_keep_its_connection(counting: Any) -> None:
    handler, port, seen, _ = counting
    driver = SmtpDriver("127.0.0.1", port)
    handler.data_replies.append("451 4.3.0 try later")
    with pytest.raises(TransientDeliveryError):
        await driver.send(numbered(1), "a@example.com", ["b@example.com"])
    await driver.send(numbered(2), "a@example.com", ["b@example.com"])
    assert seen.opened == 2 and received(handler) == ["<m2@example.com>"]
    await driver.aclose()


async def test_starttls_auth_logs_in_once_for_many_messages_and_a_refused_login_is_not_pooled(
    server_tls: ssl.SSLContext, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    logins: list[str] = []

    def auth(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
        logins.append("login")
        return _auth(server, session, envelope, mechanism, data)

    controller, handler, port, seen = _counting_server(
        tls_context=server_tls, require_starttls=True, authenticator=auth, auth_require_tls=True, auth_exclude_mechanism=["LOGIN"],
    )
    try:
        driver = SmtpDriver("127.0.0.1", port, security=SmtpSecurity.STARTTLS, username="mailer", password=PASSWORD, validate_certs=False)
        for i in range(10):
            await driver.send(numbered(i), "a@example.com", ["b@example.com"])
        assert len(handler.messages) == 10 and seen.opened == 1 and logins == ["login"]
        await driver.aclose()

        wrong = "wrong-" + PASSWORD
        refused = SmtpDriver("127.0.0.1", port, security=SmtpSecurity.STARTTLS, username="mailer", password=wrong, validate_certs=False)
        for _ in range(2):
            with pytest.raises(PermanentDeliveryError, match="authentication refused") as caught:
                await refused.send(numbered(99), "a@example.com", ["b@example.com"])
            assert wrong not in str(caught.value) and "mailer" not in str(caught.value)
        assert refused._idle == [] and refused.connections_opened == 2 and len(logins) == 3  # each try logs in anew
        await until(lambda: seen.open == 0, "the server sees the refused connections closed")
        plain_auth = base64.b64encode(f"\0mailer\0{wrong}".encode()).decode()  # what AUTH PLAIN sends
        assert wrong not in caplog.text and PASSWORD not in caplog.text and plain_auth not in caplog.text
    finally:
        controller.stop()


# --- a user's own server: reached through the egress check, quoted to nobody ---------------------

USER_HOST = "smtp.user-relay.test"  # no resolver knows it: only the checked address can be reached


def user_driver(port: int, destination: Checked, **kw: Any) -> SmtpDriver:
    return SmtpDriver(USER_HOST, port, destination=destination, server_words=False, **{"timeout": 5} | kw)


@pytest.fixture(scope="module")
def user_ca(tmp_path_factory: pytest.TempPathFactory) -> Iterator[trustme.CA]:
    with trusted_ca(tmp_path_factory.mktemp("user-ca")) as ca:
        yield ca


async def test_a_users_server_is_reached_at_the_checked_address_and_tls_verifies_its_name(user_ca: trustme.CA) -> None:
    """The connection goes to the address the egress check returned (the name itself resolves
    nowhere), once per new connection; STARTTLS verifies the certificate against the name."""
    controller, handler, port, seen = _counting_server(
        tls_context=tls_issued_by(user_ca, USER_HOST), require_starttls=True, authenticator=_auth, auth_require_tls=True,
        auth_exclude_mechanism=["LOGIN"],
    )
    try:
        checked = Checked("127.0.0.1")
        driver = user_driver(port, checked, security=SmtpSecurity.STARTTLS, username="mailer", password=PASSWORD)
        for i in range(3):
            await driver.send(numbered(i), "a@example.com", ["b@example.com"])
        assert len(handler.messages) == 3 and seen.opened == 1
        assert checked.asked == [(USER_HOST, port)]  # checked for the one connection it opened
        await driver.aclose()

        # A certificate for another name is refused: the name, not the address, is what TLS checks.
        impostor = user_driver(port, Checked("127.0.0.1"), security=SmtpSecurity.STARTTLS, username="mailer", password=PASSWORD)
        controller.stop()
        controller, handler, port, seen = _counting_server(
            tls_context=tls_issued_by(user_ca, "other.example"), require_starttls=True, authenticator=_auth, auth_require_tls=True,
            auth_exclude_mechanism=["LOGIN"],
        )
        impostor.port = port
        with pytest.raises(TransientDeliveryError) as caught:
            await impostor.send(message(), "a@example.com", ["b@example.com"])
        assert str(caught.value) == f"the TLS certificate of {USER_HOST}:{port} was not accepted"
        assert handler.messages == []
    finally:
        controller.stop()


async def test_a_refused_destination_is_permanent_and_nothing_is_connected_to(counting: Any) -> None:
    _, port, seen, _ = counting
    refused = Checked(refuse=DestinationRefused("resolves to a loopback address"))
    with pytest.raises(PermanentDeliveryError) as caught:
        await user_driver(port, refused).send(message(), "a@example.com", ["b@example.com"])
    assert not isinstance(caught.value, TransientDeliveryError)
    assert str(caught.value) == f"destination refused: {USER_HOST} resolves to a loopback address"
    port_refused = Checked(refuse=DestinationRefused("port 22 is not an SMTP port (allowed: 25, 465, 587, 2525)", part="port"))
    with pytest.raises(PermanentDeliveryError, match="^destination refused: port 22 is not an SMTP port"):
        await user_driver(port, port_refused).send(message(), "a@example.com", ["b@example.com"])
    with pytest.raises(ServerUnreachable, match="does not resolve"):  # DNS may answer again: waited for
        await user_driver(port, Checked(refuse=NotResolved("does not resolve to any address"))).send(message(), "a@example.com", ["b@example.com"])
    assert seen.opened == 0


async def _banner_server(banner: bytes | None) -> tuple[asyncio.Server, int, list[int]]:
    """A TCP service that is not SMTP: it writes `banner` (None: nothing) and keeps the line open."""
    accepted: list[int] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(1)
        if banner is not None:
            writer.write(banner)
            await writer.drain()
        await reader.read()  # until the client hangs up
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], accepted


async def test_closed_silent_and_not_smtp_read_the_same_and_the_banner_goes_only_to_the_log(caplog: pytest.LogCaptureFixture) -> None:
    """A user's settings must not make a port scanner: refused, no greeting, and another service's
    banner are one reason in the same words, and unreachable alike. The operator's log gets the
    banner, scrubbed of control characters."""
    caplog.set_level(logging.DEBUG)
    ssh, ssh_port, ssh_seen = await _banner_server(b"SSH-2.0-OpenSSH_9.6 db-internal-01.corp\x1b[2J\r\n")
    silent, silent_port, silent_seen = await _banner_server(None)
    closed_port = free_port()
    errors = {}
    try:
        for port in (ssh_port, silent_port, closed_port):
            with pytest.raises(ServerUnreachable) as caught:
                await user_driver(port, Checked("127.0.0.1"), timeout=1).send(message(), "a@example.com", ["b@example.com"])
            errors[port] = str(caught.value).replace(str(port), "PORT")
    finally:
        for server in (ssh, silent):
            server.close()
            await server.wait_closed()
    assert ssh_seen and silent_seen  # both were reached
    assert set(errors.values()) == {f"could not reach an SMTP server at {USER_HOST}:PORT"}, errors
    logged = [r.getMessage() for r in caplog.records if r.name == "mailqueue.drivers.smtp"]
    assert any("SSH-2.0-OpenSSH_9.6 db-internal-01.corp" in line for line in logged), logged
    assert not any("\x1b" in line for line in logged)


@pytest.mark.parametrize(("reply", "error", "reason"), [
    ("550 5.7.1 Rejected: db-internal-01.corp says no", PermanentDeliveryError, "message refused (550 5.7.1)"),
    ("451 4.3.0 Try later, db-internal-01.corp busy", TransientDeliveryError, "message refused (451 4.3.0)"),
    ("554 Transaction failed on db-internal-01.corp", PermanentDeliveryError, "message refused (554)"),
])
async def test_a_users_servers_replies_are_told_by_their_codes_only(
    counting: Any, reply: str, error: type[Exception], reason: str, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    handler, port, _, _ = counting
    handler.data_replies.append(reply)
    handler.rejected_recipients["gone@example.com"] = "550 5.1.1 <gone@example.com>: no such user on db-internal-01.corp"
    driver = user_driver(port, Checked("127.0.0.1"))
    with pytest.raises(error) as caught:
        await driver.send(message(), "a@example.com", ["b@example.com", "gone@example.com"])
    assert str(caught.value) == reason and "db-internal" not in repr(caught.value)
    handler.rejected_recipients["b@example.com"] = "450 4.2.2 Mailbox full on db-internal-01.corp"
    with pytest.raises(TransientDeliveryError) as caught:
        await driver.send(message(), "a@example.com", ["b@example.com", "gone@example.com"])
    assert str(caught.value) == "all recipients refused: b@example.com (450 4.2.2); gone@example.com (550 5.1.1)"
    del handler.rejected_recipients["b@example.com"]
    delivery = await driver.send(message(), "a@example.com", ["b@example.com", "gone@example.com"])
    assert delivery.refused_recipients == {"gone@example.com": "550 5.1.1"}
    await driver.aclose()
    assert "db-internal-01.corp" in caplog.text  # the operator's log keeps the words


async def test_a_users_server_that_refuses_the_login_is_told_by_its_codes(user_ca: trustme.CA, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    controller, _, port, _ = _counting_server(
        tls_context=tls_issued_by(user_ca, USER_HOST), require_starttls=True, authenticator=_auth, auth_require_tls=True,
        auth_exclude_mechanism=["LOGIN"],
    )
    wrong = "wrong-" + PASSWORD
    try:
        with pytest.raises(PermanentDeliveryError) as caught:
            await user_driver(port, Checked("127.0.0.1"), security=SmtpSecurity.STARTTLS, username="mailer", password=wrong).send(
                message(), "a@example.com", ["b@example.com"])
    finally:
        controller.stop()
    assert str(caught.value) == "authentication failed (535 5.7.8)" and caught.value.code == 535
    plain_auth = base64.b64encode(f"\0mailer\0{wrong}".encode()).decode()
    assert wrong not in caplog.text and plain_auth not in caplog.text


def _auth_recording_server(**kw: Any) -> tuple[Controller, list[str], int, Connections]:
    """A server that offers AUTH even without TLS and records every AUTH command it is sent: the
    client's own rule is all that keeps a password off a plain connection."""
    logins: list[str] = []

    def anyone(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
        logins.append(mechanism)
        return AuthResult(success=True)

    controller, _, port, seen = _counting_server(authenticator=anyone, auth_require_tls=False, auth_exclude_mechanism=["LOGIN"], **kw)
    return controller, logins, port, seen


async def test_auth_never_goes_over_a_plain_connection_unless_the_operator_allows_that_host() -> None:
    controller, logins, port, seen = _auth_recording_server()
    try:
        plain = user_driver(port, Checked("127.0.0.1"), security=SmtpSecurity.NONE, username="mailer", password=PASSWORD)
        with pytest.raises(PermanentDeliveryError, match="^AUTH refused: the connection to .* is not encrypted"):
            await plain.send(message(), "a@example.com", ["b@example.com"])
        assert seen.opened == 0 and logins == []  # refused before connecting

        # STARTTLS asked for, not offered: the session ends before AUTH.
        no_tls = user_driver(port, Checked("127.0.0.1"), security=SmtpSecurity.STARTTLS, username="mailer", password=PASSWORD)
        with pytest.raises(PermanentDeliveryError, match="does not offer STARTTLS"):
            await no_tls.send(message(), "a@example.com", ["b@example.com"])
        assert seen.opened == 1 and logins == []

        no_password = user_driver(port, Checked("127.0.0.1"), security=SmtpSecurity.STARTTLS, username="mailer")
        with pytest.raises(PermanentDeliveryError, match="no password is stored"):
            await no_password.send(message(), "a@example.com", ["b@example.com"])
        assert seen.opened == 1 and logins == []

        allowed = user_driver(port, Checked("127.0.0.1"), security=SmtpSecurity.NONE, username="mailer", password=PASSWORD,
                              plaintext_auth=True)
        await allowed.send(message(), "a@example.com", ["b@example.com"])
        await allowed.aclose()
        assert logins == ["PLAIN"]  # the server would have taken it: the refusals above were the client's
    finally:
        controller.stop()
